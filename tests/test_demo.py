"""pipeline/demo.py through `transfer demo` (what `make demo` runs), on a few digits per class."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from pipeline import read_cache
from pipeline.demo import write_digits
from tests.conftest import ROOT, run_cli


def test_write_digits_is_a_stratified_split_tree(tmp_path):
    counts = write_digits(str(tmp_path / "d"), per_class=2)
    assert counts == {"train": 20, "val": 20, "test": 20}
    assert sorted(p.name for p in (tmp_path / "d" / "val").iterdir()) == [str(i) for i in range(10)]


@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_its_try_it_line_works_from_elsewhere(tmp_path):
    result = run_cli("demo", "--workdir", tmp_path / "demo", "--per-class", "2", cwd=tmp_path)
    assert result.code == 0, result.err
    assert read_cache(tmp_path / "demo" / "digits-2.h5").provenance["pretrained"] is True
    assert "parity: model.pt on" in result.out and "results:" in result.out
    line = [l for l in result.out.splitlines() if l.startswith("try it:")][0]
    command = shlex.split(line.removeprefix("try it:"))
    assert command[:2] == ["python", str(ROOT / "cli.py")]  # as this test ran it: `python cli.py demo`
    command[0] = sys.executable  # the python that has torch
    ran = subprocess.run(command, capture_output=True, text=True, cwd="/")  # another folder
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.count(".png") == 2  # the two test images of digit 7
