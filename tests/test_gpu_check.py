"""benchmarks/gpu_check.py, the one command a GPU session runs: it must not rot while no GPU is lent,
so it runs here on the CPU, on 8 photos (efficientnet_lite0 instead of VGG16 to keep the suite fast)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, needs_hymenoptera


@pytest.mark.slow
@needs_hymenoptera
def test_gpu_check_runs_every_step_on_the_cpu_and_passes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--limit", "4",
                           "--backbone", "efficientnet_lite0", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["rows"]
    assert {r["step"] for r in rows} == {"photos", "batch", "resize", "export", "model.pt", "synthetic"}
    assert not [r for r in rows if r["ok"] is False]
    assert sum(r["ok"] is True for r in rows) == 10
    assert "| resize | device resize vs Pillow, bit for bit | 4 of 4 crops equal |" in (out / "gpu_check.md").read_text()
    assert "0 check(s) failed" in proc.stdout


def test_a_mismatch_is_a_failed_row(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    report = gpu_check.Report(tmp_path, {})
    rng = np.random.default_rng(0)
    a = {f"p{i}": rng.normal(size=8) for i in range(4)}
    gpu_check.check_cosine(report, "s", "same", a, dict(a), 0.9999, 0.999)
    gpu_check.check_cosine(report, "s", "one row off", a, {**a, "p2": -a["p2"]}, 0.9999, 0.999)
    gpu_check.check_cosine(report, "s", "a row missing", a, {k: v for k, v in a.items() if k != "p3"}, 0.9, 0.9)
    assert [r["ok"] for r in report.rows] == [True, False, False]
    assert "**FAIL**" in (tmp_path / "gpu_check.md").read_text()
