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
    assert "wrote 4 predictions" in result.out and "1 unreadable" in result.out
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
    assert "1 of 3 files could not be read" in table.out


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
