"""pipeline/images.py: listing ImageFolder trees and turning files into RGB tensors."""

import os

import numpy as np
import pytest

from pipeline.errors import TransferError
from pipeline.images import DecodeError, decode_image, scan_image_folder
from tests.conftest import make_folder, write_image


def test_flat_layout_lists_classes_labels_and_paths_in_order(tmp_path):
    root = make_folder(tmp_path / "d", {"banana": 2, "apple": 3})
    listing = scan_image_folder(root)
    assert listing.classes == ["apple", "banana"]
    assert listing.paths == ["apple/img000.png", "apple/img001.png", "apple/img002.png",
                             "banana/img000.png", "banana/img001.png"]
    assert listing.labels.tolist() == [0, 0, 0, 1, 1]
    assert listing.splits is None


def test_split_layout_records_each_images_split_and_unions_classes(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 1}, splits=("train", "val"))
    make_folder(root / "test", {"c": 1})
    listing = scan_image_folder(root)
    assert listing.classes == ["a", "b", "c"]
    assert listing.splits == ["train"] * 3 + ["val"] * 3 + ["test"]
    assert listing.paths[0] == "train/a/img000.png" and listing.paths[-1] == "test/c/img000.png"
    assert listing.labels.tolist() == [0, 0, 1, 0, 0, 1, 2]


def test_extensions_are_case_insensitive_and_other_files_are_skipped(tmp_path):
    root = tmp_path / "d"
    for name in ["x.JPG", "y.Jpeg", "z.png", "w.WEBP", "v.tif", "u.TIFF", "t.bmp", "s.gif"]:
        (root / "k").mkdir(parents=True, exist_ok=True)
        (root / "k" / name).write_bytes(b"")
    (root / "k" / "notes.txt").write_text("hi")
    (root / "k" / ".DS_Store").write_bytes(b"")
    (root / ".ipynb_checkpoints").mkdir()
    listing = scan_image_folder(root)
    assert listing.classes == ["k"]
    assert len(listing) == 8
    assert listing.skipped == [("k/notes.txt", "no image extension")]


def test_nested_folders_inside_a_class_are_walked(tmp_path):
    root = tmp_path / "d"
    write_image(root / "a" / "sub" / "deep.png", 1)
    write_image(root / "a" / "top.png", 2)
    assert scan_image_folder(root).paths == ["a/sub/deep.png", "a/top.png"]


def test_order_does_not_depend_on_creation_order(tmp_path):
    first = tmp_path / "one"
    second = tmp_path / "two"
    for name in ["b.png", "a.png", "c.png"]:
        write_image(first / "k" / name, 0)
    for name in ["c.png", "a.png", "b.png"]:
        write_image(second / "k" / name, 0)
    assert scan_image_folder(first).paths == scan_image_folder(second).paths == ["k/a.png", "k/b.png", "k/c.png"]


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "has no class folders"),
    (lambda p: (p / "a").mkdir(parents=True), "has no images"),
    (lambda p: (write_image(p / "train" / "a" / "x.png", 0), (p / "cats").mkdir()), "mixes split folders"),
    (lambda p: p.write_text("not a folder"), "is not a folder"),
])
def test_bad_trees_are_refused_with_a_reason(tmp_path, setup, fragment):
    root = tmp_path / "images"
    setup(root)
    with pytest.raises(TransferError, match=fragment):
        scan_image_folder(root)


def test_decode_gives_rgb_with_the_files_pixels(tmp_path):
    path = write_image(tmp_path / "x.png", 3)
    from PIL import Image

    decoded = decode_image(str(path))
    assert decoded.mode == "RGB" and decoded.size == (48, 36)
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(path).convert("RGB")))


def test_a_symlink_loop_lists_each_photo_once_under_its_own_class(tmp_path):
    root = make_folder(tmp_path / "photos", {"ants": 2, "bees": 3})
    (root / "ants" / "up").symlink_to("..")  # photos/ants/up -> photos
    outside = make_folder(tmp_path / "elsewhere", {"more": 1})
    (root / "bees" / "extra").symlink_to(outside / "more")  # a symlinked folder outside the tree: followed
    (outside / "more" / "back").symlink_to(root / "bees")  # ...whose link back in is not
    listing = scan_image_folder(root)
    assert listing.paths == ["ants/img000.png", "ants/img001.png", "bees/extra/img000.png", "bees/img000.png",
                             "bees/img001.png", "bees/img002.png"]
    assert listing.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert [p for p, _ in listing.skipped] == ["ants/up", "bees/extra/back"]
    assert all("already listed" in why for _, why in listing.skipped)


def test_a_symlinked_class_folder_still_works(tmp_path):
    real = make_folder(tmp_path / "real", {"cats": 2})
    root = make_folder(tmp_path / "photos", {"dogs": 1})
    (root / "cats").symlink_to(real / "cats")
    assert scan_image_folder(root).paths == ["cats/img000.png", "cats/img001.png", "dogs/img000.png"]


def test_fifos_are_skipped_and_never_opened(tmp_path):
    root = make_folder(tmp_path / "photos", {"bees": 1, "ants": 1})
    os.mkfifo(root / "bees" / "p.jpg")  # opening it for reading would block forever
    (root / "lost").symlink_to(tmp_path / "nowhere")  # a dangling class-folder link
    listing = scan_image_folder(root)
    assert listing.paths == ["ants/img000.png", "bees/img000.png"]
    assert listing.skipped == [("bees/p.jpg", "not a regular file (FIFO)"),
                               ("lost", "dangling symlink where a class folder would be")]
    with pytest.raises(DecodeError, match=r"not a regular file \(FIFO\)"):
        decode_image(str(root / "bees" / "p.jpg"))
