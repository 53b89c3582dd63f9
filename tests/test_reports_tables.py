"""pipeline/reports/tables.py: predictions.csv and label_issues.csv, safe to open in a spreadsheet."""

from __future__ import annotations

import csv

import numpy as np

from pipeline.reports.inspection import Suspect
from pipeline.reports.tables import csv_cell, write_label_issues, write_predictions


def test_text_that_a_spreadsheet_would_run_is_written_as_text():
    for formula in ("=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(formula) == "'" + formula
    assert csv_cell("ants/1.jpg") == "ants/1.jpg" and csv_cell("a=b") == "a=b"
    assert csv_cell(b"caf\xe9/1.jpg") == "caf\\xe9/1.jpg"  # not UTF-8: shown with an escape, never an error


def test_predictions_and_label_issues_files(tmp_path):
    proba = np.array([[0.9, 0.1], [0.3, 0.7]])
    write_predictions(str(tmp_path / "p.csv"), [b"-rm/1.jpg", "b/2.jpg"], np.array([0, 0]), proba, ["=cmd", "b"],
                      ["val", "val"])
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert rows[0] == ["path", "split", "true", "predicted", "probability", "p_=cmd", "p_b"]
    assert rows[1] == ["'-rm/1.jpg", "val", "'=cmd", "'=cmd", "0.900000", "0.900000", "0.100000"]
    assert rows[2][3:5] == ["b", "0.700000"]
    issue = Suspect(row=1, given=0, given_probability=0.3, preferred=1, preferred_probability=0.7, threshold=0.6,
                    margin=-0.4)
    write_label_issues(str(tmp_path / "l.csv"), [issue], ["a/1.jpg", "b/2.jpg"], ["=cmd", "b"], ["train", "val"])
    rows = list(csv.reader((tmp_path / "l.csv").open()))
    assert rows[1] == ["1", "b/2.jpg", "val", "'=cmd", "0.300000", "0.600000", "b", "0.700000", "-0.400000"]
