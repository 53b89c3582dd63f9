"""The files a model ships as, and one way to run any of them.

Three formats hold the same model — uint8 RGB images (N, 3, H, W) of any size -> probabilities (N, K):
the extraction's Pillow-exact resize and centre crop, normalization, the frozen backbone, the Linear,
softmax — and the same metadata (transfer.json: classes, backbone, weights, preprocessing, ...),
sealed by a digest of everything that decides an answer and checked before any runtime reads the
file (`integrity`):

- torchscript  model.pt    torch.jit; metadata in the archive's extra file transfer.json
- onnx         model.onnx  the torch.export-based ONNX exporter; metadata in metadata_props["transfer.json"];
                           runs under onnxruntime with no torch installed
- pt2          model.pt2   a torch.export ExportedProgram (`torch.export.load`); metadata in its extra file;
                           batch norms folded into their convolutions (`folding`), as onnxruntime does

All three resize with `resize.resize_crop` (Pillow's bits; traceable by torch.export with symbolic
N, H and W).

`write` writes one format, `load` reads any of them into a `Runner`: the whole file on images of one
size, or (model.pt, model.pt2) each image's crop by the file's own preprocessing and crops of any
sizes together, and the file's own head on cached features (`parts`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import warnings
import weakref

import numpy as np
import torch
from torch import nn

from ..errors import InputFileError, SettingError, TransferError
from ..files import display_path
from ..resize import resize_crop
from . import integrity, parts
from .folding import fold_batch_norms

FORMATS = {"torchscript": ".pt", "onnx": ".onnx", "pt2": ".pt2"}  # format -> file suffix
MODEL_FORMAT = "transfer.model"  # transfer.json's "format": a model file written by `transfer export`
METADATA_KEY = "transfer.json"
# transfer.json's seal, checked on load: a damaged weight or an edited class name loads without
# complaint in every runtime (zip members' CRCs are not verified).
DIGEST_KEY = integrity.CONTENT_DIGEST_KEY
ONNX_OPSET = 18  # onnxruntime >= 1.14 runs it
ONNX_INPUT, ONNX_OUTPUT = "images", "probabilities"


def image_tensor(image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor: what every format takes (batched as (N, 3, H, W))."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def parse_formats(formats) -> list[str]:
    """'onnx', 'all', or a list of names -> format names in FORMATS order."""
    names = [formats] if isinstance(formats, str) else list(formats)
    if "all" in names:
        return list(FORMATS)
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise SettingError(f"format (--format) {', '.join(map(str, unknown)) or 'none'}: expected "
                           f"{', '.join(FORMATS)} or all")
    return [f for f in FORMATS if f in names]


def format_of(path: str) -> str:
    """The format a model file holds, by its suffix (anything else is taken for TorchScript)."""
    for name, suffix in FORMATS.items():
        if name != "torchscript" and path.lower().endswith(suffix):
            return name
    return "torchscript"


class ExportableModel(nn.Module):
    """A TransferModel's forward with the resize torch.export can trace: (N, 3, H, W) uint8 -> (N, K)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        crops = resize_crop(images, m.resize_to, m.crop, m.mode == "bicubic", m.vertical_first_rule, m.squash)
        return m.classify(crops)


def _program(module: nn.Module, example: torch.Tensor, dims: dict) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module.eval(), (example,), dynamic_shapes=(dims,))


def image_program(model: nn.Module, fold: bool = True) -> torch.export.ExportedProgram:
    """torch.export of the whole model, dynamic in batch, height and width, its batch norms folded into
    the convolutions before them (`folding`: the program runs op by op, and each costs a pass)."""
    Dim = torch.export.Dim
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=1, max=65535), 3: Dim("width", min=1, max=65535)}
    program = _program(ExportableModel(model), torch.zeros(2, 3, 240, 320, dtype=torch.uint8), dims)
    if fold:
        fold_batch_norms(program)
    return program


def _onnx_bytes(program: torch.export.ExportedProgram, metadata: str | None) -> bytes:
    """An ExportedProgram through the torch.export-based ONNX exporter, checked by onnx.checker."""
    import onnx  # only model.onnx needs it (0.8 s to import)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                         input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT])
    proto = onnx_program.model_proto
    _name_axes(proto)
    if metadata is not None:
        onnx.helper.set_model_props(proto, {METADATA_KEY: integrity.seal(metadata, lambda m: integrity.onnx_digest(proto, m))})
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _name_axes(proto) -> None:
    """The exporter names dynamic axes s0, s1, ...: call the input's batch, height and width so."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = {"batch": dims[0].dim_param}
    if len(dims) == 4:
        names.update(height=dims[2].dim_param, width=dims[3].dim_param)
    renamed = {old: new for new, old in names.items() if old}
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in renamed:
                d.dim_param = renamed[d.dim_param]


def write(fmt: str, model: nn.Module, path: str, program: torch.export.ExportedProgram | None = None) -> None:
    """Write `model` (a TransferModel, in eval mode) to `path` in format `fmt`, its metadata inside.
    program: its `image_program`, when already made (onnx and pt2 both start from it)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notices
            scripted = torch.jit.script(model)
            with open(path, "wb") as f:  # a file object: torch's path argument cannot hold non-UTF-8 names
                integrity.save_sealed(lambda buffer: torch.jit.save(scripted, buffer), model.metadata, f)
    elif fmt == "pt2":
        program = program or image_program(model)
        with open(path, "wb") as f:
            integrity.save_sealed(lambda buffer: torch.export.save(program, buffer), model.metadata, f)
    elif fmt == "onnx":
        data = _onnx_bytes(program or image_program(model), model.metadata)
        with open(path, "wb") as f:
            f.write(data)
    else:
        raise SettingError(f"unknown model format {fmt!r}; expected one of {', '.join(FORMATS)}")




# --- loading and running ---------------------------------------------------------------------------

class Runner:
    """A loaded model of any format. `images(x)`: (N, 3, H, W) uint8 -> (N, K) float32 numpy, the whole
    file as its users run it. For images of different sizes: `prepare(image)` each (3, H, W) uint8,
    then `run(prepared)`: items of one `key` go through the model together (None: any items do, the
    file's classify part on crops; otherwise the key is the image size). `probabilities(features)`:
    the file's own head on (N, D) features, or None where it cannot be cut out of the file."""

    format: str

    def images(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def prepare(self, image: torch.Tensor):
        return image.contiguous()

    def key(self, prepared) -> tuple | None:
        return tuple(prepared.shape)

    def run(self, prepared: list) -> np.ndarray:
        """(n, K) for n prepared items, in their order; items of one key run as one batch."""
        groups: dict = {}
        for i, item in enumerate(prepared):
            groups.setdefault(self.key(item), []).append(i)
        out = None
        for members in groups.values():
            p = self._run([prepared[i] for i in members])
            out = np.empty((len(prepared), p.shape[1]), dtype=p.dtype) if out is None else out
            out[members] = p
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def _run(self, items: list) -> np.ndarray:
        return self.images(torch.stack(items))

    def probabilities(self, features: np.ndarray) -> np.ndarray | None:
        return None


class TorchScriptRunner(Runner):
    """model.pt. Images of a new size run its preprocessing unoptimized: TorchScript's profiling executor
    would otherwise specialize (and optimize) the graph again for each new size, which made the first
    calls on 12 photos of 12 sizes cost 2-15x the later ones (measured, torch 2.14)."""

    format = "torchscript"

    def __init__(self, module, device: torch.device):
        self.module, self.device = module, device

    def images(self, x):
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            return self.module(x.to(self.device)).float().cpu().numpy()

    def prepare(self, image):  # model.pt crops each image itself, so any sizes batch together
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            return self.module.preprocess(image.to(self.device))

    def key(self, prepared):
        return None

    def _run(self, items):
        with torch.inference_mode():
            return self.module.classify(torch.stack(items)).float().cpu().numpy()

    def probabilities(self, features):
        if not hasattr(self.module, "probabilities"):  # exported before the head was a method
            return None
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
            return self.module.probabilities(x).double().cpu().numpy()


class ProgramRunner(Runner):
    format = "pt2"

    def __init__(self, program: torch.export.ExportedProgram, device: torch.device):
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass  # only for a GPU

            program = move_to_device_pass(program, device)
        self.module, self.device = program.module(), device
        self.parts = parts.program_parts(self.module)  # (preprocess, classify), or None: the whole file

    def images(self, x):
        with torch.inference_mode():
            return self.module(x.to(self.device).contiguous()).float().cpu().numpy()

    def prepare(self, image):
        if self.parts is None:
            return image.contiguous()
        with torch.inference_mode():
            return self.parts[0](image.to(self.device).unsqueeze(0).contiguous())[0]

    def key(self, prepared):
        return None if self.parts is not None else tuple(prepared.shape)

    def _run(self, items):
        if self.parts is None:
            return self.images(torch.stack(items))
        with torch.inference_mode():
            return self.parts[1](torch.stack(items)).float().cpu().numpy()

    def probabilities(self, features):
        head = parts.program_head(self.module)
        if head is None:
            return None
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
            return head(x).double().cpu().numpy()


class OnnxRunner(Runner):
    format = "onnx"

    def __init__(self, session, data: bytes | None = None):
        self.session, self.data = session, data

    def images(self, x):
        return self.session.run(None, {ONNX_INPUT: x.cpu().contiguous().numpy()})[0]

    def probabilities(self, features):
        head = parts.onnx_head(_onnx_proto(self.data)) if self.data is not None else None
        if head is None:
            return None
        session = _onnx_session(head.SerializeToString(), torch.device("cpu"))
        x = np.ascontiguousarray(features, dtype=np.float32)
        return session.run(None, {"features": x})[0].astype(np.float64)


def _onnx_proto(data: bytes):
    import onnx  # only model.onnx needs it

    return onnx.load_from_string(data)


def _onnx_session(data: bytes, device: torch.device):
    try:
        import onnxruntime as ort  # optional where model.onnx is only run, and 1 s to import
    except ImportError:
        raise TransferError("running model.onnx needs onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    return ort.InferenceSession(data, options, providers=providers)


@contextlib.contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


_PARSING = threading.RLock()


@contextlib.contextmanager
def _expressions_parsed_once():
    """torch.export.load parses every symbolic shape expression it meets with sympy, anew each time
    (torch/_export/serde/serialize.py, GraphModuleDeserializer._parse_sym_expr, torch 2.14): the exact
    resize's program holds ~1,100 of them but ~100 distinct ones, ~10 ms each. While loading, each
    distinct (expression, hint) is parsed once per deserializer: the same function, called again with
    the same arguments, returns the symbol it cached the first time, so nothing else changes. Measured
    on the Lite0 model: 2.4 s instead of 10.1 s (`benchmarks/pt2_load.py`). Where torch's internals
    differ, a plain load."""
    try:  # torch's private deserializer: looked up where it is patched, absent in other torch versions
        from torch._export.serde.serialize import GraphModuleDeserializer as deserializer
    except ImportError:
        deserializer = None
    if getattr(deserializer, "_parse_sym_expr", None) is None:
        yield
        return
    with _PARSING:  # read and put back under the lock: another thread's patch is never taken for torch's own
        original = deserializer._parse_sym_expr

        def parse_once(self, expr, hint=None):
            parsed = self.__dict__.setdefault("_transfer_parsed", {})
            key = (expr, hint)
            if key not in parsed:
                parsed[key] = original(self, expr, hint)
            return parsed[key]

        deserializer._parse_sym_expr = parse_once
        try:
            yield
        finally:
            deserializer._parse_sym_expr = original


# Loaded runtimes by verified content: loading a model again in one process (`predict("model.pt2", ...)` in
# a loop, evaluate after export) does not deserialize it again; model.pt2 costs most, as torch.export.load
# parses the symbolic shapes of the exact resize (2-3 s here with `_expressions_parsed_once`, 10 s without:
# benchmarks/pt2_load.py). Kept while a caller holds them,
# and the last one loaded: at most one model's memory beyond what callers hold.
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LAST: list = [None]

DESCRIPTIONS = {"torchscript": "a TorchScript model", "onnx": "an ONNX model", "pt2": "a torch.export program (.pt2)"}


def load(path: str, device: torch.device, fmt: str | None = None) -> tuple[Runner, dict]:
    """Read a model file of format `fmt` (default: by its suffix) -> (Runner, its transfer.json metadata).
    Raises InputFileError (one line) when the file is not a model `transfer export` wrote, is
    damaged or edited (its seal), or holds what loading could run (`integrity.check_pt2_archive`):
    all checked before the runtime reads it. A file of the same verified content already loaded on the
    same device (and still held, or the last one loaded) gets the same Runner back."""
    fmt = fmt or format_of(path)
    shown = display_path(path)
    try:
        with open(path, "rb") as f:  # a file object: the runtimes' path arguments cannot hold non-UTF-8 names
            if fmt == "onnx":
                data = f.read()
                proto = _onnx_proto(data)
                integrity.check_onnx(proto, shown)
                text = {p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY)
                digest = lambda meta: integrity.onnx_digest(proto, meta)  # noqa: E731
            else:
                reader = integrity.check_pt2_archive(f, shown) if fmt == "pt2" else torch._C.PyTorchFileReader(f)
                text = reader.get_record(integrity.METADATA_RECORD) if integrity.METADATA_RECORD in set(
                    reader.get_all_records()) else None
                digest = lambda meta: integrity.archive_digest(reader, meta)  # noqa: E731
            meta = _metadata(text, shown, fmt)
            integrity.verify(meta, digest(integrity.canonical_metadata(meta)), shown)
            key = (fmt, str(device), meta[DIGEST_KEY])  # the content just verified, not the path
            runner = _LOADED.get(key)
            if runner is None:
                f.seek(0)
                runner = _LOADED[key] = _runner(fmt, f, data if fmt == "onnx" else None, device)
            _LAST[0] = runner
    except TransferError:
        raise
    except Exception as e:  # noqa: BLE001 - each runtime raises its own types for "not this format"
        raise InputFileError(f"{shown} is not {DESCRIPTIONS[fmt]} written by `transfer export` "
                             f"({type(e).__name__})") from None
    if fmt == "torchscript" and list(runner.module.classes) != [display_path(c) for c in meta["classes"]]:
        raise InputFileError(f"{shown} is damaged: its classes attribute {list(runner.module.classes)[:5]} disagrees "
                             f"with its metadata's {[display_path(c) for c in meta['classes']][:5]}; export it again")
    return runner, meta


def _metadata(text, shown: str, fmt: str) -> dict:
    """transfer.json of a model file, or InputFileError when there is none (not ours)."""
    try:
        meta = json.loads(text) if text else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise InputFileError(f"{shown} is {DESCRIPTIONS[fmt]} but not one written by `transfer export` "
                             "(no transfer.json inside)")
    return meta


def _runner(fmt: str, f, data: bytes | None, device: torch.device) -> Runner:
    """The runtime over a file already checked: f, the open file at its start (data: ONNX's bytes)."""
    if fmt == "onnx":
        return OnnxRunner(_onnx_session(data, device), data)
    if fmt == "pt2":
        with _quiet("torch.export"), _expressions_parsed_once():  # it logs a traceback before raising
            return ProgramRunner(torch.export.load(f), device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return TorchScriptRunner(torch.jit.load(f, map_location=device).eval(), device)
