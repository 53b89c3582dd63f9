"""Reliability, the image matrix: broken files are recorded and skipped; unusual valid files decode
to the pixels a viewer shows; random bytes never escape the decoder as anything but DecodeError."""

from __future__ import annotations

import ctypes
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import read_cache
from pipeline.images import DecodeError, decode_image
from tests.conftest import assert_one_line_error, LITE, ROOT, make_folder, run_cli, write_image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png() -> bytes:
    """A 100-byte PNG that declares 50000 x 50000 RGB pixels (7.5 GB once decoded)."""
    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _png_chunk(b"IEND", b""))


def truncated_jpeg(tmp: Path) -> bytes:
    buf = io.BytesIO()
    write_image(tmp / "full.jpg", 7, size=(300, 200))
    data = (tmp / "full.jpg").read_bytes()
    (tmp / "full.jpg").unlink()
    buf.write(data[: len(data) // 2])
    return buf.getvalue()


def make_broken_files(folder: Path) -> dict[str, str]:
    """Writes one file per kind of breakage; returns {file name: expected reason fragment}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(truncated_jpeg(folder))
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "text.png").write_text("this is a text file, not a picture\n" * 20)
    (folder / "bomb.png").write_bytes(bomb_png())
    os.symlink(folder / "does-not-exist.jpg", folder / "dangling.jpg")
    unreadable = write_image(folder / "unreadable.png", 5)
    os.chmod(unreadable, 0)
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated",
        "random.jpg": "not a recognised image format",
        "text.png": "not a recognised image format",
        "bomb.png": "decompression bomb",
        "dangling.jpg": "dangling symlink",
        "unreadable.png": "permission denied",
    }


def _honour_permissions():
    """preexec_fn: make file permissions apply even to root, by dropping from the capability
    bounding set the two capabilities that let root read anything (before exec, so they are gone)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


# --- broken files -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["empty.jpg", "truncated.jpg", "random.jpg", "text.png", "bomb.png", "dangling.jpg"])
def test_each_broken_file_raises_decode_error_with_its_reason(tmp_path, name):
    expected = make_broken_files(tmp_path)
    with pytest.raises(DecodeError) as info:
        decode_image(str(tmp_path / name))
    assert expected[name] in info.value.reason


@pytest.mark.slow
def test_unreadable_file_reports_permission_denied(tmp_path):
    path = write_image(tmp_path / "locked.png", 1)
    os.chmod(path, 0)
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from pipeline.images import decode_image, DecodeError\n"
            "try:\n    decode_image(%r)\nexcept DecodeError as e:\n    print(e.reason)\n") % (str(ROOT), str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=_honour_permissions)
    assert out.stdout.strip() == "permission denied", out.stderr


def test_decompression_bomb_is_refused_without_allocating_it(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    process = psutil.Process()
    before = process.memory_info().rss
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(str(path))
    assert process.memory_info().rss - before < 50 * 2**20


def test_our_own_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    """Pillow refuses 50000 x 50000 itself; our limit is checked on the declared size, before load()."""
    from pipeline import images

    path = write_image(tmp_path / "big.png", 1, size=(60, 50))
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    with pytest.raises(DecodeError, match="declares 60x50 pixels, over the 1,000 pixel limit"):
        decode_image(str(path))
    assert loads == []


@pytest.mark.slow
def test_extraction_records_every_broken_file_and_keeps_going(tmp_path):
    images = tmp_path / "images"
    write_image(images / "good" / "a.png", 1)
    write_image(images / "good" / "b.jpg", 2)
    expected = make_broken_files(images / "bad")
    write_image(images / "bad" / "fine.png", 3)
    out = tmp_path / "c.h5"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "extract", str(images), "--out", str(out),
         "--backbone", "efficientnet_lite0", "--weights", "random", "--workers", "1"],
        capture_output=True, text=True, cwd=tmp_path, preexec_fn=_honour_permissions)
    assert proc.returncode == 0, proc.stderr
    cached = read_cache(out)
    assert sorted(cached.paths) == ["bad/fine.png", "good/a.png", "good/b.jpg"]
    assert cached.features().shape[0] == 3
    failed = dict(cached.failed)
    assert set(failed) == {f"bad/{name}" for name in expected}
    for name, fragment in expected.items():
        assert fragment in failed[f"bad/{name}"], (name, failed[f"bad/{name}"])
    assert "7 failed" in proc.stdout
    assert "extracted 3 images" in proc.stdout  # the 7 broken files are not counted as extracted (nor in img/s)


# --- unusual but valid files -----------------------------------------------------------------

def _rgb(path: Path) -> np.ndarray:
    return np.asarray(decode_image(str(path)), dtype=np.int32)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    deep = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 256 + 77).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = _rgb(tmp_path / "deep.png")
    assert rgb.shape == (16, 16, 3)
    expected = (deep >> 8).astype(np.int32)
    for c in range(3):
        assert np.array_equal(rgb[..., c], expected)


def test_16_bit_rgb_png_keeps_its_colour(tmp_path):
    h, w = 3, 4
    raw = b"".join(b"\x00" + np.tile(np.array([65535, 32768, 256], ">u2"), w).tobytes() for _ in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")
    (tmp_path / "rgb16.png").write_bytes(png)
    assert np.array_equal(_rgb(tmp_path / "rgb16.png")[1, 2], [255, 128, 1])


def test_palette_gif_uses_its_palette(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(indices, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.save(tmp_path / "p.gif")
    rgb = _rgb(tmp_path / "p.gif")
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 1].tolist() == [0, 255, 0] and rgb[1, 0].tolist() == [0, 0, 255]


def test_rgba_png_is_composited_over_white(tmp_path):
    pixels = np.zeros((1, 3, 4), dtype=np.uint8)
    pixels[0, 0] = [10, 20, 30, 255]  # opaque
    pixels[0, 1] = [10, 20, 30, 0]  # fully transparent
    pixels[0, 2] = [0, 0, 0, 128]  # half-transparent black
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    rgb = _rgb(tmp_path / "a.png")
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert np.all(np.abs(rgb[0, 2] - 127) <= 1)


def test_cmyk_jpeg_shows_its_colours(tmp_path):
    original = np.zeros((16, 16, 3), dtype=np.uint8)
    original[:, :8] = [200, 40, 40]
    original[:, 8:] = [30, 60, 220]
    Image.fromarray(original, "RGB").convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    rgb = _rgb(tmp_path / "c.jpg")
    assert np.abs(rgb[4, 2] - original[4, 2]).max() <= 8
    assert np.abs(rgb[4, 13] - original[4, 13]).max() <= 8


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    rgb = _rgb(tmp_path / "g.png")
    assert all(np.array_equal(rgb[..., c], gray) for c in range(3))


def test_one_pixel_image_survives_preprocessing(tmp_path):
    Image.fromarray(np.array([[[9, 99, 199]]], dtype=np.uint8), "RGB").save(tmp_path / "one.png")
    from pipeline.backbones import load_backbone

    tensor = load_backbone("vgg11", "random").preprocessing.pil_transform()(decode_image(str(tmp_path / "one.png")))
    assert tensor.shape == (3, 224, 224)
    assert tensor[:, 100, 100].tolist() == [9, 99, 199]


def test_exif_rotated_jpeg_is_shown_upright(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = [255, 0, 0]  # left half red
    stored[:, 20:] = [0, 0, 255]  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored, "RGB").save(tmp_path / "r.jpg", exif=exif, quality=100)
    rgb = _rgb(tmp_path / "r.jpg")
    assert rgb.shape == (40, 20, 3)  # upright: portrait
    assert rgb[5, 10, 0] > 200 and rgb[5, 10, 2] < 60  # top is red (was left)
    assert rgb[35, 10, 2] > 200 and rgb[35, 10, 0] < 60  # bottom is blue


def test_non_utf8_file_name_is_stored_losslessly_and_found_again(tmp_path):
    images = tmp_path / "images"
    write_image(images / "k" / "plain.png", 1)
    raw_name = b"caf\xe9-\xff.png"  # Latin-1, not valid UTF-8
    write_image(Path(os.fsdecode(os.fsencode(str(images / "k")) + b"/" + raw_name)), 2)
    out = tmp_path / "c.h5"
    result = run_cli("extract", images, "--out", out, "--backbone", "efficientnet_lite0", "--weights", "random")
    assert result.code == 0, result.err
    cached = read_cache(out)
    stored, shown, image_dir = cached.path_bytes, cached.paths, cached.image_dir
    assert b"k/" + raw_name in stored
    assert "k/caf\\xe9-\\xff.png" in shown
    found = os.path.join(os.fsencode(image_dir), b"k/" + raw_name)
    assert os.path.isfile(found)
    assert np.asarray(decode_image(os.fsdecode(found))).shape == (36, 48, 3)


# --- fuzzing the decode path -------------------------------------------------------------------

PREFIXES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=2048))
def test_random_bytes_only_ever_raise_decode_error(tmp_path, prefix, body):
    path = tmp_path / "fuzz.img"
    path.write_bytes(prefix + body)
    try:
        image = decode_image(str(path))
    except DecodeError as e:
        assert e.reason and "\n" not in e.reason
    else:
        assert image.mode == "RGB"


@pytest.mark.slow
def test_a_folder_whose_own_name_is_not_utf8_extracts_fits_and_predicts(tmp_path):
    """`/data/caf\\xe9/`: the folder's path is stored losslessly and every stage works from it."""
    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9"))
    images = make_folder(folder / "photos", {"a": 2, "b": 2}, splits=("train", "val", "test"))
    out = folder / "cache" / "c.h5"
    extracted = run_cli("extract", images, "--out", out, *LITE)
    assert extracted.code == 0, extracted.err
    cached = read_cache(out)
    assert os.fsencode(cached.image_dir) == os.fsencode(str(images))
    assert cached.provenance["image_dir"].endswith("caf\\xe9/photos")  # readable text beside the bytes
    fitted = run_cli("fit", out, "--C", "0.1", "--out", folder / "run")
    assert fitted.code == 0, fitted.err
    assert "parity: model.pt on 12 original images" in fitted.out
    predicted = run_cli("predict", folder / "run" / "model.pt", images / "test", "--out", folder / "p.csv")
    assert predicted.code == 0, predicted.err
    assert (folder / "p.csv").read_bytes().count(b".png") == 4


@pytest.mark.timeout(120)
def test_fifos_and_symlink_loops_neither_hang_nor_duplicate_extract_and_predict(tmp_path, three_run):
    images = make_folder(tmp_path / "photos", {"ants": 2, "bees": 2})
    os.mkfifo(images / "bees" / "p.jpg")
    (images / "ants" / "up").symlink_to("..")
    result = run_cli("extract", images, "--out", tmp_path / "c.h5", *LITE)
    assert result.code == 0, result.err
    assert read_cache(tmp_path / "c.h5").paths == ["ants/img000.png", "ants/img001.png", "bees/img000.png",
                                                   "bees/img001.png"]
    assert "skipped (not a regular file (FIFO)): bees/p.jpg" in result.out
    assert "skipped (symlink to a folder that is already listed" in result.out and "ants/up" in result.out
    predicted = run_cli("predict", three_run / "model.pt", images, images / "bees" / "p.jpg", "--out",
                        tmp_path / "p.csv")
    assert predicted.code == 0, predicted.err
    rows = (tmp_path / "p.csv").read_text().splitlines()[1:]
    assert len(rows) == 5 and rows[-1].endswith("not a regular file (FIFO)")  # 4 photos once each, the FIFO refused


def test_a_fifo_or_device_given_as_a_file_is_named_as_such(tmp_path):
    """A model, manifest, weights or cache argument that is a FIFO or /dev/zero: said so, never
    "does not exist", and never opened (a FIFO would block)."""
    os.mkfifo(tmp_path / "fifo")
    images = make_folder(tmp_path / "photos", {"ants": 1, "bees": 1})
    fifo, device = "is a FIFO, not a regular file", "is a character device, not a regular file"
    for args, fragments in [
        (("predict", tmp_path / "fifo", images), ("model file", fifo)),
        (("predict", "/dev/zero", images), ("model file", device)),
        (("extract", "--manifest", tmp_path / "fifo", "--out", tmp_path / "c.h5"), ("manifest", fifo)),
        (("extract", images, "--out", tmp_path / "c.h5", "--backbone", "resnet18", "--weights", "/dev/zero"),
         ("weights file", device)),
        (("fit", tmp_path / "fifo", "--out", tmp_path / "run"), (fifo,)),
    ]:
        assert_one_line_error(run_cli(*args), *fragments)
