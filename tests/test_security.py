"""Hostile inputs: model files built to run code or to lie, and names built to attack whoever reads
our outputs (spreadsheets, Markdown viewers, terminals). Each crafted file is loaded the way a user
would load it; the checks are that no code ran (a sentinel file never appears), the file is refused
in one line, and what we write is inert."""

# No `from __future__ import annotations`: TorchScript reads Tiny's annotations as types.
import gc
import io
import json
import re
import shutil
import weakref
from pathlib import Path
from typing import List

import pytest
import torch
from torch import nn

import pipeline
from pipeline.errors import InputFileError
from pipeline.shipping import formats, integrity
from tests.conftest import assert_one_line_error, blobs, make_cache, run_cli, write_image

CLASSES = ["ants", "bees"]


class Tiny(nn.Module):
    """A model with the interface of TransferModel (preprocess, classify, classes, metadata) and
    almost no network: the mean colour -> Linear -> softmax. Class 0 wins with p ~ 1."""

    classes: List[str]
    metadata: str

    def __init__(self, classes):
        super().__init__()
        self.head = nn.Linear(3, len(classes))
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([12.0] + [0.0] * (len(classes) - 1)))
        self.classes = list(classes)
        self.metadata = json.dumps({"format": formats.MODEL_FORMAT, "classes": classes, "backbone": "tiny",
                                    "preprocessing": {"resize": 8, "crop": 8}})

    @torch.jit.export
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        return image[:, :8, :8]

    @torch.jit.export
    def classify(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(crops.float().mean([2, 3]) / 255.0), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(images)


def _tiny_onnx(path: Path, model: Tiny) -> None:
    """model.onnx of Tiny, built node by node (the exporter takes seconds) and sealed by the writer's own code."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = (numpy_helper.from_array(t.detach().numpy(), n) for t, n in ((model.head.weight.T.contiguous(), "w"),
                                                                         (model.head.bias, "b")))
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
         helper.make_node("Div", ["m", "scale"], ["s"]),
         helper.make_node("MatMul", ["s", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], [formats.ONNX_OUTPUT], axis=1)],
        "tiny", [helper.make_tensor_value_info(formats.ONNX_INPUT, TensorProto.UINT8, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info(formats.ONNX_OUTPUT, TensorProto.FLOAT, ["batch", len(model.classes)])],
        [w, b, helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
         helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", formats.ONNX_OPSET)])
    helper.set_model_props(proto, {formats.METADATA_KEY: integrity.seal(
        model.metadata, lambda meta: integrity.onnx_digest(proto, meta))})
    onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """model.pt, model.pt2 and model.onnx of Tiny, written as `transfer export` writes them."""
    folder = tmp_path_factory.mktemp("tiny-models")
    model = Tiny(CLASSES).eval()
    formats.write("torchscript", model, str(folder / "model.pt"))
    program = torch.export.export(model, (torch.zeros(2, 3, 8, 8, dtype=torch.uint8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    formats.write("pt2", model, str(folder / "model.pt2"), program)
    _tiny_onnx(folder / "model.onnx", model)
    write_image(folder / "photo.png", 1, size=(8, 8))
    return folder


# --- 1. code execution from a crafted model.pt2 ------------------------------------------------------

class Payload:
    """Unpickling this creates the sentinel file: what an attacker's os.system would do."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return open, (self.sentinel, "w")


def _pickled(sentinel: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(sentinel), buffer)
    return buffer.getvalue()


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a torch zip archive record by record; edit(records: dict name -> bytes) changes them."""
    with open(src, "rb") as f:
        reader = torch._C.PyTorchFileReader(f)
        records = {n: reader.get_record(n) for n in reader.get_all_records() if not n.startswith(".data/")}
    edit(records)
    with open(dst, "wb") as f:
        writer = torch._C.PyTorchFileWriter(f)
        for name, data in records.items():
            writer.write_record(name, data, len(data))
        writer.write_end_of_file()
    return dst


def _forge(src: Path, dst: Path, edit) -> Path:
    """_rewrite, then the seal recomputed over the edited records, as a forger can (it is a digest, not
    a signature): what then stands between the file and the runtime is the inspection alone."""
    def forged(records):
        edit(records)
        meta = json.loads(records[integrity.METADATA_RECORD])
        meta[integrity.CONTENT_DIGEST_KEY] = integrity.archive_digest(_Records(records), integrity.canonical_metadata(meta))
        records[integrity.METADATA_RECORD] = json.dumps(meta).encode()
    return _rewrite(src, dst, forged)


def _json_edit(records: dict, name: str, change) -> None:
    doc = json.loads(records[name])
    change(doc)
    records[name] = json.dumps(doc).encode()


def _pickled_weight(sentinel):
    def edit(records):
        config = json.loads(records["data/weights/model_weights_config.json"])
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        records["data/weights/" + entry["path_name"]] = _pickled(sentinel)
        records["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    return edit


def _pickled_constant(sentinel):
    def edit(records):
        records["data/constants/tensor_0"] = _pickled(sentinel)
        _json_edit(records, "data/constants/model_constants_config.json", lambda d: d["config"].update(
            {"c": {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}))
    return edit


def _pickled_sample_inputs(sentinel):  # torch retries a refused weights_only load without the restriction
    def edit(records):
        records["data/sample_inputs/model.pt"] = _pickled(sentinel)
    return edit


def _guard_code(sentinel):  # exec'd when the program is turned into a module
    def edit(records):
        _json_edit(records, "models/model.json",
                   lambda d: d.update(guards_code=[f"open({str(sentinel)!r}, 'w') is not None"]))
    return edit


def _shape_expression(sentinel):  # sympy.sympify evaluates the text as Python
    def edit(records):
        text = records["models/model.json"].decode()
        expression = json.dumps(f"__import__('builtins').open({str(sentinel)!r}, 'w') and Symbol('s0')")
        records["models/model.json"] = re.sub(r'"expr_str": "[^"]*"', lambda m: f'"expr_str": {expression}',
                                              text, count=1).encode()
    return edit


def _call_target(sentinel):  # a node calling os.system: torch.os is the os module
    def edit(records):
        text = records["models/model.json"].decode()
        assert '"torch.ops.aten.linear.default"' in text
        records["models/model.json"] = text.replace('"torch.ops.aten.linear.default"', '"torch.os.system"').encode()
    return edit


CRAFTS = [_pickled_weight, _pickled_constant, _pickled_sample_inputs, _guard_code, _shape_expression, _call_target]
RUNS_IN_PLAIN_TORCH = CRAFTS[:5]  # measured: _call_target is refused by torch.export.load's own verifier


@pytest.mark.parametrize("craft", CRAFTS)
def test_a_crafted_model_pt2_runs_no_code_and_is_refused_in_one_line(models, tmp_path, craft):
    """Each craft is re-sealed (_forge), so the refusal is the inspection's, not the seal's."""
    sentinel = tmp_path / "sentinel"
    evil = _forge(models / "model.pt2", tmp_path / "evil.pt2", craft(sentinel))
    with pytest.raises(InputFileError, match="is refused unloaded"):
        pipeline.load_model(evil, "cpu")
    assert not sentinel.exists()
    assert_one_line_error(run_cli("predict", evil, models / "photo.png"), "evil.pt2 is refused unloaded")
    assert not sentinel.exists()


def _plain_torch_load(path: Path) -> None:
    """What a user of torch.export alone does with a model.pt2: load it and run it."""
    try:
        torch.export.load(str(path)).module()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))  # guard code runs at the call
    except Exception:  # noqa: BLE001 - most payloads fail the load after running: what they loaded is no tensor
        pass


@pytest.mark.parametrize("craft", RUNS_IN_PLAIN_TORCH)
def test_the_crafted_pt2_does_run_code_in_plain_torch_export_load(models, tmp_path, monkeypatch, craft):
    """The positive controls of the test above: each of these crafts does run its payload in plain
    torch.export (load, then call: so the docs say it is not for files from strangers), and in
    `pipeline.load_model` with the inspection switched off (the seal, recomputed by the forger, does
    not stop it). Guard code runs at the first call of the whole program (`transfer predict` runs the
    file's parts, which skip it; `model(images)` runs it)."""
    sentinel = tmp_path / "sentinel"
    evil = _forge(models / "model.pt2", tmp_path / "evil.pt2", craft(sentinel))
    _plain_torch_load(evil)
    assert sentinel.exists()
    sentinel.unlink()
    monkeypatch.setattr(integrity, "check_pt2_archive", lambda f, shown: torch._C.PyTorchFileReader(f))
    try:
        pipeline.load_model(evil, "cpu")(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))  # the whole file, guard and all
    except InputFileError:  # "... is not a torch.export program", after the payload ran
        pass
    assert sentinel.exists()


def test_a_call_target_outside_aten_is_refused_by_torch_itself_too(models, tmp_path, monkeypatch):
    """The one craft without a positive control: torch.export.load resolves the target (torch.os.system
    is os.system) but its verifier refuses any call target that is not an operator before the graph
    can run, in plain torch as in our loader without the inspection (measured with torch 2.x); the
    inspection refuses it anyway, in case a torch version verifies less."""
    evil = _forge(models / "model.pt2", tmp_path / "evil.pt2", _call_target(tmp_path / "sentinel"))
    with pytest.raises(Exception, match="<built-in function system>' is not an allowed operator type"):
        torch.export.load(str(evil))
    monkeypatch.setattr(integrity, "check_pt2_archive", lambda f, shown: torch._C.PyTorchFileReader(f))
    with pytest.raises(InputFileError, match="is not a torch.export program"):  # torch's refusal, in our words
        pipeline.load_model(evil, "cpu")


def test_an_untouched_copy_of_the_archive_loads(models, tmp_path):
    """The inspection refuses what was crafted, not what torch writes (and _forge's seal is valid)."""
    same = _forge(models / "model.pt2", tmp_path / "same.pt2", lambda records: None)
    assert pipeline.load_model(same, "cpu").classes == CLASSES


@pytest.mark.parametrize("name", ["model.pt", "model.pt2", "model.onnx"])
def test_a_model_loaded_again_is_not_read_again_but_always_checked(models, tmp_path, name):
    """formats.load keeps loaded runtimes by their verified content (while held, and the last one): a copy of a
    loaded file gets the same runtime back (model.pt2 takes 10-20 s to deserialize), an edited copy is still
    refused, and a model nobody holds is let go."""
    first = pipeline.load_model(models / name, "cpu")
    shutil.copy(models / name, tmp_path / name)
    assert pipeline.load_model(tmp_path / name, "cpu").runner is first.runner
    edited = _edit_metadata(models / name, tmp_path / f"edited-{name}", lambda m: m.update(classes=["cnts", "bees"]))
    with pytest.raises(InputFileError, match="damaged or was edited"):
        pipeline.load_model(edited, "cpu")
    kept = weakref.ref(first.runner)
    del first
    pipeline.load_model(models / ("model.onnx" if name != "model.onnx" else "model.pt"), "cpu")  # the last one now
    gc.collect()
    assert kept() is None  # a model nobody holds is not kept once another was loaded after it


# --- 2. tampered class names, in every format ----------------------------------------------------------

def _edit_metadata(path: Path, dst: Path, change) -> Path:
    """The file with its transfer.json changed (and nothing else)."""
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path))
        for prop in proto.metadata_props:
            if prop.key == formats.METADATA_KEY:
                meta = json.loads(prop.value)
                change(meta)
                prop.value = json.dumps(meta)
        onnx.save(proto, str(dst))
        return dst

    def edit(records):
        _json_edit(records, "extra/transfer.json", change)
    return _rewrite(path, dst, edit)


TAMPERS = {
    "a renamed class": lambda m: m.update(classes=["cnts", "bees"]),
    "swapped classes": lambda m: m.update(classes=["bees", "ants"]),
    "other preprocessing": lambda m: m["preprocessing"].update(resize=9),
    "the digest key renamed": lambda m: m.update(sha256=m.pop(integrity.CONTENT_DIGEST_KEY)),
    "the version removed": lambda m: m.pop("format_version"),
}


@pytest.mark.parametrize("name", ["model.pt", "model.pt2", "model.onnx"])
def test_tampered_metadata_is_refused_in_one_line_in_every_format(models, tmp_path, name):
    assert pipeline.load_model(models / name, "cpu").classes == CLASSES
    ran = run_cli("predict", models / name, models / "photo.png")
    assert ran.code == 0 and re.search(r"ants 1\.000", ran.out), ran.out + ran.err
    for tamper, change in TAMPERS.items():
        edited = _edit_metadata(models / name, tmp_path / f"edited-{name}", change)
        with pytest.raises(InputFileError, match="damaged or was edited|older `transfer export`"):
            pipeline.load_model(edited, "cpu")
        result = run_cli("predict", edited, models / "photo.png")
        assert_one_line_error(result, f"edited-{name}")
        assert "cnts" not in result.out and "1.000" not in result.out, tamper


def test_model_pt_classes_attribute_must_agree_with_its_metadata(models, tmp_path):
    """model.classes is the TorchScript attribute users read: an archive whose pickled attribute says
    other names than its metadata (re-sealed, as a careful forger would) is refused."""
    def edit(records):
        records["data.pkl"] = records["data.pkl"].replace(b"ants", b"cnts")

    forged = _forge(models / "model.pt", tmp_path / "forged.pt", edit)
    assert torch.jit.load(str(forged)).classes == ["cnts", "bees"]
    with pytest.raises(InputFileError, match="classes attribute .* disagrees with its metadata"):
        pipeline.load_model(forged, "cpu")


class _Records:
    """A dict of records with the two methods of torch's archive reader that the digest uses."""

    def __init__(self, records: dict):
        self.records = records

    def get_all_records(self):
        return list(self.records)

    def get_record(self, name):
        return self.records[name]


def test_an_onnx_model_with_external_data_is_refused_unread(models, tmp_path):
    import onnx

    proto = onnx.load(str(models / "model.onnx"))
    weight = next(t for t in proto.graph.initializer if t.name == "w")
    weight.data_location = onnx.TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    weight.ClearField("raw_data")
    onnx.save(proto, str(tmp_path / "external.onnx"))
    with pytest.raises(InputFileError, match="external data"):
        pipeline.load_model(tmp_path / "external.onnx", "cpu")


# --- 3-5. names that attack spreadsheets, Markdown viewers and terminals ------------------------------

FORMULA = "=cmd|' -C calc'!A0"
HTML = "<img src=x onerror=alert(1)>"
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x1b[1A\r"


def test_prediction_csv_cells_are_never_formulas(tmp_path):
    classes = ["=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0"]
    formats.write("torchscript", Tiny(classes).eval(), str(tmp_path / "hostile.pt"))
    photo = write_image(tmp_path / f"{FORMULA}.png", 2, size=(8, 8))
    (tmp_path / "@SUM(1+1).png").write_bytes(photo.read_bytes())
    result = run_cli("predict", "hostile.pt", f"{FORMULA}.png", "@SUM(1+1).png", "--out", "p.csv", cwd=tmp_path)
    assert result.code == 0, result.err
    import csv

    rows = list(csv.reader((tmp_path / "p.csv").open()))
    cells = [c for row in rows[1:] for c in row if c and not re.fullmatch(r"[0-9.]+", c)]
    assert len(cells) == 6 and all(c[0] not in "=+-@\t\r" for c in cells), cells
    # lossless: exactly one ' added, in front of what was there
    assert {f"'{FORMULA}.png", "'@SUM(1+1).png", "'" + classes[0], "'" + classes[1]} == set(cells)


def _outside_code_spans(markdown: str) -> str:
    """The text of a Markdown file but its code spans (shown literally by every viewer)."""
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", markdown)


def test_reports_escape_html_and_markdown_in_names(tmp_path, monkeypatch):
    X, y, _ = blobs(12, 2, 4)
    cache = make_cache(tmp_path / f"=1+1 {HTML}.h5", X, y, [HTML, "<script>alert(1)</script>"],
                       splits=["train", "val", "test"] * 8)  # a file name a spreadsheet would run, too
    result = pipeline.fit(cache, tmp_path / "run", C=1.0)
    report = (Path(result.run_dir) / "report.md").read_text()
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in report  # the class name, shown as text
    assert "<" not in _outside_code_spans(report)  # no tag anywhere a viewer would render one
    monkeypatch.chdir(tmp_path)  # the cache named relatively: its results.csv cell starts with its name
    experiment = pipeline.run_experiment(pipeline.ExperimentRequest.from_text(
        [cache.name], ["C=1"], "1.0", "standard", None, out=str(tmp_path / "exp"), command=f"x {HTML}", jobs=1))
    summary = (Path(experiment.out) / "summary.md").read_text()
    assert "<" not in _outside_code_spans(summary) and "&lt;img" in summary, summary
    import csv

    cells = [c for row in csv.reader((Path(experiment.out) / "results.csv").open()) for c in row]
    assert all(not c.startswith("=") for c in cells)
    assert f"'=1+1 {HTML}.h5" in cells  # the cache's cell: neutralized by one ' in front, not dropped


def test_escape_sequences_in_names_are_printed_escaped(models, tmp_path):
    folder = tmp_path / "in"
    photo = write_image(folder / f"a{ESCAPES}.png", 3, size=(8, 8))
    result = run_cli("predict", models / "model.pt", photo)
    assert result.code == 0 and "\x1b" not in result.out and "\x07" not in result.out and "\r" not in result.out
    assert "\\x1b[2J\\x1b]0;pwned\\x07" in result.out
    missing = run_cli("predict", models / "model.pt", folder / f"gone{ESCAPES}.png")
    assert_one_line_error(missing, "\\x1b[2J")
    assert "\x1b" not in missing.err and "\r" not in missing.err
    from pipeline.progress import Bars

    shown = io.StringIO()
    Bars(file=shown).note(f"skipped {ESCAPES}")  # the notes above a progress bar (extract's, fit's)
    assert shown.getvalue() == "skipped \\x1b[2J\\x1b]0;pwned\\x07\\x1b[1A\\x0d\n"
