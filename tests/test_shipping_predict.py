"""pipeline/shipping/predict.py and `transfer predict`: files and folders in, top-k out, bad files listed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_one_line_error, run_cli, write_image


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    write_image(folder / "x.png", 1)
    write_image(folder / "sub" / "y.jpg", 2, size=(90, 300))
    (folder / "notes.txt").write_text("ignored: not an image name")
    (folder / "broken.png").write_bytes(b"\x89PNG but no")
    single = write_image(tmp_path / "single.png", 3)
    return folder, single


def test_files_and_folders_with_errors_listed_and_run_continues(three_run, inputs, tmp_path):
    folder, single = inputs
    out = tmp_path / "p.csv"
    result = run_cli("predict", three_run / "model.pt", single, folder, "--out", out, "--top-k", "2")
    assert result.code == 0, result.err
    rows = list(csv.DictReader(out.open()))
    # folders expand in the extraction's order: whole relative paths sorted as bytes (sub/y.jpg < x.png)
    assert [r["path"].split("/")[-1] for r in rows] == ["single.png", "broken.png", "y.jpg", "x.png"]
    assert rows[1]["error"] == "not a recognised image format" and rows[1]["label_1"] == ""
    good = [r for r in rows if not r["error"]]
    for r in good:
        assert r["label_1"] in {"a", "b", "c"} and r["label_2"] in {"a", "b", "c"}
        assert float(r["prob_1"]) >= float(r["prob_2"])
    assert "wrote 4 predictions" in result.out and "(1 could not be read)" in result.out
    assert "img/s" in result.err  # the progress bar with its rate


def test_json_output_and_terminal_table(three_run, inputs, tmp_path):
    folder, single = inputs
    out = tmp_path / "p.json"
    assert run_cli("predict", three_run / "model.pt", single, "--out", out).code == 0
    doc = json.loads(out.read_text())
    assert doc[0]["path"] == str(single) and len(doc[0]["predictions"]) == 3 and doc[0]["error"] is None
    assert abs(sum(p["probability"] for p in doc[0]["predictions"]) - 1) < 1e-5
    table = run_cli("predict", three_run / "model.pt", folder)
    assert table.code == 0
    assert "broken.png" in table.out and "error: not a recognised image format" in table.out
    assert "1 of 3 files were not classified: 1 could not be read" in table.out


def test_predict_bad_inputs(three_run, inputs, tmp_path):
    folder, single = inputs
    model = three_run / "model.pt"
    assert_one_line_error(run_cli("predict", model, tmp_path / "missing.png"), "does not exist")
    assert_one_line_error(run_cli("predict", model, single, "--top-k", "4"), "(--top-k) 4 is more than the model's 3 classes")
    for bad in ("0", "-1"):  # not silently the default, and refused before any progress is drawn
        refused = run_cli("predict", model, single, "--top-k", bad)
        assert_one_line_error(refused, "top_k (--top-k) must be")
        assert "img/s" not in refused.err
    assert_one_line_error(run_cli("predict", model, single, "--batch-size", "0"), "batch_size (--batch-size) must be")
    assert_one_line_error(run_cli("predict", tmp_path / "none.pt", single), "does not exist")
    cache = json.loads((three_run / "head.json").read_text())["provenance"]["cache"]
    assert_one_line_error(run_cli("predict", cache, single), "is not a TorchScript model")  # predict on a cache
    other = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(other, tmp_path / "other.pt")
    assert_one_line_error(run_cli("predict", tmp_path / "other.pt", single), "not one written by `transfer export`")
    assert_one_line_error(run_cli("predict", model, single, "--out", tmp_path / "p.txt"), "expected a .csv or .json")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("predict", model, tmp_path / "empty"), "no image files found")


def test_folders_are_walked_like_extraction_walks_them(tmp_path):
    """One walker: byte order of names (not text order) and no hidden files, as `extract` lists them."""
    import os

    from pipeline.images import scan_image_folder
    from pipeline.shipping.predict import list_inputs

    folder = tmp_path / "k"
    for raw in (b"\xc3\xa9.png", b"\x80.png", b"z.png", b".hidden.png"):  # "é" sorts after b"\x80" as bytes
        write_image(Path(os.fsdecode(os.fsencode(str(folder)) + b"/" + raw)), 1)
    listed = [os.fsencode(p)[len(os.fsencode(str(folder))) + 1:] for p in list_inputs([str(folder)])]
    assert listed == [b"z.png", b"\x80.png", b"\xc3\xa9.png"]
    extracted = scan_image_folder(tmp_path).paths
    assert [os.fsencode(p)[2:] for p in extracted] == listed


def test_an_unwritable_destination_is_refused_before_any_image_is_read(three_run, inputs, tmp_path, monkeypatch):
    import os

    import importlib

    predict_module = importlib.import_module("pipeline.shipping.predict")
    folder, single = inputs
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real_access(p, mode))
    monkeypatch.setattr(predict_module, "decode_image", lambda p: pytest.fail("an image was read"))
    (tmp_path / "ro").mkdir()
    result = run_cli("predict", three_run / "model.pt", single, "--out", tmp_path / "ro" / "p.csv")
    assert_one_line_error(result, "is not writable; choose another --out")


def test_predict_fails_when_no_file_could_be_read(three_run, tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg").write_bytes(b"")
    result = run_cli("predict", three_run / "model.pt", tmp_path)
    assert_one_line_error(result, "none of the 2 files could be read as an image")
    assert "error: not a recognised image format" in result.out  # each file's reason is still listed


def test_a_model_that_fails_on_every_image_is_said_to_have_failed_not_the_files(three_run, inputs, monkeypatch):
    """The files were read: the summary and the one-line error name the model, not the decoder."""
    from pipeline.shipping import formats

    def fails(self, items):
        raise RuntimeError("Failed to allocate memory")

    monkeypatch.setattr(formats.TorchScriptRunner, "_run", fails)
    folder, single = inputs
    result = run_cli("predict", three_run / "model.pt", single)
    assert_one_line_error(result, "none of the 1 files was classified (the model failed on 1); e.g. the model failed "
                                  "on this image: RuntimeError: Failed to allocate memory")
    table = run_cli("predict", three_run / "model.pt", folder)  # one unreadable file, two the model failed on
    assert "3 of 3 files were not classified: 1 could not be read, the model failed on 2" in table.out
    assert_one_line_error(table, "none of the 3 files was classified (1 could not be read, the model failed on 2)")


def test_loading_model_pt_surfaces_no_torchscript_deprecation_warning(binary_run, tmp_path):
    """torch marks torch.jit deprecated (a FutureWarning on every torch.jit.load); our loading code
    keeps it from the user, who is told in the README that model.pt keeps working."""
    import warnings

    import pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = pipeline.load_model(binary_run / "model.pt")
        pipeline.predict(model, [write_image(tmp_path / "x.png", 5)], progress=False)
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:  # the check sees the warning where there is one
        warnings.simplefilter("always")
        torch.jit.load(str(binary_run / "model.pt"))
    assert any(issubclass(w.category, FutureWarning) and "torch.jit.load" in str(w.message) for w in caught)


class _Recorder:
    """A stand-in for a loaded model file: `crops` like model.pt (each image prepared to a 4x4 crop, crops of any
    sizes batch together) or not, like model.onnx (whole images, batched by size). p(image) = (m, 1 - m), m the
    mean of its first pixel's channels / 255; records each batch; fails on images `fail_width` wide."""

    def __init__(self, crops: bool, fail_width: int | None = None):
        from pipeline.shipping.formats import Runner

        self.crops, self.fail_width, self.batches, self.base = crops, fail_width, [], Runner
        self.format = "torchscript" if crops else "onnx"

    def images(self, x):
        return self.run(list(x))

    def prepare(self, image):
        if self.fail_width is not None and image.shape[2] == self.fail_width and self.crops:
            return image[:, :4, :4].clone().fill_(255)  # a crop that marks the failing image
        return image[:, :4, :4].contiguous() if self.crops else image.contiguous()

    def key(self, item):
        return None if self.crops else tuple(item.shape)

    def run(self, items):
        return self.base.run(self, items)

    def _run(self, items):
        import numpy as np

        self.batches.append([tuple(i.shape) for i in items])
        bad = [i for i in items if (i.shape[2] == self.fail_width if not self.crops else bool((i == 255).all()))]
        if bad:
            raise RuntimeError("Failed to allocate memory for requested buffer of size 123456")
        m = np.array([float(i[:, 0, 0].float().mean()) / 255 for i in items])
        return np.stack([m, 1 - m], axis=1).astype(np.float32)


def _mixed_sizes(tmp_path, sizes):
    return [write_image(tmp_path / f"im{k}.png", k, size=s) for k, s in enumerate(sizes)]


def _predict_with(runner, files, **options):
    from pipeline.shipping.predict import Model, predict

    return predict(Model("fake.pt", runner, ["x", "y"], {}, torch.device("cpu")), [str(f) for f in files],
                   top_k=2, **options)


def test_images_of_different_sizes_share_one_batch_and_keep_their_order(tmp_path):
    import numpy as np
    from PIL import Image

    sizes = [(48, 36), (97, 61), (20, 300), (300, 20), (48, 36)]
    files = _mixed_sizes(tmp_path, sizes)
    runner = _Recorder(crops=True)
    got = _predict_with(runner, files, batch_size=16)
    assert len(runner.batches) == 1 and len(runner.batches[0]) == 5  # one forward pass, no per-size loop
    for prediction, f in zip(got, files):
        m = np.asarray(Image.open(f).convert("RGB"))[0, 0].mean() / 255
        assert prediction.path == str(f) and prediction.error is None
        assert dict(zip(prediction.labels, prediction.probabilities)) == pytest.approx({"x": m, "y": 1 - m}, abs=1e-6)
    runner = _Recorder(crops=True)
    _predict_with(runner, files, batch_size=2)
    assert [len(b) for b in runner.batches] == [2, 2, 1]


def test_whole_images_are_batched_by_size_within_the_memory_budget(tmp_path):
    sizes = [(200, 100)] * 6 + [(100, 200)] * 3 + [(400, 300)]  # 60 kB each, and one 360 kB image
    files = _mixed_sizes(tmp_path, sizes)
    runner = _Recorder(crops=False)
    got = _predict_with(runner, files, batch_size=16, batch_bytes=200_000)
    assert all(p.error is None for p in got) and [p.path for p in got] == [str(f) for f in files]
    for batch in runner.batches:
        assert len(set(batch)) == 1  # one size per call of the whole file
        assert len(batch) == 1 or sum(3 * h * w for _, h, w in batch) <= 200_000, runner.batches
    assert sorted(len(b) for b in runner.batches if b[0] == (3, 100, 200)) != [6]  # 360 kB of them: split
    assert [(3, 300, 400)] in runner.batches  # larger than the budget alone: run alone, not refused


@pytest.mark.parametrize("crops", [True, False])
def test_one_image_the_model_fails_on_is_that_images_error(tmp_path, crops):
    files = _mixed_sizes(tmp_path, [(48, 36), (13, 36), (48, 36), (48, 36)])
    got = _predict_with(_Recorder(crops=crops, fail_width=13), files, batch_size=4)
    assert [p.error is None for p in got] == [True, False, True, True]
    assert got[1].error.startswith("the model failed on this image: RuntimeError: Failed to allocate memory")
    assert got[0].labels and got[2].labels and not got[1].labels
