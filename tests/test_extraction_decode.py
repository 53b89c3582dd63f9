"""pipeline/extraction/decode.py: the torch decode path gives the Pillow path's crops bit for bit, falls back to
Pillow for everything that is not a plain JPEG, and keeps the reliability matrix right."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.extraction import decode as decoding
from pipeline.backbones import load_backbone
from pipeline.images import scan_image_folder
from tests.conftest import HYMENOPTERA, make_folder, needs_hymenoptera, write_image
from tests.test_reliability_images import bomb_png, make_broken_files

PREP = {name: load_backbone(name, "random").preprocessing for name in ("vgg11", "efficientnet_lite0")}


def _photo(size, seed) -> np.ndarray:
    """A smooth picture with some texture (JPEG-like content), (h, w, 3) uint8."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 210, 3) + 30 * np.sin(xx[..., None] / rng.uniform(3, 20)) * np.cos(yy[..., None] / 7)
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def matrix_folder(root: Path) -> Path:
    """Every kind of file the reliability matrix names, in one class folder, plus broken files."""
    folder = root / "k"
    folder.mkdir(parents=True)
    Image.fromarray(_photo((300, 200), 0)).save(folder / "rgb.jpg", quality=90)
    Image.fromarray(_photo((200, 300), 1)).save(folder / "progressive.jpg", quality=85, progressive=True)
    Image.fromarray(_photo((260, 270), 2)).save(folder / "444.jpeg", quality=95, subsampling=0)
    Image.fromarray(_photo((250, 180), 3)[..., 0]).save(folder / "gray.jpg")
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        Image.fromarray(_photo((240, 320), 10 + o)).save(folder / f"exif{o}.jpg", exif=exif, quality=90)
    Image.fromarray(_photo((230, 240), 4), "RGB").convert("CMYK").save(folder / "cmyk.jpg")
    deep = (np.arange(240 * 250, dtype=np.uint32).reshape(240, 250) * 17 % 65536).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    Image.fromarray(_photo((256, 256), 5)).quantize(64).save(folder / "palette.gif")
    rgba = np.dstack([_photo((300, 250), 6), np.full((250, 300), 120, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    write_image(folder / "tiny.jpg", 7, size=(1, 1))
    (folder / "trailing.jpg").write_bytes((folder / "rgb.jpg").read_bytes() + b"junk after the end marker")
    (folder / "bomb.jpg").write_bytes(bomb_png())
    make_broken_files(root / "bad")
    return root


def _run(root: Path, decode: str, prep, batch_size=7) -> tuple[list[int], torch.Tensor, list]:
    listing = scan_image_folder(root)
    stream = decoding.batches(str(root), listing.paths, list(range(len(listing))), prep, batch_size, 0,
                              torch.device("cpu"), decode)
    indices, images, failed = [], [], []
    for batch in stream:
        indices += batch.indices.tolist()
        images.append(batch.images)
        failed += batch.failed
    return indices, torch.cat([x for x in images if len(x)]), failed


def test_torch_path_equals_pillow_on_the_reliability_matrix(tmp_path, monkeypatch, backbone="efficientnet_lite0"):
    root = matrix_folder(tmp_path / "images")
    decoded_on_device = []
    real = decoding.decode_jpegs
    monkeypatch.setattr(decoding, "decode_jpegs", lambda datas, device: decoded_on_device.extend(datas) or
                        real(datas, device))
    pil = _run(root, "pil", PREP[backbone])
    torch_path = _run(root, "torch", PREP[backbone])
    assert torch_path[0] == pil[0]  # the same images, in the same order
    assert torch.equal(torch_path[1], pil[1])  # bit for bit
    assert torch_path[2] == pil[2] and len(pil[2]) >= 7  # the same failures, with the same reasons
    # rgb, progressive, 444, gray, 8 EXIF orientations, tiny went through decode_jpeg; the rest fell back
    assert len(decoded_on_device) == 13


def test_read_jpeg_sends_everything_but_plain_jpegs_to_pillow(tmp_path):
    root = matrix_folder(tmp_path / "images")
    plain = {p.name for p in (root / "k").iterdir() if decoding.read_jpeg(str(p)) is not None}
    assert plain == {"rgb.jpg", "progressive.jpg", "444.jpeg", "gray.jpg", "tiny.jpg"} | {f"exif{o}.jpg" for o in range(1, 9)}
    assert decoding.read_jpeg(str(root / "k" / "exif6.jpg")).orientation == 6


def test_a_jpeg_decode_jpeg_rejects_is_decoded_by_pillow(tmp_path, monkeypatch):
    root = matrix_folder(tmp_path / "images")
    monkeypatch.setattr(decoding, "decode_jpegs", lambda datas, device: [None] * len(datas))
    assert torch.equal(_run(root, "torch", PREP["vgg11"])[1], _run(root, "pil", PREP["vgg11"])[1])


def test_orientation_matches_pillows_exif_transpose():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    T = Image.Transpose
    ops = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
           7: T.TRANSVERSE, 8: T.ROTATE_90}
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    assert torch.equal(decoding.orient(x, 1), x)
    for o, op in ops.items():
        expected = np.asarray(Image.fromarray(pixels).transpose(op))
        assert np.array_equal(decoding.orient(x, o).permute(1, 2, 0).numpy(), expected), o


@pytest.mark.parametrize("backbone", ["vgg11", "efficientnet_lite0"])
def test_resize_and_crop_equal_pillow_for_awkward_sizes(backbone):
    prep = PREP[backbone]
    transform = prep.pil_transform()
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (5, 3), (224, 224), (256, 400), (1000, 230), (230, 1000), (2000, 260), (301, 299), (257, 256)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    images.append(images[3].copy())  # two of one size: resized together
    got = decoding.resize_crop([torch.from_numpy(a).permute(2, 0, 1) for a in images], prep)
    for a, crop in zip(images, got):
        assert torch.equal(crop, transform(Image.fromarray(a))), a.shape


@needs_hymenoptera
def test_torch_path_equals_pillow_on_real_photos(tmp_path):
    folder = tmp_path / "photos" / "x"
    folder.mkdir(parents=True)
    for p in sorted(HYMENOPTERA.rglob("*.jp*g"))[::50]:  # 8 photos of assorted sizes
        (folder / p.name).symlink_to(p)
    pil, torch_path = (_run(tmp_path / "photos", d, PREP["vgg11"], batch_size=4) for d in ("pil", "torch"))
    assert len(pil[0]) == 8 and torch.equal(torch_path[1], pil[1])


def test_auto_is_torch_on_a_gpu_and_pillow_on_the_cpu_and_keeps_an_earlier_choice():
    assert decoding.resolve_decode("auto", torch.device("cuda")).value == "torch"
    assert decoding.resolve_decode("auto", torch.device("cpu")).value == "pil"
    assert decoding.resolve_decode("auto", torch.device("cpu"), earlier="torch").value == "torch"
    assert decoding.resolve_decode("pil", torch.device("cuda"), earlier="torch").value == "pil"


def test_prefetching_thread_gives_the_same_batches_and_raises_what_the_loader_raises(tmp_path):
    root = tmp_path / "images"
    for i in range(9):
        write_image(root / "a" / f"{i}.png", i)
    listing = scan_image_folder(root)
    prep = PREP["vgg11"]

    def run(prefetch):
        stream = decoding.batches(str(root), listing.paths, list(range(9)), prep, 4, 0, torch.device("cpu"), "pil",
                                  prefetch=prefetch)
        out = [(b.indices.tolist(), b.images) for b in stream]
        return out, stream._queue is not None

    (inline, thread_used), (threaded, thread_by_default) = run(False), run(None)  # None: the default on the CPU
    assert not thread_used and thread_by_default
    assert [i for i, _ in inline] == [i for i, _ in threaded] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(inline, threaded))

    def broken():
        yield "first"
        raise OSError("disk went away")

    stream = decoding.BatchStream(broken(), prefetch=True)
    assert next(stream) == "first"
    with pytest.raises(OSError, match="disk went away"):
        next(stream)
    stopped = decoding.BatchStream(iter(range(100)), prefetch=True)
    next(stopped)
    stopped.close()
    for t in threading.enumerate():
        if t.name == "transfer-decode":
            t.join(timeout=5)
            assert not t.is_alive()


def test_dataset_yields_uint8_tensors_and_reasons_and_collate_separates_them(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 2})
    (root / "a" / "bad.png").write_bytes(b"garbage")
    listing = scan_image_folder(root)
    transform = lambda img: torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1)
    dataset = decoding.ImageDataset(str(root), listing.paths, [0, 1, 2], transform)
    batch = decoding.collate([dataset[i] for i in range(3)])
    assert listing.paths[0] == "a/bad.png"
    assert batch.indices.tolist() == [1, 2]
    assert batch.images.shape == (2, 3, 8, 8) and batch.images.dtype == torch.uint8
    assert batch.failed == [(0, "not a recognised image format")]


def test_an_interrupted_extraction_leaves_no_decoding_thread_behind(tmp_path):
    """The prefetching thread, done with its source while the consumer stopped, used to block forever
    on a full queue: every interrupted extraction left one behind (and its batches in memory)."""
    import pipeline
    from tests.conftest import Stop, StopAfterFirstBatch

    root = make_folder(tmp_path / "images", {"a": 4, "b": 3})
    with pytest.raises(Stop):
        pipeline.extract(root, tmp_path / "c.h5", backbone="efficientnet_lite0", weights="random", device="cpu",
                         batch_size=3, workers=0, progress=StopAfterFirstBatch())
    for t in threading.enumerate():
        if t.name == "transfer-decode":
            t.join(timeout=5)
            assert not t.is_alive()
