"""pipeline/cache/format.py: names, listing digests and attributes."""

from __future__ import annotations

import os

import h5py

from pipeline import cache
from pipeline.cache.format import read_attrs, write_attrs
from tests.conftest import CACHE_LABELS as LABELS, CACHE_PATHS as PATHS, CACHE_SPLITS as SPLITS


def test_listing_digest_sees_any_change_of_rows():
    base = cache.listing_digest(["a", "b"], PATHS, LABELS, SPLITS)
    assert base == cache.listing_digest(["a", "b"], list(PATHS), LABELS.copy(), list(SPLITS))
    assert base != cache.listing_digest(["a", "b"], PATHS[::-1], LABELS, SPLITS)
    assert base != cache.listing_digest(["a", "b"], PATHS, 1 - LABELS, SPLITS)
    assert base != cache.listing_digest(["a", "b"], PATHS, LABELS, None)


def test_display_path_escapes_undecodable_bytes():
    assert cache.display_path(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
    assert cache.display_path(b"caf\xe9.png") == "caf\\xe9.png"
    assert cache.display_path("café.png") == "café.png"


def test_attributes_round_trip_including_names_that_are_not_utf8(tmp_path):
    folder = os.fsdecode(b"/data/caf\xe9")
    meta = {"image_dir": folder, "image_dir_bytes": os.fsencode(folder), "classes": ["a", "b"], "dim": 4,
            "preprocessing": {"resize": 8}, "weights_sha256": None, "pretrained": True}
    with h5py.File(tmp_path / "a.h5", "w") as f:
        write_attrs(f, meta)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        back = read_attrs(f)
    assert back["image_dir"] == "/data/caf\\xe9"  # readable text for any HDF5 tool...
    assert back["image_dir_bytes"] == b"/data/caf\xe9"  # ...and the exact bytes beside it
    assert back["classes"] == ["a", "b"] and back["preprocessing"] == {"resize": 8}
    assert back["weights_sha256"] == "" and back["pretrained"] is True and back["dim"] == 4
