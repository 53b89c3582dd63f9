"""pipeline/shipping/evaluate.py (+ runs.evaluate, reports/evaluation.py) and `transfer evaluate`: a
model file scored on labelled images gives the scores fit reports for the same images."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

import pipeline
from tests.conftest import HYMENOPTERA, assert_one_line_error, needs_hymenoptera, run_cli, write_image


def images_of(run):
    return run.parent / f"{run.name.removesuffix('-run')}-images"


def test_evaluate_gives_the_scores_fit_reported_on_the_same_images(binary_run, tmp_path):
    """binary_run: fp32 features, fitted with a test split; model.pt on the raw test images."""
    out = tmp_path / "ev"
    result = run_cli("evaluate", binary_run / "model.pt", images_of(binary_run), "--split", "test", "--out", out)
    assert result.code == 0, result.err
    fitted = json.loads((binary_run / "metrics.json").read_text())["scores"]
    scored = json.loads((out / "metrics.json").read_text())["scores"]
    assert scored["n"] == fitted["n"] == 8 and scored["top1"] == fitted["top1"]
    assert scored["confusion_matrix"] == fitted["confusion_matrix"]
    for key in ("log_loss", "ece", "balanced_accuracy"):
        assert scored[key] == pytest.approx(fitted[key], abs=1e-5), key
    assert "top-1" in result.out and "log-loss" in result.out and "ECE" in result.out
    assert result.err.index("predict") < result.err.index("evaluate: report.html"), result.err  # the bars, in order
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 8 and set(rows[0]) == {"path", "true", "predicted", "probability", "p_ants", "p_bees"}
    assert all(abs(float(r["p_ants"]) + float(r["p_bees"]) - 1) < 1e-5 for r in rows)
    page = (out / "report.html").read_text()
    assert "Worst errors" in page and "Leaks across splits" not in page and "<script" not in page
    assert {p.name for p in out.iterdir()} == {"metrics.json", "predictions.csv", "report.html",
                                                "confusion_matrix.png", "reliability.png"}


def test_a_manifest_gives_what_the_folder_gives_and_unreadable_files_are_left_out(binary_run, tmp_path):
    files = [f for f in sorted((images_of(binary_run) / "test").rglob("*.png")) if f.stem == "img000"]
    for f in files:  # one image of each class, and a broken file
        (tmp_path / "data" / f.parent.name).mkdir(parents=True)
        shutil.copy(f, tmp_path / "data" / f.parent.name / f.name)
    (tmp_path / "data" / "ants" / "broken.png").write_bytes(b"not an image")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    model = pipeline.load_model(binary_run / "model.pt", "cpu")
    by_folder = pipeline.evaluate(model, tmp_path / "data")
    by_manifest = pipeline.evaluate(model, manifest)
    assert by_folder.scores == by_manifest.scores and by_folder.scores["n"] == 2
    assert [p for p, _ in by_folder.failed] == [str(tmp_path / "data" / "ants" / "broken.png")]
    assert "1 images not scored" in "\n".join(by_folder.lines())


def test_classes_the_model_does_not_know_are_named_before_any_image_is_run(binary_run, tmp_path, monkeypatch):
    from pipeline.shipping import evaluate as module

    for name in ("ants", "wasps", "=hornets"):
        write_image(tmp_path / "data" / name / "1.png", 1)
    monkeypatch.setattr(module, "predict", lambda *a, **k: pytest.fail("images were run"))
    result = run_cli("evaluate", binary_run / "model.pt", tmp_path / "data", "--out", tmp_path / "ev")
    assert_one_line_error(result, "has classes the model does not know: '=hornets' (1 images), 'wasps' (1 images)",
                          "the model knows ants, bees")
    assert not (tmp_path / "ev").exists()


def test_a_model_that_fails_on_every_image_is_named_not_the_images(binary_run, tmp_path, monkeypatch):
    from pipeline.shipping import formats

    def fails(self, items):
        raise RuntimeError("Failed to allocate memory")

    monkeypatch.setattr(formats.TorchScriptRunner, "_run", fails)
    write_image(tmp_path / "data" / "ants" / "1.png", 1)
    write_image(tmp_path / "data" / "bees" / "2.png", 2)
    (tmp_path / "data" / "bees" / "broken.png").write_bytes(b"not an image")  # listed, then failed to read
    result = run_cli("evaluate", binary_run / "model.pt", tmp_path / "data", "--out", tmp_path / "ev")
    assert_one_line_error(result, "none of the 3 images in", "could be scored (1 could not be read, the model failed "
                          "on 2); e.g. ", "1.png: the model failed on this image: RuntimeError: Failed to allocate memory")
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("make, args, fragment", [
    (lambda d: None, (), "does not exist"),
    (lambda d: write_image(d / "a" / "1.png", 0), ("--split", "val"), "has no split folders (or split column)"),
    (lambda d: write_image(d / "val" / "a" / "1.png", 0), ("--split", "dev"), "split (--split) must be one of"),
    (lambda d: write_image(d / "val" / "ants" / "1.png", 0), ("--split", "test"), "has no test images"),
])
def test_bad_data_gets_one_line(binary_run, tmp_path, make, args, fragment):
    make(tmp_path / "data")
    result = run_cli("evaluate", binary_run / "model.pt", tmp_path / "data", "--out", tmp_path / "ev", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "ev").exists()


@needs_hymenoptera
def test_real_photos_model_pt_scores_val_as_fit_scored_it(hymenoptera_lite0, tmp_path):
    """The proof: a head fitted on the train photos alone (--hold-out val) scores the 153 val photos;
    `transfer evaluate` of its model.pt on the val folder gives the same numbers; model.pt holds the
    calibrated head (parity.json against the calibrated scikit-learn probabilities)."""
    run = tmp_path / "run"
    fitted = run_cli("fit", hymenoptera_lite0, "--hold-out", "val", "--out", run)
    assert fitted.code == 0, fitted.err
    result = run_cli("evaluate", run / "model.pt", HYMENOPTERA / "val", "--out", tmp_path / "ev")
    assert result.code == 0, result.err
    metrics = json.loads((run / "metrics.json").read_text())
    fit_scores, calibrated = metrics["scores"], metrics["calibration"]
    assert calibrated["temperature"] != 1 and calibrated["after"]["ece"] < calibrated["before"]["ece"]
    parity = json.loads((run / "parity.json").read_text())  # model.pt gives the calibrated probabilities
    assert parity["cached_features"]["max_abs_diff"] <= 1e-5
    assert parity["torchscript"]["end_to_end"]["max_abs_diff"] <= 1e-4
    scores = json.loads((tmp_path / "ev" / "metrics.json").read_text())["scores"]
    assert scores["n"] == fit_scores["n"] == 153
    assert scores["top1"] == fit_scores["top1"] and scores["confusion_matrix"] == fit_scores["confusion_matrix"]
    for key in ("log_loss", "ece", "balanced_accuracy"):  # measured: log-loss and ECE equal to 3e-10
        assert scores[key] == pytest.approx(fit_scores[key], abs=1e-5), key
    mine = {r["path"].split("/", 1)[1]: float(r["probability"]) for r in
            csv.DictReader((run / "predictions.csv").open())}
    theirs = {"/".join(r["path"].split("/")[-2:]): float(r["probability"]) for r in
              csv.DictReader((tmp_path / "ev" / "predictions.csv").open())}
    assert mine.keys() == theirs.keys() and max(abs(mine[k] - theirs[k]) for k in mine) <= 1e-5
    assert np.isfinite(scores["ece"])
