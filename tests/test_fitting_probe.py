"""pipeline/fitting/probe.py + pipeline/runs.py and the `transfer fit` command: the protocol, honest scores, readable output."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline import fit, read_cache
from pipeline.cache import Cache, PartialCache
from pipeline.fitting.selection import COARSE_C
from pipeline.fitting.splits import make_splits
from tests.conftest import assert_one_line_error, blobs, make_cache, needs_hymenoptera, run_cli, write_image


def split_names(labels: np.ndarray, seed: int = 0, val: float = 0.25, test: float = 0.25) -> list[str]:
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = int(len(rows) * val), int(len(rows) * test)
        out[rows[:n_val]] = "val"
        out[rows[n_val:n_val + n_test]] = "test"
        out[rows[n_val + n_test:]] = "train"
    return list(out)


@pytest.fixture
def three_class(tmp_path) -> Path:
    X, y, classes = blobs(40, 3, 16, seed=1, spread=2.0)
    return make_cache(tmp_path / "three.h5", X, y, classes, split_names(y))


def test_separable_three_classes_are_learned_and_scored_on_test(three_class):
    result = fit(three_class)
    assert result.evaluated_on == "test"
    assert result.splits.sizes() == {"train": 60, "val": 30, "test": 30}
    assert result.scores["top1"] >= 0.9
    assert result.scores["top5"] is None  # fewer than 5 classes
    assert result.convergence["converged"]
    assert COARSE_C.min() <= result.C <= COARSE_C.max()
    assert len(COARSE_C) < len(result.sweep) <= len(COARSE_C) + 6  # 12 decades + 3 halvings x 2 neighbours
    assert set(result.scores["per_class"]) == {"c0", "c1", "c2"}
    lr = result.pipeline.steps[-1][1]
    assert lr.coef_.shape == (3, 16)  # one row per class: softmax over all of them


@pytest.mark.slow
def test_binary_case(tmp_path):
    X, y, classes = blobs(50, 2, 8, seed=2, spread=2.5)
    path = make_cache(tmp_path / "two.h5", X, y, ["ants", "bees"], split_names(y))
    result = fit(path)
    assert result.pipeline.steps[-1][1].coef_.shape == (1, 8)
    assert result.scores["top1"] >= 0.85
    assert np.array(result.scores["confusion_matrix"]).sum() == result.splits.sizes()["test"]


@pytest.mark.slow
def test_the_choice_of_C_never_sees_test_labels(tmp_path):
    X, y, classes = blobs(40, 3, 16, seed=3, spread=4.0)
    splits = split_names(y)
    honest = make_cache(tmp_path / "a.h5", X, y, classes, splits)
    scrambled_y = y.copy()
    test = np.array(splits) == "test"
    scrambled_y[test] = np.random.default_rng(0).permutation(3)[y[test]]  # every test label changed
    assert (scrambled_y[test] != y[test]).all()
    scrambled = make_cache(tmp_path / "b.h5", X, scrambled_y, classes, splits)
    a, b = fit(honest), fit(scrambled)
    assert a.C == b.C and a.sweep == b.sweep  # the choice cannot depend on test labels...
    assert a.scores["top1"] != b.scores["top1"]  # ...which do change the reported score


@pytest.mark.slow
def test_same_seed_same_result_and_a_new_seed_a_new_split(tmp_path):
    X, y, classes = blobs(30, 3, 10, seed=4, spread=3.0)
    path = make_cache(tmp_path / "nosplit.h5", X, y, classes)  # no split folders: seeded split
    a, b = fit(path, seed=7), fit(path, seed=7)
    assert a.C == b.C and a.sweep == b.sweep and a.scores == b.scores
    assert np.array_equal(a.splits.test, b.splits.test)
    c = fit(path, seed=8)
    assert not np.array_equal(a.splits.test, c.splits.test)


def test_without_split_folders_a_stratified_split_is_made_and_reported(tmp_path):
    X, y, classes = blobs(25, 2, 6, seed=5)
    info = read_cache((make_cache(tmp_path / "n.h5", X, y, classes)))
    splits = make_splits(info, seed=0)
    assert splits.sizes() == {"train": 32, "val": 8, "test": 10}
    assert "stratified 64/16/20" in splits.source
    for rows in (splits.train, splits.val, splits.test):
        assert np.bincount(y[rows]).min() == np.bincount(y[rows]).max()  # balanced like the whole
    assert not set(splits.train) & set(splits.test)


def test_train_and_val_only_reports_validation_and_says_so(tmp_path):
    X, y, classes = blobs(30, 2, 6, seed=6, spread=2.0)
    path = make_cache(tmp_path / "tv.h5", X, y, classes, split_names(y, test=0.0))
    result = fit(path, C_selection="validation")
    assert result.evaluated_on == "val"
    assert any("no test split" in n and "optimistic" in n for n in result.notes)


def test_a_cache_with_train_and_test_gets_validation_carved_from_train(tmp_path):
    X, y, classes = blobs(30, 2, 6, seed=6)
    path = make_cache(tmp_path / "tt.h5", X, y, classes, split_names(y, val=0.0, test=0.3))
    splits = make_splits(read_cache((path)), seed=0)
    assert splits.sizes()["val"] > 0 and "validation: stratified 20% of train" in splits.source
    assert not set(splits.val) & set(splits.test)


def test_fixed_C_skips_the_sweep(three_class):
    result = fit(three_class, C=0.5)
    assert result.C == 0.5 and result.sweep == []


@pytest.mark.slow
def test_fit_command_writes_a_complete_run_folder(three_class, tmp_path):
    run = tmp_path / "run"
    result = run_cli("fit", three_class, "--out", run, "--no-export")
    assert result.code == 0, result.err
    for name in ["model.joblib", "head.npz", "head.json", "metrics.json", "report.md", "confusion_matrix.png",
                 "c_sweep.png"]:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ["top1", "top5", "balanced_accuracy", "log_loss", "per_class", "confusion_matrix"]:
        assert key in metrics["scores"]
    assert metrics["splits"] == {"train": 60, "val": 30, "test": 30}
    assert 12 < len(metrics["C_selection"]["sweep"]) <= 18 and metrics["C"] > 0
    assert {"iterations", "converged", "max_iter"} <= set(metrics["convergence"])
    assert {"read_s", "sweep_s", "refit_s", "total_s"} <= set(metrics["timings"])
    assert metrics["provenance"]["backbone"] == "synthetic"
    head = json.loads((run / "head.json").read_text())
    assert head["classes"] == ["c0", "c1", "c2"] and head["provenance"]["backbone"] == "synthetic"
    arrays = np.load(run / "head.npz", allow_pickle=False)
    assert {"coef", "intercept", "scaler_mean", "scaler_scale", "weight", "bias"} <= set(arrays.files)
    for png in ["confusion_matrix.png", "c_sweep.png"]:
        assert Image.open(run / png).size[0] >= 500
    for line in ["splits", "chosen C", "scores on test", "run folder"]:
        assert line in result.out
    assert str(run) in result.out


def test_default_run_folder_is_under_reports(three_class, tmp_path):
    result = run_cli("fit", three_class, "--no-export", "--C", "1", cwd=tmp_path)
    assert result.code == 0, result.err
    line = [l for l in result.out.splitlines() if l.startswith("run folder")][0]
    assert line.split()[-1].startswith("reports/three-")


def test_convergence_failure_is_one_line_with_advice(three_class, tmp_path):
    result = run_cli("fit", three_class, "--out", tmp_path / "r", "--no-export", "--C", "1e4", "--max-iter", "2")
    assert result.code == 0, result.err
    warnings = [l for l in result.err.splitlines() if "converg" in l.lower()]
    assert len(warnings) == 1 and "raise --max-iter" in warnings[0]
    assert "ConvergenceWarning" not in result.err


@pytest.fixture
def bad_caches(tmp_path):
    X, y, classes = blobs(10, 2, 4)
    one = make_cache(tmp_path / "one.h5", X, np.zeros_like(y), ["only"])
    few_y = y.copy()
    few_y[:] = 0
    few_y[:2] = 1
    few = make_cache(tmp_path / "few.h5", X, few_y, classes)
    nan = make_cache(tmp_path / "nan.h5", X, y, classes)
    with h5py.File(nan, "r+") as f:  # damage, as a disk or another tool might
        f["features"][3, 1] = np.nan
    ok = make_cache(tmp_path / "ok.h5", X, y, classes)
    tiny = make_cache(tmp_path / "tiny.h5", X[[0, 1, 2, 10, 11, 12]], np.array([0, 0, 0, 1, 1, 1]), classes)
    part = PartialCache.create(str(tmp_path / "half.h5.partial"), {"command": "transfer extract imgs --out half.h5"},
                                     np.arange(4), ["a/0", "a/1", "b/2", "b/3"], np.array([0, 0, 1, 1]), None, 4)
    with part:
        part.commit(np.array([0]), np.ones((1, 4), np.float32), [])
    png = write_image(tmp_path / "photo.png", 0)
    return {"one": one, "few": few, "nan": nan, "ok": ok, "tiny": tiny, "half": tmp_path / "half.h5", "png": png,
            "missing": tmp_path / "missing.h5"}


@pytest.mark.parametrize("which, extra, fragments", [
    ("missing", (), ("no feature cache at",)),
    ("png", (), ("not a feature cache (not an HDF5 file)",)),
    ("half", (), ("is incomplete", "1 of 4", "resume it with: transfer extract imgs --out half.h5")),
    ("one", (), ("only one class",)),
    ("few", (), ("class 'c1' has 2 images", "at least 3 per class")),
    ("tiny", (), ("too few images for a stratified train/val/test split", "at least 10 images")),
    ("nan", (), ("non-finite",)),
    ("ok", ("--class-weight", "heavy"), ("class_weight (--class-weight) must be one of none, balanced; got 'heavy'",)),
    ("ok", ("--C", "-1"), ("C (--C) must be auto (None) or a number > 0; got -1.0",)),
    ("ok", ("--C", "0"), ("C (--C) must be auto (None) or a number > 0; got 0.0",)),
    ("ok", ("--max-iter", "0"), ("max_iter (--max-iter) must be a whole number >= 1; got 0",)),
    ("ok", ("--seed", "-5"), ("seed (--seed) must be a whole number in [0, 4294967295]; got -5",)),
    ("ok", ("--C", "lots"), ("neither 'auto' nor a number",)),
])
def test_bad_input_gets_one_clear_line(bad_caches, tmp_path, which, extra, fragments):
    result = run_cli("fit", bad_caches[which], "--out", tmp_path / "run", "--no-export", *extra)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_an_existing_run_folder_is_not_overwritten(three_class, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    result = run_cli("fit", three_class, "--out", tmp_path / "run", "--no-export", "--C", "1")
    assert_one_line_error(result, "already exists and is not empty")
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


@needs_hymenoptera
def test_real_photos_reach_the_published_accuracy(hymenoptera_lite0, tmp_path):
    """EfficientNet-Lite0 features of the real ants/bees photos: val top-1 >= 0.92."""
    result = fit(hymenoptera_lite0)
    assert result.evaluated_on == "val"
    assert result.splits.sizes() == {"train": 245, "val": 153, "test": 0}
    assert result.scores["top1"] >= 0.92, result.scores["top1"]


def test_fit_reads_features_straight_into_float64(three_class, monkeypatch):
    seen = []
    real = Cache.features

    def spy(self, rows=None, dtype=np.float32, out=None):
        seen.append((None if out is None else out.dtype, len(rows)))
        return real(self, rows, dtype, out)

    monkeypatch.setattr(Cache, "features", spy)
    fit(three_class, C=1.0)
    assert seen and all(dtype == np.float64 for dtype, _ in seen)


def test_default_run_folders_started_together_never_collide(tmp_path):
    from pipeline.files import default_run_dir

    made = [default_run_dir("three", root=str(tmp_path)) for _ in range(3)]
    assert len(set(made)) == 3 and all(Path(m).is_dir() and not any(Path(m).iterdir()) for m in made)
    assert Path(made[1]).name == Path(made[0]).name + "-2"


def test_ctrl_c_or_sigterm_while_fitting_writes_nothing_and_says_so(three_class, tmp_path, monkeypatch):
    import importlib
    import os
    import signal

    fit_module = importlib.import_module("pipeline.runs")  # where `pipeline.fit` calls the fit

    real = fit_module.fit_head

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or torchrun would
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "fit_head", terminated)
    result = run_cli("fit", three_class, "--C", "1", cwd=tmp_path)
    assert_one_line_error(result, "interrupted while fitting: nothing was written")
    assert result.code == 130
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())


def test_ctrl_c_while_exporting_says_the_run_folder_is_complete(three_class, tmp_path, monkeypatch):
    import importlib

    export_module = importlib.import_module("pipeline.shipping.export")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_export", interrupted)
    monkeypatch.setattr(export_module, "_export_head", interrupted)  # a synthetic cache ships head.pt alone
    result = run_cli("fit", three_class, "--C", "1", "--out", tmp_path / "run")
    assert_one_line_error(result, f"the run folder {tmp_path / 'run'} is complete",
                          f"`transfer export {tmp_path / 'run'}` writes the model")
    assert (tmp_path / "run" / "head.npz").is_file() and not (tmp_path / "run" / "model.pt").exists()


def test_a_run_folder_left_half_written_by_a_killed_fit_is_cleaned_up(three_class, tmp_path):
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (tmp_path / f"run.writing-{dead}").mkdir()
    (tmp_path / f"run.writing-{dead}" / "model.joblib").write_bytes(b"half")
    assert run_cli("fit", three_class, "--C", "1", "--out", tmp_path / "run", "--no-export").code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == ["run"]


def test_report_md_lists_failed_images_and_survives_odd_class_names(tmp_path):
    from tests.conftest import LITE, make_folder

    images = make_folder(tmp_path / "images", {"a|b": 2, "c d": 2}, splits=("train", "val", "test"))
    (images / "train" / "a|b" / "broken.png").write_bytes(b"garbage")
    assert run_cli("extract", images, "--out", tmp_path / "c.h5", *LITE).code == 0
    assert run_cli("fit", tmp_path / "c.h5", "--C", "1", "--out", tmp_path / "run", "--no-export").code == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "1 images could not be used and are not in these scores: `train/a|b/broken.png`" in report
    assert "| a\\|b | " in report  # the pipe is escaped: the table keeps its columns
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["failed_images"]["count"] == 1


@pytest.mark.slow
def test_a_tiny_validation_split_chooses_C_by_cross_validation_without_seeing_test(tmp_path):
    X, y, classes = blobs(20, 2, 8, seed=9, spread=3.0)  # 40 images, 4 of each class in val
    split = split_names(y, val=0.2, test=0.2)
    honest = make_cache(tmp_path / "a.h5", X, y, classes, split)
    result = fit(honest)
    assert any("C chosen by stratified 5-fold cross-validation on the 32 train+val images" in n and
               "fewer than 20" in n for n in result.notes), result.notes
    assert result.evaluated_on == "test" and result.splits.sizes()["test"] == 8
    assert result.validation["top1"] == max(r["val_top1"] for r in result.sweep)  # the CV score of the chosen C
    scrambled = make_cache(tmp_path / "b.h5", X, np.where(np.array(split) == "test", 1 - y, y), classes, split)
    again = fit(scrambled)
    assert again.C == result.C and again.sweep == result.sweep  # test labels never reach the choice
    forced = fit(honest, C_selection="validation")
    assert not any("cross-validation" in n for n in forced.notes)
    run = tmp_path / "run"
    assert run_cli("fit", honest, "--out", run, "--no-export").code == 0
    report = (run / "report.md").read_text()
    assert "cross-validation" in report and "pooled out-of-fold top-1" in report


@pytest.mark.slow
def test_without_a_test_split_cross_validated_scores_are_named_as_such(tmp_path):
    X, y, classes = blobs(12, 3, 6, seed=4, spread=2.0)
    path = make_cache(tmp_path / "tv.h5", X, y, classes, split_names(y, test=0.0))
    result = fit(path)
    assert result.evaluated_on == "cv" and any("cross-validated predictions" in n for n in result.notes)


def test_two_labelled_images_of_a_class_still_choose_C_by_two_folds(tmp_path):
    X, y, classes = blobs(6, 2, 4, seed=1)
    few = make_cache(tmp_path / "few.h5", X[[0, 1, 6, 7, 8, 9]], np.array([0, 0, 1, 1, 1, 1]), classes,
                     ["train", "val", "train", "val", "train", "train"])
    result = fit(few)
    assert any("stratified 2-fold cross-validation" in n for n in result.notes), result.notes


@pytest.fixture
def one_thread():
    """Small fits: one BLAS thread is as fast, and immune to a busy machine's oversubscription (4x here)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.mark.usefixtures("one_thread")
def test_select_logloss_ranks_Cs_on_validation_log_loss_and_the_report_names_the_other_choice(tmp_path):
    X, y, classes = blobs(80, 10, 16, seed=1, spread=4.0)
    path = make_cache(tmp_path / "ten.h5", X, y, classes, split_names(y, 1))
    top1 = fit(path)
    loss = fit(path, select="logloss")
    best_loss = min(r["val_log_loss"] for r in loss.sweep)
    assert next(r for r in loss.sweep if r["C"] == loss.C)["val_log_loss"] == best_loss
    assert loss.C != top1.C  # on these features the two rules disagree (top-1 prefers a smaller C)
    assert top1.alternative["select"] == "logloss" and top1.alternative["C"] != top1.C
    assert any(n.startswith("--select logloss would choose C = ") for n in top1.notes)
    assert any(n.startswith("--select top1 would choose C = ") for n in loss.notes)
    from pipeline.reports.fit_run import metrics_doc, report_markdown

    metrics = metrics_doc(loss, "transfer fit ten.h5 --select logloss")  # metrics.json
    assert metrics["C_selection"]["select"] == "logloss" and "log-loss (ties: higher top-1)" in \
        metrics["C_selection"]["method"]
    assert metrics["C_selection"]["other_rule"]["select"] == "top1"
    from pipeline.files import markdown_text  # report.md's notes are inert Markdown

    assert markdown_text("--select top1 would choose C") in report_markdown(metrics, loss.describe_evaluation(), True)
    assert_one_line_error(run_cli("fit", path, "--select", "auc", "--no-export"),
                          "select (--select) must be one of top1, logloss; got 'auc'")


@pytest.mark.usefixtures("one_thread")
def test_hold_out_val_scores_the_whole_val_split_that_nothing_else_saw(tmp_path):
    X, y, classes = blobs(30, 2, 6, seed=6, spread=3.0)
    split = split_names(y, test=0.0)
    honest = make_cache(tmp_path / "tv.h5", X, y, classes, split)
    from tests.test_fitting_solver import Recorder

    progress = Recorder()
    result = fit(honest, hold_out="val", progress=progress)
    assert [p[0] for p in progress.phases][-1] == "refit on train"  # val is not refit on
    val = np.flatnonzero(np.array(split) == "val")
    assert result.evaluated_on == "val" and result.splits.held_out_val
    assert np.array_equal(np.sort(result.predictions[0]), val)  # every val image, scored
    assert result.splits.sizes() == {"train": len(y) - len(val), "val": len(val), "test": 0}
    assert result.describe_evaluation().startswith("held-out validation split")
    assert any("cross-validation on the 46 train images" in n for n in result.notes), result.notes
    assert not result.calibration["optimistic"]
    scrambled = make_cache(tmp_path / "b.h5", X, np.where(np.array(split) == "val", 1 - y, y), classes, split)
    again = fit(scrambled, hold_out="val")
    assert again.C == result.C and again.sweep == result.sweep  # val labels never reach the choice...
    assert again.calibration["temperature"] == result.calibration["temperature"]  # ...nor the temperature
    np.testing.assert_array_equal(again.head.weight, result.head.weight)  # ...nor the model
    assert again.scores["top1"] == 1 - result.scores["top1"]  # ...which they score
    with_test = make_cache(tmp_path / "t.h5", X, y, classes, split_names(y))
    assert_one_line_error(run_cli("fit", with_test, "--hold-out", "val", "--no-export"),
                          "hold_out (--hold-out) val is for caches without a test split")
    assert_one_line_error(run_cli("fit", honest, "--hold-out", "val", "--solver", "streamed", "--no-export"),
                          "--hold-out", "--solver")


@pytest.mark.usefixtures("one_thread")
def test_every_run_folder_has_the_predictions_its_scores_are_on(tmp_path):
    X, y, classes = blobs(20, 2, 6, seed=3, spread=2.0)
    path = make_cache(tmp_path / "c.h5", X, y, ["=HYPERLINK(\"x\")", "bees"], split_names(y))
    result = fit(path, tmp_path / "run", C=1.0)
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "predictions.csv").open()))
    scored, proba = result.predictions
    assert len(rows) == len(scored) == result.scores["n"] and {r["split"] for r in rows} == {"test"}
    cache = read_cache(path)
    assert [r["path"] for r in rows] == [cache.paths[i] for i in scored]
    assert rows[0]["true"] in ("'=HYPERLINK(\"x\")", "bees")  # a formula is written as text
    assert all(r["true"] != "=HYPERLINK(\"x\")" for r in rows)
    got = np.array([[float(r["p_=HYPERLINK(\"x\")"]), float(r["p_bees"])] for r in rows])
    np.testing.assert_allclose(got, proba, atol=1e-6)
    assert np.mean([r["true"] == r["predicted"] for r in rows]) == result.scores["top1"]
    from pipeline import inspect

    issues = list(csv.DictReader((tmp_path / "run" / "label_issues.csv").open()))
    assert [r["path"] for r in issues] == [cache.paths[s.row] for s in inspect(path, C=1.0).suspects]


def test_notes_show_names_that_are_not_utf8_as_escapes(tmp_path):
    """A class named with the byte \\xff is shown 'c\\xff' in notes, as everywhere (repr showed '\\udcff')."""
    import os

    import pipeline
    from tests.conftest import blobs, make_cache

    X, y, _ = blobs(12, 2, 4)
    cache = make_cache(tmp_path / "c.h5", X, y, [os.fsdecode(b"c\xff"), "d"], splits=["train", "train", "val"] * 8)
    notes = " ".join(pipeline.fit(cache).notes)
    assert "'c\\xff'" in notes and "\\udc" not in notes, notes
