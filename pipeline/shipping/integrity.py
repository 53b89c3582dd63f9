"""What a model file must be before any runtime reads it: sealed at export, checked at load.

The seal: transfer.json (the metadata inside every model file) records `content_sha256`, a sha256 of
the metadata itself (class names and their order, preprocessing, backbone, ...) and of everything
else the file holds that decides an answer: every record of a model.pt / model.pt2 zip archive
(weights, TorchScript code and attributes, the torch.export graph) but the metadata's own record
and torch's bookkeeping (.data/), or the whole ONNX protobuf but its metadata_props. A file of this
version without it is damaged. It detects damage and edits (a renamed class, a changed byte); it is
not a signature: whoever can write the file can also recompute it.

The inspection (`check_pt2_archive`): `torch.export.load` unpickles pickled weights and constants,
runs the graph's guard code with `exec`, parses shape expressions with sympy (which evaluates
them) and resolves call targets by name. A model.pt2 is therefore read only when its archive holds
nothing but what `transfer export` writes: raw tensor bytes, a graph of aten and arithmetic
operators, shape expressions of a fixed grammar, no guard code, sample inputs that load with
`torch.load(weights_only=True)`. TorchScript (model.pt) has no such check: load it from people
you trust. docs/guarantees.md (Security) says which loads are safe for untrusted files.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile

import torch

from ..errors import InputFileError

MODEL_FORMAT_VERSION = 2  # transfer.json's "format_version": 2 = sealed with CONTENT_DIGEST_KEY
CONTENT_DIGEST_KEY = "content_sha256"
METADATA_RECORD = "extra/transfer.json"
_UNSEALED = (".data/", "extra/")  # torch's bookkeeping (serialization id) and the metadata itself


def _sealed(name: str) -> bool:
    """Whether a record is covered by the seal: all but the metadata and what torch's zip writer
    writes on its own (the archive's version, under one name or the other, and a random id)."""
    return not name.startswith(_UNSEALED) and name != "version"


def canonical_metadata(meta: dict) -> bytes:
    """The metadata as the seal covers it: sorted keys, ASCII, without the seal itself."""
    return json.dumps({k: v for k, v in meta.items() if k != CONTENT_DIGEST_KEY}, sort_keys=True).encode()


def seal(metadata: str, content_digest) -> str:
    """transfer.json with format_version and CONTENT_DIGEST_KEY; content_digest(meta bytes) -> hex."""
    meta = {**json.loads(metadata), "format_version": MODEL_FORMAT_VERSION}
    return json.dumps({**meta, CONTENT_DIGEST_KEY: content_digest(canonical_metadata(meta))})


def archive_digest(reader, meta_bytes: bytes) -> str:
    """sha256 of the metadata and of every sealed record of a torch zip archive (name, size, bytes,
    in name order); reader: a torch._C.PyTorchFileReader."""
    h = hashlib.sha256(b"transfer.model/2\0" + meta_bytes + b"\0")
    for name in sorted(filter(_sealed, reader.get_all_records())):
        data = reader.get_record(name)
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def onnx_digest(proto, meta_bytes: bytes) -> str:
    """sha256 of the metadata and of the whole ONNX model but its metadata_props (deterministic
    protobuf serialization)."""
    bare = type(proto)()
    bare.CopyFrom(proto)
    del bare.metadata_props[:]
    return hashlib.sha256(b"transfer.model/2\0" + meta_bytes + b"\0" + bare.SerializeToString(deterministic=True)).hexdigest()


def save_sealed(save, metadata: str, f) -> None:
    """Write a torch zip archive (torch.jit.save or torch.export.save, called as save(buffer)) to
    the open file `f` with its sealed transfer.json as the extra file: saved once into memory,
    then its records copied with the metadata added (the seal covers the records themselves)."""
    buffer = io.BytesIO()
    save(buffer)
    buffer.seek(0)
    reader = torch._C.PyTorchFileReader(buffer)
    sealed = seal(metadata, lambda meta: archive_digest(reader, meta)).encode()
    writer = torch._C.PyTorchFileWriter(f)
    for name in reader.get_all_records():
        if _sealed(name):
            data = reader.get_record(name)
            writer.write_record(name, data, len(data))
    writer.write_record(METADATA_RECORD, sealed, len(sealed))
    writer.write_end_of_file()


def verify(meta: dict, found: str, shown: str) -> None:
    """Refuse a file whose metadata is not sealed by this version or whose content is not what
    was sealed. found: the digest of the file as read now (archive_digest / onnx_digest)."""
    version = meta.get("format_version")
    if version is None:
        raise InputFileError(f"{shown} was written by an older `transfer export`, without the seal over its class "
                             "names and preprocessing (or the seal was removed); export it again: transfer export RUN_DIR")
    if version != MODEL_FORMAT_VERSION:
        raise InputFileError(f"{shown} has model format version {version!r}; this transfer reads version "
                             f"{MODEL_FORMAT_VERSION}: export it again with this transfer, or upgrade transfer")
    expected = meta.get(CONTENT_DIGEST_KEY)
    if not isinstance(expected, str) or expected != found:
        recorded = f"recorded {expected[:12]}" if isinstance(expected, str) else f"no {CONTENT_DIGEST_KEY} recorded"
        raise InputFileError(f"{shown} is damaged or was edited: its weights, graph, class names or preprocessing are "
                             f"not the ones written at export (sha256 {found[:12]}, {recorded}); export it again")
    classes = meta.get("classes")
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise InputFileError(f"{shown} is damaged: its metadata's classes must be distinct names, found {str(classes)[:60]}")


def check_onnx(proto, shown: str) -> None:
    """Refuse a model.onnx whose tensors live in other files (external data): onnxruntime would read
    files named by the model, outside what the seal covers."""
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        tensors = [*graph.initializer, *(t for s in graph.sparse_initializer for t in (s.values, s.indices))]
        for node in graph.node:
            for a in node.attribute:
                tensors += [a.t, *a.tensors]
                graphs += [a.g, *a.graphs]
        if any(t.data_location == t.EXTERNAL or t.external_data for t in tensors):
            raise InputFileError(f"{shown} is refused unloaded: its tensors refer to external data files; a model.onnx "
                                 "written by `transfer export` holds all its data")


# --- model.pt2: the archive inspected before torch.export.load reads it -----------------------------

_PT2_NAMES = re.compile(r"(archive_format|archive_version|byteorder|version|models/model\.json|"
                        r"data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|"
                        r"data/constants/model_constants_config\.json|data/weights/weight_\d+|"
                        r"data/constants/tensor_\d+|extra/[^/]+|\.data/[^/]+)")
# Call targets torch.export's deserializer may resolve (it looks names up in torch, operator, math).
_TARGETS = re.compile(r"torch\.ops\.aten\.\w+\.\w+|torch\.ops\.higher_order\.cond|"
                      r"_operator\.(add|sub|mul|floordiv|truediv|mod|neg|pos|abs|eq|ne|lt|le|gt|ge|and_|or_|xor|"
                      r"not_|getitem)|torch\.sym_(min|max|not|float|int|ite|sum|sqrt)|math\.(ceil|floor|trunc|sqrt)")
# A shape expression is passed to sympy.sympify, which evaluates it as Python: only sympy's
# constructors, torch's integer functions, symbol names in quotes, numbers and arithmetic pass.
_EXPR_TOKEN = re.compile(r"\s+|\d{1,30}(\.\d{1,30})?(e-?\d{1,3})?|'[A-Za-z_]\w{0,30}'|[A-Za-z_]\w*|[(),=+\-*/]")
_EXPR_NAMES = {"Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Min", "Max", "Abs", "FloorDiv", "CeilDiv",
               "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "TruncToInt",
               "IntTrueDiv", "FloatTrueDiv", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan",
               "StrictGreaterThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "True", "False",
               "positive", "negative", "nonnegative", "integer", "real", "finite", "oo", "zoo", "nan"}
MAX_EXPR = 20_000  # characters: ours are under 2,000
MAX_JSON = 256 * 2**20  # bytes of the graph (ours: ~1 MB)


def check_pt2_archive(f, shown: str):
    """Refuse (InputFileError, one line) a model.pt2 that holds anything loading it could run or
    unpickle; f: the open file, read from its start. Returns its torch._C.PyTorchFileReader."""
    f.seek(0)
    try:
        reader = torch._C.PyTorchFileReader(f)
        records = set(reader.get_all_records())
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            members = z.namelist()
    except (RuntimeError, zipfile.BadZipFile, ValueError):
        raise InputFileError(f"{shown} is not a torch.export program (.pt2) written by `transfer export` "
                             "(not a readable zip archive)") from None
    finally:
        f.seek(0)
    prefixes = {m.split("/", 1)[0] for m in members}
    # torch's reader and Python's zipfile (which torch.export.load falls back to) must see one archive
    if len(prefixes) != 1 or len(members) != len(set(members)) or {m.split("/", 1)[-1] for m in members} != records:
        _refuse(shown, "its zip members are not one torch archive (duplicates or files outside it)")
    for name in sorted(records):
        if not _PT2_NAMES.fullmatch(name):
            _refuse(shown, f"it holds {name!r}, which an exported program never holds (code, pickled objects "
                           "or a compiled library)")
    for config, folder in (("data/weights/model_weights_config.json", "data/weights/"),
                           ("data/constants/model_constants_config.json", "data/constants/")):
        entries = _json(reader, config, shown).get("config")
        if not isinstance(entries, dict):
            _refuse(shown, f"{config} is not a payload config")
        for fqn, entry in entries.items():
            if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
                _refuse(shown, f"{fqn!r} is stored pickled (use_pickle), and unpickling can run code")
            if folder + str(entry.get("path_name")) not in records:
                _refuse(shown, f"{fqn!r} names a payload the archive does not hold")
    try:
        torch.load(io.BytesIO(reader.get_record("data/sample_inputs/model.pt")), weights_only=True)
    except Exception:  # noqa: BLE001 - anything the restricted unpickler refuses; torch would retry unrestricted
        _refuse(shown, "its sample inputs are not plain tensors (torch.load with weights_only=True refuses them)")
    _check_program(_json(reader, "models/model.json", shown), shown)
    return reader


def _check_program(program: dict, shown: str) -> None:
    if program.get("guards_code"):
        _refuse(shown, "its graph carries guard code, which loading runs with exec")
    stack = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack += node
        elif isinstance(node, dict):
            for key, value in node.items():
                if key == "target" and isinstance(value, str) and (not _TARGETS.fullmatch(value) or "file" in value):
                    _refuse(shown, f"its graph calls {value[:80]!r}, which an exported model never calls")
                elif key == "expr_str" and not _safe_expression(value):
                    _refuse(shown, f"its graph holds the shape expression {str(value)[:80]!r}, which is not one "
                                   "torch.export writes (sympy would evaluate it as Python)")
                else:
                    stack.append(value)


def _safe_expression(text) -> bool:
    if not isinstance(text, str) or len(text) > MAX_EXPR:
        return False
    at = 0
    while at < len(text):
        token = _EXPR_TOKEN.match(text, at)
        if token is None:
            return False
        word = token.group()
        if (word[0].isalpha() or word[0] == "_") and word not in _EXPR_NAMES:
            return False
        at = token.end()
    return "**" not in text


def _json(reader, name: str, shown: str) -> dict:
    try:
        data = reader.get_record(name)
        if len(data) > MAX_JSON:
            raise ValueError
        doc = json.loads(data)
    except (RuntimeError, ValueError):
        _refuse(shown, f"its {name} is missing or is not JSON")
    if not isinstance(doc, dict):
        _refuse(shown, f"its {name} is not a JSON object")
    return doc


def _refuse(shown: str, why: str):
    raise InputFileError(f"{shown} is refused unloaded: {why}; a model.pt2 written by `transfer export` holds "
                         "only tensors and a graph of standard operators")
