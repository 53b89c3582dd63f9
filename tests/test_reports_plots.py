"""pipeline/reports/plots.py: the figures of a run folder stay legible (here: the reliability diagram)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.fitting.calibration import scale, summary
from pipeline.reports.plots import plot_reliability


@pytest.mark.parametrize("method", ["temperature", "none"])
def test_the_reliability_legend_covers_no_point_and_no_bar(tmp_path, method):
    """Ten classes, underconfident: the tallest bars and points accurate at 1.0 sit at low confidence,
    where a legend inside either panel covered them (it sat in the histogram's upper left)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.0, (600, 10))
    y = rng.integers(0, 10, 600)
    logits[np.arange(600), y] += 1.6
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    calibration = {"method": method, "temperature": 0.7, "before": summary(proba, y, 10),
                   "after": summary(scale(proba, 0.7), y, 10)}
    legend_top, panels_bottom = plot_reliability(calibration, "validation split", str(tmp_path / "r.png"))
    assert legend_top <= panels_bottom, (legend_top, panels_bottom)
    assert Image.open(tmp_path / "r.png").size[1] <= 900  # stays about a screen high
