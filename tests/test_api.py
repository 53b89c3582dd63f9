"""pipeline/__init__.py: the public API - every stage one call, as the README shows it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.errors import SettingError
from tests.conftest import ROOT, blobs, make_cache, run_cli


def test_importing_the_package_is_light_and_names_are_the_functions():
    code = ("import sys, pipeline; from pipeline import read_cache, write_cache; "
            "heavy = [m for m in ('torch', 'sklearn', 'torchvision') if m in sys.modules]; "
            "import pipeline.fitting.probe, pipeline.extraction.run, pipeline.shipping.export; "
            "print(heavy, callable(pipeline.fit), callable(pipeline.extract), callable(pipeline.export), "
            "pipeline.fit.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    # Importing any stage module never hides the public function of the same stage.
    assert out.stdout.split() == ["[]", "True", "True", "True", "pipeline.runs"]
    assert set(pipeline.__all__) >= {"extract", "read_cache", "write_cache", "fit", "export", "load_model", "predict"}


@pytest.mark.slow
def test_python_and_cli_fits_give_identical_heads(tmp_path):
    X, y, classes = blobs(30, 3, 8, seed=3, spread=2.5)
    split = (["train", "train", "val", "test"] * 30)[:90]
    path = make_cache(tmp_path / "c.h5", X, y, classes, split)
    assert run_cli("fit", path, "--out", tmp_path / "cli", "--no-export").code == 0
    result = pipeline.fit(path, tmp_path / "py")
    cli, py = np.load(tmp_path / "cli" / "head.npz"), np.load(tmp_path / "py" / "head.npz")
    assert sorted(cli.files) == sorted(py.files)
    for name in cli.files:
        np.testing.assert_array_equal(cli[name], py[name], err_msg=name)
    np.testing.assert_array_equal(result.head.weight, cli["weight"])
    assert json.loads((tmp_path / "py" / "head.json").read_text())["command"].startswith("pipeline.fit(")


def test_fit_on_arrays_writes_nothing_and_cannot_be_exported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    X, y, classes = blobs(20, 2, 5, spread=0.5)
    split = np.where(np.arange(40) % 4 == 0, "val", "train")
    result = pipeline.fit((X, y, classes, split), C=1.0)
    assert result.scores["top1"] == 1.0 and result.evaluated_on == "val" and result.run_dir is None
    assert result.head.weight.shape == (2, 5) and list(tmp_path.iterdir()) == []
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(result.head.proba(X64), result.pipeline.predict_proba(X64), atol=1e-12)
    with pytest.raises(SettingError, match="fitted on arrays in memory"):
        pipeline.export(result, tmp_path / "model")
    with pytest.raises(SettingError, match="unknown fit setting 'c'"):
        pipeline.fit((X, y, classes, split), c=1.0)
    assert list(tmp_path.iterdir()) == []


def test_a_fit_result_exports_and_predicts_without_a_run_folder(three_run, tmp_path):
    cache = json.loads((three_run / "head.json").read_text())["provenance"]["cache"]
    result = pipeline.fit(cache, C=0.1)
    exported = pipeline.export(result, tmp_path / "shipped")
    assert Path(exported.model_path) == tmp_path / "shipped" / "model.pt"
    assert {p.name for p in (tmp_path / "shipped").iterdir()} == {"model.pt", "head.pt", "parity.json", "head.npz",
                                                                   "head.json"}
    model = pipeline.load_model(exported.model_path)
    images = three_run.parent / "three-images" / "test"
    predictions = pipeline.predict(model, [images], top_k=2)
    assert len(predictions) == 9 and all(len(p.labels) == 2 and p.error is None for p in predictions)
    cli = pipeline.predict(pipeline.load_model(three_run / "model.pt"), [images], top_k=2)
    assert [p.labels for p in predictions] == [p.labels for p in cli]  # same fit, same decisions
