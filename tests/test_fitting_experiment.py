"""pipeline/fitting/experiment.py and `transfer experiment`: grids over cached features, reproducible,
never touching the network."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import TransferError
from pipeline.fitting.experiment import parse_fractions, parse_grid
from tests.conftest import ROOT, assert_one_line_error, blobs, make_cache, run_cli
from tests.test_fitting_probe import split_names


@pytest.fixture
def caches(tmp_path):
    """Two caches of the same 90 'images' (like two backbones), and one of other images."""
    X, y, classes = blobs(30, 3, 16, seed=1, spread=3.0)
    splits = split_names(y)
    a = make_cache(tmp_path / "wide.h5", X, y, classes, splits)
    b = make_cache(tmp_path / "narrow.h5", X[:, :6] + 0.5, y, classes, splits)
    y_other = y.copy()
    y_other[0] = 1
    other = make_cache(tmp_path / "other.h5", X, y_other, classes, splits)
    return a, b, other


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


GRID = ("--grid", "C=0.01,1,auto", "--grid", "normalize=standard,l2", "--train-fraction", "0.3,1",
        "--repeats", "2", "--jobs", "2")


@pytest.mark.slow
def test_grid_over_two_caches_writes_results_summary_and_plots(caches, tmp_path):
    a, b, _ = caches
    out = tmp_path / "exp"
    result = run_cli("experiment", a, b, *GRID, "--out", out)
    assert result.code == 0, result.err
    rows = read_rows(out / "results.csv")
    assert len(rows) == 2 * 3 * 2 * (2 + 1)  # caches x C x normalize x (2 repeats at 0.3 + 1 at 1.0)
    for column in ["cache", "C", "chosen_C", "class_weight", "normalize", "pca", "train_fraction", "n_train", "n_val",
                   "n_test", "top1", "balanced_accuracy", "log_loss", "fit_seconds", "command"]:
        assert column in rows[0]
    assert {r["cache"] for r in rows} == {str(a), str(b)}
    summary = (out / "summary.md").read_text()
    assert "| wide\\.h5 |" in summary and "| narrow\\.h5 |" in summary  # Markdown-escaped: inert text
    assert summary.count("transfer fit ") >= 2
    for png in ("accuracy_vs_C.png", "learning_curve.png"):
        assert Image.open(out / png).size[0] >= 800
    assert "run" in result.err and "/s" in result.err  # the progress bar over runs


@pytest.mark.slow
def test_same_seed_gives_the_same_results(caches, tmp_path):
    a, _, _ = caches
    first, second = tmp_path / "one", tmp_path / "two"
    assert run_cli("experiment", a, *GRID, "--out", first).code == 0
    assert run_cli("experiment", a, *GRID, "--out", second, "--jobs", "1").code == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731 - timings
    assert strip(read_rows(first / "results.csv")) == strip(read_rows(second / "results.csv"))
    assert run_cli("experiment", a, *GRID, "--out", tmp_path / "three", "--seed", "1").code == 0
    assert strip(read_rows(first / "results.csv")) != strip(read_rows(tmp_path / "three" / "results.csv"))


@pytest.mark.slow
def test_repeats_draw_different_subsamples_and_report_mean_and_std(caches, tmp_path):
    a, _, _ = caches
    out = tmp_path / "lc"
    assert run_cli("experiment", a, "--train-fraction", "0.2,0.5,1", "--repeats", "3", "--out", out).code == 0
    rows = read_rows(out / "results.csv")
    small = [r for r in rows if r["train_fraction"] == "0.2"]
    assert len(small) == 3 and len({r["val_log_loss"] for r in small}) > 1
    assert "± " in (out / "summary.md").read_text()


def test_a_row_refit_with_its_printed_command_gives_the_same_score(caches, tmp_path):
    a, _, _ = caches
    out = tmp_path / "exp"
    result = run_cli("experiment", a, "--grid", "C=0.05,auto", "--grid", "normalize=standard,l2",
                     "--grid", "pca=none,4", "--out", out)
    assert result.code == 0, result.err
    summary = (out / "summary.md").read_text()
    command = re.search(r"`(transfer fit [^`]+)`", summary).group(1)
    best = next(r for r in read_rows(out / "results.csv") if r["command"] == command)
    args = command.split()[2:] + ["--out", str(tmp_path / "refit"), "--no-export"]
    assert run_cli("fit", *args).code == 0
    metrics = json.loads((tmp_path / "refit" / "metrics.json").read_text())
    assert metrics["scores"]["top1"] == float(best["top1"])
    assert metrics["scores"]["log_loss"] == pytest.approx(float(best["log_loss"]), rel=1e-9)
    assert metrics["C"] == pytest.approx(float(best["chosen_C"]), rel=1e-12)


BLOCK_TORCH = '''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError("experiment must not touch the network: import of " + name)
sys.meta_path.insert(0, Block())
'''


def test_the_backbone_is_never_built_or_even_imported(caches, tmp_path):
    """With torch made unimportable (here and in every worker process), the experiment still runs."""
    a, b, _ = caches
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {"PYTHONPATH": f"{guard}:{ROOT}"}
    check = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env={**__import__("os").environ, **env})
    assert "must not touch the network" in check.stderr  # the guard works
    result = run_cli("experiment", a, b, "--grid", "C=0.1,auto", "--jobs", "2", "--out", tmp_path / "e",
                     env=env, subprocess_=True)
    assert result.code == 0, result.err
    assert len(read_rows(tmp_path / "e" / "results.csv")) == 4


def test_caches_that_do_not_match_are_refused(caches, tmp_path):
    a, _, other = caches
    X, y, classes = blobs(20, 3, 16, seed=1)
    fewer = make_cache(tmp_path / "fewer.h5", X, y, classes)
    assert_one_line_error(run_cli("experiment", a, other, "--out", tmp_path / "x"), "do not hold the same images",
                          "row 0")
    assert_one_line_error(run_cli("experiment", a, fewer, "--out", tmp_path / "x"), "90 vs 60 images")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, fragment", [
    (("--grid", "lr=0.1"), "unknown grid key 'lr'"),
    (("--grid", "C=0.1,abc"), "grid value 'abc' for C is neither a number nor 'auto'"),
    (("--grid", "C=-1"), "C (--grid C=...) must be auto (None) or a number > 0; got -1.0"),
    (("--grid", "pca=12.5"), "for pca is neither a whole number nor 'none'"),
    (("--grid", "pca=0"), "pca (--grid pca=...) must be none (None) or a whole number >= 1; got 0"),
    (("--grid", "normalize=minmax"), "must be one of standard, l2, none; got 'minmax'"),
    (("--grid", "C"), "--grid expects KEY=V1,V2"),
    (("--train-fraction", "0,0.5"), "(--train-fraction) must be a number in (0, 1]; got 0.0"),
    (("--train-fraction", "1.5"), "(--train-fraction) must be a number in (0, 1]; got 1.5"),
    (("--train-fraction", "half"), "is not a number"),
    (("--grid", "pca=4,17"), "PCA dimension 17 is larger than the feature dimension 16"),
    (("--repeats", "0"), "repeats (--repeats) must be a whole number >= 1; got 0"),
    (("--jobs", "0"), "jobs (--jobs) must be a whole number >= 1; got 0"),
    (("--jobs", "-2"), "jobs (--jobs) must be a whole number >= 1; got -2"),
    (("--grid", "pca=12", "--train-fraction", "0.2,1"), "PCA dimension 12 needs at least that many training images"),
])
def test_bad_input_gets_one_clear_line(caches, tmp_path, args, fragment):
    a, _, _ = caches
    assert_one_line_error(run_cli("experiment", a, *args, "--out", tmp_path / "x"), fragment)
    assert not (tmp_path / "x").exists()


def test_parsers():
    grid = parse_grid(["C=auto,0.1", "pca=none,8", "class_weight=balanced"])
    assert grid == {"C": [None, 0.1], "class_weight": ["balanced"], "normalize": ["standard"], "pca": [None, 8]}
    assert parse_fractions("1,0.25,0.5,0.25") == [0.25, 0.5, 1.0]
    with pytest.raises(TransferError):
        parse_grid(["normalize=standard,", ])
    assert np.isclose(parse_grid(["C=1e-3"])["C"][0], 1e-3)
    assert parse_grid(["C=1", "C=2,1", "pca=4"])["C"] == [1.0, 2.0]  # a key given twice keeps both


def test_an_interrupted_experiment_keeps_its_finished_runs_and_resumes(caches, tmp_path, monkeypatch):
    from pipeline.fitting import experiment

    a, _, _ = caches
    args = ("experiment", a, "--grid", "C=0.01,0.1,1,10", "--jobs", "1", "--out", tmp_path / "exp")
    real, calls = experiment.run_one, []

    def interrupted_after_two(run):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(run.index)
        return real(run)

    monkeypatch.setattr(experiment, "run_one", interrupted_after_two)
    stopped = run_cli(*args)
    assert_one_line_error(stopped, "interrupted: 2 finished runs are saved in", "exp.partial", "resume with:")
    assert stopped.code == 130 and not (tmp_path / "exp").exists()
    monkeypatch.setattr(experiment, "run_one", lambda run: calls.append(run.index) or real(run))
    resumed = run_cli(*args)
    assert resumed.code == 0, resumed.err
    assert "resumed: 2 runs were already saved" in resumed.out
    assert calls == [0, 1, 2, 3]  # each run computed once in all
    assert [r["C"] for r in read_rows(tmp_path / "exp" / "results.csv")] == ["0.01", "0.1", "1.0", "10.0"]
    assert not (tmp_path / "exp.partial").exists()
    other = run_cli("experiment", a, "--grid", "C=5", "--out", tmp_path / "exp2")
    assert other.code == 0 and not list(tmp_path.glob("exp2.partial"))


def test_runs_saved_for_another_experiment_are_not_mixed_in(caches, tmp_path):
    a, _, _ = caches
    (tmp_path / "exp.partial").mkdir()
    (tmp_path / "exp.partial" / "request.json").write_text('{"caches": ["elsewhere.h5"]}')
    assert_one_line_error(run_cli("experiment", a, "--out", tmp_path / "exp"), "holds the saved runs of another experiment")


def test_an_existing_output_folder_is_refused_before_any_run(caches, tmp_path, monkeypatch):
    from pipeline.fitting import experiment

    a, _, _ = caches
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "mine.txt").write_text("keep")
    monkeypatch.setattr(experiment, "run_one", lambda run: pytest.fail("a run started"))
    assert_one_line_error(run_cli("experiment", a, "--out", tmp_path / "exp"), "already exists and is not empty")


def test_caches_with_the_same_file_name_are_told_apart(tmp_path):
    from pipeline.reports.plots import cache_labels

    labels = cache_labels([str(tmp_path / "vgg" / "photos.h5"), str(tmp_path / "lite" / "photos.h5"),
                           str(tmp_path / "lite" / "other.h5")])
    assert list(labels.values()) == ["vgg/photos.h5", "lite/photos.h5", "other.h5"]
    X, y, classes = blobs(20, 3, 8, seed=1, spread=3.0)
    splits = split_names(y)
    for name in ("vgg", "lite"):
        make_cache(tmp_path / name / "photos.h5", X, y, classes, splits)
    result = run_cli("experiment", tmp_path / "vgg" / "photos.h5", tmp_path / "lite" / "photos.h5", "--grid",
                     "C=0.1,1", "--out", tmp_path / "exp")
    assert result.code == 0, result.err
    summary = (tmp_path / "exp" / "summary.md").read_text()
    assert "| vgg/photos\\.h5 |" in summary and "| lite/photos\\.h5 |" in summary  # Markdown-escaped: inert text


@pytest.fixture
def one_thread():
    """Small fits: one BLAS thread is as fast, and immune to a busy machine's oversubscription."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.mark.usefixtures("one_thread")
def test_every_point_of_a_learning_curve_is_scored_on_the_same_images(tmp_path):
    """No test split: the whole val split is held out from every run (C and the temperature by
    cross-validation on each run's train rows); results.csv names the scored images."""
    import pipeline
    from pipeline.fitting.experiment import learning_curve
    from pipeline.reports.plots import plot_learning_curve

    X, y, classes = blobs(40, 3, 8, seed=2, spread=3.0)
    split = split_names(y, test=0.0)
    cache = make_cache(tmp_path / "tv.h5", X, y, classes, split)
    request = pipeline.ExperimentRequest.from_text([str(cache)], ["C=0.1"], "0.1,0.3,1", repeats=2, jobs=1,
                                                  out=str(tmp_path / "lc"), command="transfer experiment tv.h5")
    result = pipeline.run_experiment(request)
    rows = read_rows(tmp_path / "lc" / "results.csv")
    n_val = split.count("val")
    assert [r["train_fraction"] for r in rows] == ["0.1", "0.1", "0.3", "0.3", "1.0"]
    assert {r["scored_images"] for r in rows} == {rows[0]["scored_images"]}  # identical rows score every point
    assert {r["n_scored"] for r in rows} == {str(n_val)} and {r["n_val"] for r in rows} == {str(n_val)}
    assert all(r["scored_on"].startswith("held-out validation split") and "--hold-out val" in r["command"]
               for r in rows)
    assert [int(r["n_fitted"]) for r in rows][::2] == [9, 27, len(y) - n_val]  # only train is subsampled
    assert len({r["top1"] for r in rows[:2]}) == 2  # repeats differ...
    summary = (tmp_path / "lc" / "summary.md").read_text()
    assert f"every point is scored on the same {n_val} images (scored_images {rows[0]['scored_images']}" in summary
    point = rows[2]  # a subsampled point, as its command reproduces it
    assert point["command"].endswith("--train-fraction 0.3 --repeat 0 --hold-out val")
    again = pipeline.fit(cache, C=0.1, train_fraction=0.3, repeat=0, hold_out="val")
    assert again.scores["top1"] == float(point["top1"]) and again.scores["log_loss"] == float(point["log_loss"])
    ticks = plot_learning_curve(learning_curve(result.rows), str(tmp_path / "curve.png"))
    assert ticks == [9.0, 27.0, len(y) - n_val]  # a label at each size measured, none crowding another


@pytest.mark.usefixtures("one_thread")
def test_a_collapsed_setting_is_flagged_and_does_not_set_the_plot_range(tmp_path):
    import pipeline
    from pipeline.reports.plots import plot_accuracy_vs_C

    X, y, classes = blobs(40, 3, 8, seed=3, spread=3.0)
    keep = np.flatnonzero((y == 0) | (np.arange(len(y)) % 2 == 0))  # class c0 twice as large as c1, c2
    cache = make_cache(tmp_path / "c.h5", X[keep], y[keep], classes, split_names(y[keep]))
    request = pipeline.ExperimentRequest.from_text([str(cache)], ["C=1e-6,0.1,1"], jobs=1, out=str(tmp_path / "e"),
                                                  command="transfer experiment c.h5")
    result = pipeline.run_experiment(request)
    rows = read_rows(tmp_path / "e" / "results.csv")
    assert [r["collapsed"] for r in rows] == ["True", "False", "False"]  # C=1e-6: the intercept alone decides
    summary = (tmp_path / "e" / "summary.md").read_text()
    assert "## Collapsed settings" in summary and "| c\\.h5 | standard | 1e-06 | 1 | 0 | c0 |" in summary
    assert "1 runs predict one class for every scored image" in "\n".join(result.lines())
    low, high = plot_accuracy_vs_C(result.rows, str(tmp_path / "acc.png"))
    assert result.rows[0]["val_top1"] < low <= min(r["val_top1"] for r in result.rows[1:])
