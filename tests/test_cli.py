"""cli.py: what the `transfer` command prints around the library's own lines, and its own options
(the commands are tested with the modules they call)."""

from __future__ import annotations

import re
import warnings

import pipeline
from tests.conftest import blobs, make_cache, run_cli


def test_library_warnings_are_not_printed(tmp_path):
    """matplotlib warned once per missing glyph of a class name (and printed the name unescaped);
    --debug shows them again."""
    X, y, _ = blobs(10, 2, 4)
    cache = make_cache(tmp_path / "c.h5", X, y, ["蚂蚁🐜", "bees\x07"], splits=["train", "val"] * 10)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        result = run_cli("fit", cache, "--out", tmp_path / "run", "--C", "1", "--no-export")
    assert result.code == 0, result.err
    assert [str(w.message) for w in shown] == []  # was: one "Glyph ... missing from font(s)" per character
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        result = run_cli("--debug", "fit", cache, "--out", tmp_path / "debug", "--C", "1", "--no-export")
    assert result.code == 0, result.err
    assert any(re.search("Glyph .* missing from font", str(w.message)) for w in shown), [str(w.message) for w in shown]


def test_version_names_transfer_and_the_libraries_that_shape_its_results():
    result = run_cli("--version")
    assert result.code == 0 and result.err == ""
    line = result.out.strip()
    assert re.fullmatch(r"transfer \S+ \(torch \S+, torchvision \S+, timm \S+, scikit-learn \S+; Python \S+\)", line)
    assert line.startswith(f"transfer {pipeline.__version__} (")
    assert "transfer" in run_cli("--help").out and "--version" in run_cli("--help").out
