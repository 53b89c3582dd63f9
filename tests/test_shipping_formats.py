"""pipeline/shipping/formats.py: model.onnx and model.pt2 beside model.pt - checked at export, same predictions,
model.onnx usable without torch, model.pt2 with torch.export alone."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.shipping import formats
from pipeline.errors import TransferError
from tests.conftest import HYMENOPTERA, ROOT, assert_one_line_error, needs_hymenoptera, run_cli, subset_cache, write_image


def _transfer_json_of_model_pt(path: Path) -> dict:
    extra = {"transfer.json": ""}
    torch.jit.load(path, _extra_files=extra)
    return json.loads(extra["transfer.json"])


def test_onnx_and_pt2_are_checked_and_carry_the_same_metadata(shipped):
    import onnx

    parity = json.loads((shipped / "parity.json").read_text())
    for fmt in ("onnx", "pt2"):
        cached, e2e = parity[fmt]["cached_features"], parity[fmt]["end_to_end"]
        assert parity[fmt]["file"] == f"model.{fmt}"
        assert cached["rows"] == 27 and cached["max_abs_diff"] <= 1e-5 and cached["argmax_identical"]
        assert e2e["images"] > 0 and e2e["max_abs_diff"] <= e2e["tolerance"] and e2e["argmax_identical"]
    def same(meta: dict) -> dict:  # the same metadata, but each file's digest of its own tensors
        assert len(meta.pop(formats.DIGEST_KEY)) == 64
        return meta

    expected = same(_transfer_json_of_model_pt(shipped / "model.pt"))
    proto = onnx.load(shipped / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert same(json.loads({p.key: p.value for p in proto.metadata_props}["transfer.json"])) == expected
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]  # N, H and W dynamic
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == ["batch", 3]
    extra = {"transfer.json": ""}
    with formats._expressions_parsed_once():  # the program plain torch.export.load reads, 4x sooner (tested below)
        program = torch.export.load(shipped / "model.pt2", extra_files=extra)
    assert same(json.loads(extra["transfer.json"])) == expected
    onnx_model = formats.load(str(shipped / "model.onnx"), torch.device("cpu"))[0]
    model_pt = torch.jit.load(shipped / "model.pt")
    # a batch and sizes the export never saw; 1000x300 cuts the height by more than twice the width,
    # so Pillow 13 resamples vertically first: the other branch of the graph's torch.cond
    for shape in [(3, 3, 97, 301), (1, 3, 1000, 300)]:
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
        with torch.inference_mode():
            expected = model_pt(x).numpy()
            np.testing.assert_allclose(program.module()(x).numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(onnx_model.images(x), expected, atol=1e-5)


@pytest.fixture(scope="module")
def held(shipped) -> dict:
    """The three shipped files loaded once and held for this file's tests: `formats.load` gives a held model's
    runtime back to the CLI and the library (model.pt2 takes 10-20 s to deserialize)."""
    import pipeline

    return {name: pipeline.load_model(shipped / name, "cpu") for name in ("model.pt", "model.onnx", "model.pt2")}


def test_predict_gives_the_same_output_for_all_three_formats(shipped, held, three_run, tmp_path):
    images = sorted((three_run.parent / "three-images" / "test").rglob("*.png"))
    images += [write_image(tmp_path / "tall.png", 5, size=(90, 300)), write_image(tmp_path / "wide.png", 6, (301, 177))]
    docs = {}
    for name in ("model.pt", "model.onnx", "model.pt2"):
        out = tmp_path / f"{name}.json"
        result = run_cli("predict", shipped / name, *images, "--out", out, "--top-k", "3", "--batch-size", "4")
        assert result.code == 0, result.err
        docs[name] = json.loads(out.read_text())
    reference = docs.pop("model.pt")
    for name, doc in docs.items():
        assert [r["path"] for r in doc] == [r["path"] for r in reference]
        for row, ref in zip(doc, reference):
            assert [p["label"] for p in row["predictions"]] == [p["label"] for p in ref["predictions"]], name
            np.testing.assert_allclose([p["probability"] for p in row["predictions"]],
                                       [p["probability"] for p in ref["predictions"]], atol=1e-5, err_msg=name)


def _readme_block(heading: str) -> str:
    readme = (ROOT / "docs" / "export.md").read_text()
    return re.search(r"```python\n(.*?)```", readme[readme.index(heading):], re.S).group(1)


def test_model_onnx_runs_where_torch_cannot_be_imported(shipped, tmp_path):
    """The README's onnxruntime example, run as written in a process where `import torch` fails."""
    shutil.copy(shipped / "model.onnx", tmp_path / "model.onnx")
    write_image(tmp_path / "photo.jpg", 7, size=(333, 250))
    guard = ("import sys\nsys.modules['torch'] = None  # `import torch` now raises ImportError\n"
             "try:\n    import torch\n    raise SystemExit('torch imported')\nexcept ImportError:\n    pass\n")
    out = subprocess.run([sys.executable, "-c", guard + _readme_block("**model.onnx**, in Python")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    label, probability = out.stdout.split()
    from pipeline.images import decode_image
    from pipeline.shipping.formats import image_tensor

    with torch.inference_mode():
        p = torch.jit.load(shipped / "model.pt")(image_tensor(decode_image(str(tmp_path / "photo.jpg")))[None])[0]
    assert label == ["a", "b", "c"][int(p.argmax())]
    assert float(probability) == pytest.approx(float(p.max()), abs=1e-5)


def test_the_readme_pt2_example_runs_as_written(shipped, tmp_path, monkeypatch):
    shutil.copy(shipped / "model.pt2", tmp_path / "model.pt2")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(_readme_block("**model.pt2**, in Python"), scope)
    assert scope["probs"].shape == (2, 3) and scope["classes"] == ["a", "b", "c"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_model_pt2_runs_on_cuda(shipped):
    import pipeline

    x = torch.randint(0, 256, (2, 3, 240, 320), dtype=torch.uint8)
    gpu, cpu = pipeline.load_model(shipped / "model.pt2", "cuda"), pipeline.load_model(shipped / "model.pt2", "cpu")
    np.testing.assert_allclose(gpu(x).numpy(), cpu(x).numpy(), atol=1e-3)


def _constant_onnx(path: str, k: int, metadata: str | None = None) -> None:
    """A valid ONNX model with the exported input and output that always answers class 0; with
    `metadata`, sealed as `transfer export` seals its files (so it loads, and is wrong)."""
    import onnx
    from onnx import TensorProto, helper

    from pipeline.shipping import integrity

    graph = helper.make_graph(
        [helper.make_node("Shape", ["images"], ["shape"], end=1),
         helper.make_node("Concat", ["shape", "k"], ["size"], axis=0),
         helper.make_node("ConstantOfShape", ["size"], ["zeros"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
         helper.make_node("Add", ["zeros", "first"], ["probabilities"])],
        "constant",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor("k", TensorProto.INT64, [1], [k]),
         helper.make_tensor("first", TensorProto.FLOAT, [k], [1.0] + [0.0] * (k - 1))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if metadata is not None:
        helper.set_model_props(proto, {formats.METADATA_KEY: integrity.seal(
            metadata, lambda meta: integrity.onnx_digest(proto, meta))})
    onnx.save(proto, path)


def _copy_run(run: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("model.pt", "head.pt", "parity.json"):
        (copy / name).unlink()
    return copy, sorted(p.name for p in copy.iterdir())


def test_a_model_onnx_that_disagrees_end_to_end_leaves_nothing(three_run, tmp_path, monkeypatch):
    """model.pt passes, model.onnx does not: the export stops and neither file nor parity.json is left."""
    from pipeline.shipping.export import export

    run, before = _copy_run(three_run, tmp_path)
    real_write = formats.write

    def wrong_onnx(fmt, model, path, program=None):
        if fmt != "onnx":
            return real_write(fmt, model, path, program)
        _constant_onnx(path, len(model.classes), model.metadata)

    monkeypatch.setattr(formats, "write", wrong_onnx)
    monkeypatch.setattr(formats, "image_program", lambda model: None)  # not needed by the stand-in
    with pytest.raises(TransferError, match="model.onnx on .* original images disagrees with scikit-learn"):
        export(run, formats=["torchscript", "onnx"])
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_format_whose_head_disagrees_is_not_written(three_run, tmp_path, monkeypatch):
    """Every format's own head (cut from its graph by its Runner) goes through one check,
    parity.format_on_features: shown on model.pt, the cheapest to write (model.pt2 and model.onnx start
    with a torch.export trace of ~25 s; the `shipped` fixture asserts their heads are cut out and checked)."""
    run, before = _copy_run(three_run, tmp_path)
    real = formats.TorchScriptRunner.probabilities  # the head's outputs swapped
    monkeypatch.setattr(formats.TorchScriptRunner, "probabilities", lambda self, x: real(self, x)[:, ::-1].copy())
    result = run_cli("export", run, "--format", "torchscript")
    assert_one_line_error(result, "the head in model.pt disagrees with scikit-learn")
    assert sorted(p.name for p in run.iterdir()) == before


def test_export_and_predict_bad_format_inputs(shipped, three_run, tmp_path):
    assert_one_line_error(run_cli("export", three_run, "--format", "onnx", "--out", tmp_path / "m.pt"),
                          "names one torchscript file but the format asked for is onnx")
    assert_one_line_error(run_cli("export", three_run, "--format", "tflite"), "tflite")
    image = write_image(tmp_path / "x.png", 1)
    (tmp_path / "fake.onnx").write_bytes(b"not a protobuf at all")
    assert_one_line_error(run_cli("predict", tmp_path / "fake.onnx", image),
                          "is not an ONNX model written by `transfer export`")
    _constant_onnx(str(tmp_path / "plain.onnx"), 3)
    assert_one_line_error(run_cli("predict", tmp_path / "plain.onnx", image),
                          "is an ONNX model but not one written by `transfer export`")
    shutil.copy(shipped / "model.onnx", tmp_path / "model.pt2")
    assert_one_line_error(run_cli("predict", tmp_path / "model.pt2", image), "is not a torch.export program (.pt2)")


def test_formats_are_parsed_by_name():
    assert formats.parse_formats("all") == ["torchscript", "onnx", "pt2"]
    assert formats.parse_formats(["pt2", "onnx"]) == ["onnx", "pt2"]
    assert [formats.format_of(p) for p in ("a/model.ONNX", "m.pt2", "m.pt", "cache.h5")] == \
        ["onnx", "pt2", "torchscript", "torchscript"]
    with pytest.raises(TransferError, match="expected torchscript, onnx, pt2 or all"):
        formats.parse_formats([])


@needs_hymenoptera
def test_real_photos_onnx_and_pt2_agree_with_model_pt(hymenoptera_lite0, tmp_path):
    """The proof on raw val photos (every 8th of 153; all of them: benchmarks/export_parity_real.py),
    pretrained EfficientNet-Lite0, head fitted on train only: model.onnx (onnxruntime) and model.pt2
    give model.pt's top-1 on every photo and max |dp| <= 1e-4. (The export's own checks are tested above.)"""
    import pipeline
    from pipeline import read_cache
    from pipeline.shipping.model import build_model
    from pipeline.images import decode_image
    from pipeline.shipping.formats import image_tensor

    info = read_cache(hymenoptera_lite0)
    train = subset_cache(hymenoptera_lite0, tmp_path / "train.h5", np.flatnonzero(info.split == "train"))
    model = build_model(pipeline.fit(train).head)
    program = formats.image_program(model)
    for fmt, suffix in formats.FORMATS.items():
        formats.write(fmt, model, str(tmp_path / f"model{suffix}"), program)
    models = {fmt: pipeline.load_model(tmp_path / f"model{suffix}", "cpu") for fmt, suffix in formats.FORMATS.items()}
    files = sorted((HYMENOPTERA / "val").rglob("*.*"))[::8]
    probs = {fmt: [] for fmt in models}
    for f in files:
        image = image_tensor(decode_image(str(f)))
        for fmt, loaded in models.items():
            probs[fmt].append(loaded.runner.run([loaded.runner.prepare(image)])[0])
    reference = np.array(probs.pop("torchscript"))
    truth = np.array([models["onnx"].classes.index(f.parent.name) for f in files])
    assert len(files) == 20 and (reference.argmax(1) == truth).mean() >= 0.9
    for fmt, p in probs.items():
        p = np.array(p)
        assert np.array_equal(p.argmax(1), reference.argmax(1)), fmt
        assert np.abs(p - reference).max() <= 1e-4, (fmt, np.abs(p - reference).max())


def test_fit_passes_its_format_option_to_export(tmp_path, monkeypatch):
    from tests.conftest import blobs, make_cache

    import pipeline

    X, y, classes = blobs(10, 2, 4)
    cache = make_cache(tmp_path / "c.h5", X, y, classes)

    def recorder(run_dir, out=None, formats="torchscript", **options):
        raise TransferError(f"export asked for {formats}")

    monkeypatch.setattr(pipeline, "export", recorder)
    result = run_cli("fit", cache, "--out", tmp_path / "run", "--C", "1", "--format", "onnx", "--format", "pt2")
    assert_one_line_error(result, "export asked for ['onnx', 'pt2']")


def test_damaged_onnx_and_pt2_files_are_refused_when_loaded(shipped, tmp_path):
    """The same weights digest as model.pt's (tests/test_export.py), for the two other formats."""
    import onnx

    import pipeline
    from pipeline.errors import InputFileError
    from tests.test_shipping_export import _damage

    onnx_copy, pt2_copy = tmp_path / "model.onnx", tmp_path / "model.pt2"
    shutil.copy(shipped / "model.onnx", onnx_copy)
    shutil.copy(shipped / "model.pt2", pt2_copy)
    raw = max((i.raw_data for i in onnx.load(str(onnx_copy)).graph.initializer), key=len)
    data = bytearray(onnx_copy.read_bytes())
    at = data.find(raw) + len(raw) // 2
    assert len(raw) > 4000 and data.find(raw) > 0
    data[at:at + 1000] = bytes(1000)
    onnx_copy.write_bytes(bytes(data))
    _damage(pt2_copy)
    for path in (onnx_copy, pt2_copy):
        with pytest.raises(InputFileError, match="is damaged or was edited: its weights, graph, class names"):
            pipeline.load_model(path, "cpu")
    # and the real exported files with one class renamed in their metadata (tests/test_security.py builds tiny ones)
    from tests.test_security import _edit_metadata

    for name in ("model.pt", "model.onnx", "model.pt2"):
        edited = _edit_metadata(shipped / name, tmp_path / f"renamed-{name}", lambda m: m["classes"].__setitem__(0, "x"))
        with pytest.raises(InputFileError, match="is damaged or was edited"):
            pipeline.load_model(edited, "cpu")


def test_evaluate_gives_the_same_scores_with_all_three_formats(shipped, held, three_run):
    """`transfer evaluate` (pipeline/shipping/evaluate.py) with model.pt, model.onnx and model.pt2 on the
    same labelled images: the same predictions, so the same scores."""
    import pipeline

    found = {name: pipeline.evaluate(shipped / name, three_run.parent / "three-images", split="test", device="cpu")
             for name in ("model.pt", "model.onnx", "model.pt2")}
    reference = found.pop("model.pt")
    assert reference.scores["n"] == 9
    for name, other in found.items():
        assert other.paths == reference.paths and np.array_equal(other.proba.argmax(1), reference.proba.argmax(1))
        np.testing.assert_allclose(other.proba, reference.proba, atol=1e-5, err_msg=name)
        assert other.scores["top1"] == reference.scores["top1"]
        assert other.scores["confusion_matrix"] == reference.scores["confusion_matrix"]
        assert other.scores["log_loss"] == pytest.approx(reference.scores["log_loss"], abs=1e-5), name


# predict's memory, here beside the files it loads: they are built once, and this file runs on one worker
@pytest.fixture(scope="module")
def large_inputs(tmp_path_factory) -> dict:
    """The hostile and the large: a 1x3000 and a 3000x1 PNG, one 24 MP photo, eight 12 MP photos (hard links)."""
    import os

    from PIL import Image

    folder = tmp_path_factory.mktemp("large")
    Image.fromarray(np.full((3000, 1, 3), 90, np.uint8)).save(folder / "tall.png")
    Image.fromarray(np.full((1, 3000, 3), 90, np.uint8)).save(folder / "wide.png")
    for name, (h, w) in (("p24.jpg", (4000, 6000)), ("p12.jpg", (3000, 4000))):
        y, x = np.mgrid[0:h, 0:w]
        Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(folder / name, quality=90)
    for k in range(8):
        os.link(folder / "p12.jpg", folder / f"p12_{k}.jpg")
    return {"strips": [folder / "tall.png", folder / "wide.png"], "24 MP": [folder / "p24.jpg"],
            "8 x 12 MP": [folder / f"p12_{k}.jpg" for k in range(8)]}


# Predicts each case under an 8 GB address-space limit and says its peak RSS: VmHWM (not ru_maxrss, which
# Linux carries over fork and exec from the large test worker). One process per format loads the model once
# (model.pt2 takes 10-20 s to load): the first case's peak covers the imports and the load too, as a
# `transfer predict` process's would; before each later case the peak is reset (writing 5 to
# /proc/self/clear_refs) to the memory still held, so what an earlier case left counts against the next.
PEAK_RSS = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
import pipeline
model = pipeline.load_model(sys.argv[1], "cpu")
for i, (case, files) in enumerate(json.loads(sys.argv[2])):
    if i:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    said = pipeline.predict(model, files, progress=False)
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]
    print(json.dumps({"case": case, "peak_kb": int(peak), "said": len(said), "errors": [p.error for p in said if p.error]}))
"""

LIMITS_GB = {"strips": 1.5, "24 MP": 1.5, "8 x 12 MP": 2.0}


@pytest.mark.parametrize("name", ["model.pt", "model.onnx", "model.pt2"])
def test_predict_memory_is_bounded_by_the_output_not_the_input(shipped, large_inputs, name):
    """#23 item 5: peak RSS of `pipeline.predict` (what `transfer predict` calls) in a process of its own, under an
    8 GB address-space limit so that a regression fails instead of taking the machine down: strips and one 24 MP
    photo under 1.5 GB, eight 12 MP photos at the default batch size under 2 GB."""
    cases = [[case, [str(f) for f in large_inputs[case]]] for case in LIMITS_GB]
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(shipped / name), json.dumps(cases)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [s["case"] for s in said] == list(LIMITS_GB), proc.stdout
    for s in said:
        assert s["said"] == len(large_inputs[s["case"]]) and not s["errors"], s
        peak = s["peak_kb"] / 2**20  # GiB
        assert peak < LIMITS_GB[s["case"]], f"{name} on {s['case']}: peak RSS {peak:.2f} GiB (limit {LIMITS_GB[s['case']]})"


def test_a_pt2_loads_as_the_same_program_with_each_shape_expression_parsed_once(tmp_path, monkeypatch):
    """model.pt2 loads with each distinct symbolic shape expression parsed once: the program read back is
    the one plain `torch.export.load` reads (graph, every node's shape, ranges, outputs), with far fewer
    parses (the exact resize repeats its expressions)."""
    from torch._export.serde.serialize import GraphModuleDeserializer

    from pipeline.resize import resize_crop

    class Resized(torch.nn.Module):
        def forward(self, x):
            return resize_crop(x, 12, 10, True, False, False).float().mean(dim=(2, 3))

    dims = {0: torch.export.Dim("n", min=1), 2: torch.export.Dim("h", min=1, max=4096),
            3: torch.export.Dim("w", min=1, max=4096)}
    with torch.no_grad():
        program = torch.export.export(Resized(), (torch.zeros(2, 3, 30, 40, dtype=torch.uint8),), dynamic_shapes=(dims,))
    path = tmp_path / "resized.pt2"
    torch.export.save(program, path)
    original, calls = GraphModuleDeserializer._parse_sym_expr, []

    def counted(self, expr, hint=None):
        calls.append(expr)
        return original(self, expr, hint)

    monkeypatch.setattr(GraphModuleDeserializer, "_parse_sym_expr", counted)
    plain = torch.export.load(path)
    parsed_plainly = len(calls)
    calls.clear()
    with formats._expressions_parsed_once():
        once = torch.export.load(path)
    assert GraphModuleDeserializer._parse_sym_expr is counted  # put back as it was
    assert 0 < len(calls) < parsed_plainly / 2, (len(calls), parsed_plainly)

    def described(p):
        return (p.graph_module.code, [str(n.meta.get("val")) for n in p.graph.nodes],
                {str(k): str(v) for k, v in p.range_constraints.items()})

    assert described(once) == described(plain)
    for shape in [(1, 3, 7, 50), (3, 3, 61, 9)]:
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        assert torch.equal(once.module()(x), plain.module()(x))
