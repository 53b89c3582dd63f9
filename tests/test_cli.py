"""cli.py: the `transfer` command's own options (the commands are tested with the modules they call)."""

from __future__ import annotations

import re

import pipeline
from tests.conftest import run_cli


def test_version_names_transfer_and_the_libraries_that_shape_its_results():
    result = run_cli("--version")
    assert result.code == 0 and result.err == ""
    line = result.out.strip()
    assert re.fullmatch(r"transfer \S+ \(torch \S+, torchvision \S+, timm \S+, scikit-learn \S+; Python \S+\)", line)
    assert line.startswith(f"transfer {pipeline.__version__} (")
    assert "transfer" in run_cli("--help").out and "--version" in run_cli("--help").out
