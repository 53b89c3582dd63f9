"""cli.py: what the `transfer` command prints around the library's own lines."""

from __future__ import annotations

import warnings

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
