"""pipeline/shipping/export.py: head.pt equals scikit-learn, model.pt stands alone and agrees end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import head as head_mod
from pipeline import read_cache
from pipeline.errors import TransferError
from pipeline.shipping.model import TransferModel
from pipeline.images import decode_image
from tests.conftest import (HYMENOPTERA, ROOT, assert_one_line_error, needs_hymenoptera, run_cli,
                            subset_cache, write_image)

@pytest.mark.slow  # a fitted and exported run
@pytest.mark.parametrize("run_name", ["binary_run", "three_run"])
def test_parity_is_checked_and_recorded(request, run_name):
    run = request.getfixturevalue(run_name)
    parity = json.loads((run / "parity.json").read_text())
    cached, e2e = parity["cached_features"], parity["torchscript"]["end_to_end"]
    assert cached["rows"] == read_cache(json.loads((run / "head.json").read_text())["provenance"]["cache"]).n
    assert cached["max_abs_diff"] <= 1e-5 and cached["argmax_identical"]
    assert e2e["images"] > 0 and e2e["max_abs_diff"] <= e2e["tolerance"] and e2e["argmax_identical"]
    if e2e["precision"] == "bf16":  # three_run: model.pt is held to fp32's tolerance against fp32 features
        assert e2e["tolerance"] == 1e-4 and "repeated in fp32" in e2e["reference"]
        assert 0.9 < e2e["cached_feature_cosine_min"] <= 1.0


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("model.pt", "head.pt", "parity.json"):
        (copy / name).unlink()
    return copy


def test_a_head_that_disagrees_with_scikit_learn_is_not_exported(three_run, tmp_path):
    run = _copy_run(three_run, tmp_path)
    arrays = dict(np.load(run / "head.npz"))
    arrays["weight"][0, 0] += 0.5  # the folded Linear no longer equals the unfolded scikit-learn arrays
    np.savez(run / "head.npz", **arrays)
    result = run_cli("export", run)
    assert_one_line_error(result, "the torch Linear disagrees with scikit-learn")
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in three_run.iterdir()
                                                           if p.name not in ("model.pt", "head.pt", "parity.json"))


@pytest.mark.slow
def test_a_model_pt_that_disagrees_end_to_end_is_not_exported(three_run, tmp_path, monkeypatch):
    from pipeline import export as export_function

    run = _copy_run(three_run, tmp_path)
    real = TransferModel.__init__

    def wrong_mean(self, backbone, weight, bias, l2, prep, *rest):  # model.pt alone normalizes differently
        real(self, backbone, weight, bias, l2, dataclasses.replace(prep, mean=(0.1, 0.2, 0.3)), *rest)

    monkeypatch.setattr(TransferModel, "__init__", wrong_mean)
    with pytest.raises(TransferError, match="model.pt on .* original images disagrees with scikit-learn"):
        export_function(run)
    assert not (run / "model.pt").exists() and not (run / "parity.json").exists()
    assert not list(run.glob("*.writing-*"))


@pytest.mark.parametrize("run_name", ["binary_run", "three_run"])
def test_head_pt_is_a_linear_whose_softmax_is_predict_proba(request, run_name):
    run = request.getfixturevalue(run_name)
    state = torch.load(run / "head.pt", weights_only=True)
    linear = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    linear.load_state_dict(state)
    info = read_cache(json.loads((run / "head.json").read_text())["provenance"]["cache"])
    X = info.features(dtype=np.float64)
    sklearn = head_mod.sklearn_from_arrays(head_mod.load(str(run))).predict_proba(X)
    with torch.inference_mode():
        p = torch.softmax(linear(torch.from_numpy(X).float()), 1).double().numpy()
    assert p.shape == sklearn.shape == (len(X), len(info.classes))
    np.testing.assert_allclose(p, sklearn, atol=1e-5, rtol=0)


def test_arrays_rebuild_the_pickled_pipeline_exactly(three_run):
    import joblib

    info = read_cache(json.loads((three_run / "head.json").read_text())["provenance"]["cache"])
    X = info.features(dtype=np.float64)
    pickled = joblib.load(three_run / "model.joblib")  # the user's explicit choice, in this test only
    np.testing.assert_array_equal(head_mod.sklearn_from_arrays(head_mod.load(str(three_run))).predict_proba(X),
                                  pickled.predict_proba(X))


STANDALONE = r"""
import json, sys
import torch
images = torch.load(sys.argv[2], weights_only=True)
extra = {"transfer.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=extra)
with torch.inference_mode():
    probs = [model(x.unsqueeze(0))[0].tolist() for x in images]
others = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("pipeline", "torchvision", "timm", "PIL", "sklearn", "h5py"))
print(json.dumps({"classes": list(model.classes), "meta": json.loads(extra["transfer.json"]), "probs": probs, "others": others}))
"""


@pytest.mark.slow
def test_model_pt_works_with_plain_torch_and_matches_predict(three_run, tmp_path):
    files = sorted((three_run.parent / "three-images" / "test").rglob("*.png"))
    write_image(tmp_path / "odd-size.png", 99, size=(301, 177))  # any size
    files.append(tmp_path / "odd-size.png")
    images = [torch.from_numpy(np.array(decode_image(str(f)))).permute(2, 0, 1).contiguous() for f in files]
    torch.save(images, tmp_path / "images.pt")
    out = subprocess.run([sys.executable, "-c", STANDALONE, str(three_run / "model.pt"), str(tmp_path / "images.pt")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    standalone = json.loads(out.stdout)
    assert standalone["others"] == []  # nothing but torch was needed
    assert standalone["classes"] == ["a", "b", "c"]
    meta = standalone["meta"]
    assert meta["backbone"] == "efficientnet_lite0" and meta["preprocessing"]["crop"] == 224
    predicted = run_cli("predict", three_run / "model.pt", *files, "--out", tmp_path / "p.json", "--top-k", "3")
    assert predicted.code == 0, predicted.err
    doc = json.loads((tmp_path / "p.json").read_text())
    for row, probs in zip(doc, standalone["probs"]):
        by_label = {p["label"]: p["probability"] for p in row["predictions"]}
        np.testing.assert_allclose([by_label[c] for c in standalone["classes"]], probs, atol=1e-6)


def test_model_pt_takes_a_batch_of_uint8_images_and_returns_probabilities(binary_run):
    model = torch.jit.load(binary_run / "model.pt")
    x = torch.randint(0, 256, (3, 3, 260, 200), dtype=torch.uint8)
    with torch.inference_mode():
        p = model(x)
    assert p.shape == (3, 2)
    np.testing.assert_allclose(p.sum(1).numpy(), 1, atol=1e-6)
    with pytest.raises(Exception, match="uint8"):
        model(x.float())


def test_preprocess_equals_the_extractions_pillow_resize_and_crop(three_run):
    """model.pt's own crop is bit-identical to the Pillow path features were extracted with."""
    from PIL import Image

    from pipeline.backbones import Preprocessing

    model = torch.jit.load(three_run / "model.pt")
    prep = Preprocessing.from_dict(json.loads((three_run / "head.json").read_text())["provenance"]["preprocessing"])
    rng = np.random.default_rng(0)
    for h, w in [(300, 451), (451, 300), (256, 256), (225, 900), (40, 30), (1, 1)]:
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        expected = prep.pil_transform()(Image.fromarray(pixels))
        got = model.preprocess(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
        assert torch.equal(got, expected), (h, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_model_pt_runs_on_cuda(three_run):
    model = torch.jit.load(three_run / "model.pt", map_location="cuda")
    x = torch.randint(0, 256, (2, 3, 240, 320), dtype=torch.uint8)
    with torch.inference_mode():
        cpu = torch.jit.load(three_run / "model.pt")(x)
        gpu = model(x.cuda()).cpu()
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), atol=1e-3)


@pytest.mark.slow
def test_export_command_rewrites_the_model_to_another_path(three_run, tmp_path):
    result = run_cli("export", three_run, "--out", tmp_path / "shipped.pt")
    assert result.code == 0, result.err
    assert (tmp_path / "shipped.pt").is_file() and "parity" in result.out


def test_export_bad_inputs(three_run, tmp_path):
    assert_one_line_error(run_cli("export", tmp_path), "is not a fit run")
    assert_one_line_error(run_cli("export", tmp_path / "nope"), "is not a folder")
    cache = json.loads((three_run / "head.json").read_text())["provenance"]["cache"]
    assert_one_line_error(run_cli("export", cache), "is not a folder")  # export on a cache
    (tmp_path / "a-file").write_text("not a folder")
    assert_one_line_error(run_cli("export", three_run, "--out", tmp_path / "a-file" / "m.pt"),
                          "cannot create the output folder")


def test_transfer_model_module_is_scriptable_with_any_head():
    from pipeline.backbones import load_backbone

    b = load_backbone("efficientnet_lite0", "random")
    model = TransferModel(b.network, torch.randn(4, 1280), torch.zeros(4), True, b.preprocessing, list("wxyz"), {})
    scripted = torch.jit.script(model.eval())
    x = torch.randint(0, 256, (1, 3, 230, 230), dtype=torch.uint8)
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(x).numpy(), model(x).numpy(), atol=1e-6)
    assert scripted.classes == ["w", "x", "y", "z"]


def _model_with_a_class_name_that_is_not_utf8() -> TransferModel:
    """A TransferModel over a pooling 'backbone' whose class 0 (the bytes caf\\xe9) wins with p ~ 1."""
    import os

    from pipeline.backbones import Preprocessing
    from pipeline.shipping import formats

    name = os.fsdecode(b"caf\xe9")
    prep = Preprocessing(8, 8, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return TransferModel(pool, torch.zeros(2, 3), torch.tensor([9.0, 0.0]), False, prep, [name, "tea"],
                         {"format": formats.MODEL_FORMAT, "classes": [name, "tea"]}).eval()


def test_class_names_that_are_not_utf8_survive_into_model_pt_and_predict(tmp_path):
    """TorchScript strings are UTF-8: model.classes shows such a name as \\xNN, the metadata keeps its bytes."""
    import os

    import pipeline
    from pipeline.shipping import formats

    model = _model_with_a_class_name_that_is_not_utf8()
    formats.write("torchscript", model, str(tmp_path / "model.pt"))  # was: Could not cast attribute 'classes'
    assert torch.jit.load(str(tmp_path / "model.pt")).classes == ["caf\\xe9", "tea"]
    loaded = pipeline.load_model(tmp_path / "model.pt", "cpu")
    assert [os.fsencode(c) for c in loaded.classes] == [b"caf\xe9", b"tea"]  # the exact bytes
    result = run_cli("predict", tmp_path / "model.pt", write_image(tmp_path / "p.png", 1, size=(16, 12)))
    assert result.code == 0 and "caf\\xe9 1.000" in result.out, result.out + result.err


@pytest.mark.slow  # one torch.export trace and the ONNX exporter of the exact resize (~20 s), even for this tiny model
def test_class_names_that_are_not_utf8_survive_into_model_onnx_and_pt2_and_predict(tmp_path):
    """model.onnx and model.pt2 hold class names only in their metadata: the exact bytes (JSON escapes),
    loaded back as the same name and printed by predict as \\xNN, as fit prints it. Both files are
    written as `transfer export` writes them, from one trace."""
    import os

    import pipeline
    from pipeline.shipping import formats

    model = _model_with_a_class_name_that_is_not_utf8()
    model.vertical_first_rule = False  # one pass order: no torch.cond in the graph, half the trace and load time
    program = formats.image_program(model)
    photo = write_image(tmp_path / "p.png", 1, size=(16, 12))
    for name in ("model.onnx", "model.pt2"):
        formats.write(formats.format_of(name), model, str(tmp_path / name), program)
        loaded = pipeline.load_model(tmp_path / name, "cpu")  # (predict below gets the same runtime back)
        assert [os.fsencode(c) for c in loaded.classes] == [b"caf\xe9", b"tea"], name  # the exact bytes
        assert [p.labels for p in pipeline.predict(loaded, [photo], progress=False)] == [loaded.classes], name
        shown = run_cli("predict", tmp_path / name, photo)
        assert shown.code == 0 and "caf\\xe9 1.000" in shown.out, shown.out + shown.err


@needs_hymenoptera
def test_real_photos_model_pt_on_raw_val_files(hymenoptera_lite0, tmp_path):
    """Fit on the train photos' features only, then run model.pt on the raw val files: top-1 >= 0.92."""
    info = read_cache(hymenoptera_lite0)
    train_only = subset_cache(hymenoptera_lite0, tmp_path / "train.h5", np.flatnonzero(info.split == "train"))
    run = tmp_path / "run"
    fitted = run_cli("fit", train_only, "--out", run)
    assert fitted.code == 0, fitted.err
    out = tmp_path / "val.csv"
    predicted = run_cli("predict", run / "model.pt", HYMENOPTERA / "val", "--out", out, "--top-k", "1")
    assert predicted.code == 0, predicted.err
    import csv

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 153 and not any(r["error"] for r in rows)
    truth = [Path(r["path"]).parent.name for r in rows]
    accuracy = np.mean([r["label_1"] == t for r, t in zip(rows, truth)])
    assert accuracy >= 0.92, accuracy


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler on this machine")
def test_cpp_example_loads_model_pt_with_libtorch_alone(three_run, tmp_path):
    """examples/cpp/classify.cpp, built against the libtorch inside the torch wheel, names the same class
    with the same probability as Python for a one-colour image."""
    torch_dir = Path(torch.__file__).parent
    binary = tmp_path / "classify"
    build = subprocess.run(["g++", "-std=c++20", "-O1", str(ROOT / "examples" / "cpp" / "classify.cpp"),
                            f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}",
                            f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-ltorch", "-ltorch_cpu",
                            "-lc10", "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    ran = subprocess.run([str(binary), str(three_run / "model.pt"), "200", "30", "90"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    label, probability = ran.stdout.split()
    image = torch.empty(1, 3, 480, 640, dtype=torch.uint8)
    for c, v in enumerate((200, 30, 90)):
        image[:, c] = v
    with torch.inference_mode():
        p = torch.jit.load(three_run / "model.pt")(image)[0]
    assert label == ["a", "b", "c"][int(p.argmax())]
    assert float(probability) == pytest.approx(float(p.max()), abs=1e-5)


@pytest.mark.slow
def test_export_takes_a_moved_weights_file_with_weights_and_refuses_another(tmp_path):
    """The backbone is rebuilt from the weights file recorded at extraction: moved, export says how to
    go on; --weights NEWPATH must be the same file (sha256); the recorded preprocessing is shipped."""
    import torchvision

    from tests.conftest import make_folder

    torch.manual_seed(2)
    state = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    torch.save(state, tmp_path / "mnv3.pth")
    images = make_folder(tmp_path / "images", {"a": 2, "b": 2}, splits=("train", "val", "test"))
    cache, run = tmp_path / "c.h5", tmp_path / "run"
    assert run_cli("extract", images, "--out", cache, "--backbone", "mobilenet_v3_small", "--weights",
                   tmp_path / "mnv3.pth", "--precision", "fp32", "--batch-size", "12",
                   "--preprocessing", "resize=180,crop=160").code == 0
    result = run_cli("fit", cache, "--out", run, "--C", "0.1", "--no-export")
    assert result.code == 0, result.err
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "mnv3.pth", tmp_path / "moved" / "mnv3.pth")

    assert_one_line_error(run_cli("export", run), f"the weights file {tmp_path / 'mnv3.pth'}", "is gone",
                          "--weights FILE")
    torch.save({k: v * 2 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "other.pth")
    assert_one_line_error(run_cli("export", run, "--weights", tmp_path / "other.pth"),
                          "are not the ones the features were extracted with")
    assert not (run / "model.pt").exists()
    result = run_cli("export", run, "--weights", tmp_path / "moved" / "mnv3.pth")
    assert result.code == 0, result.err
    assert json.loads((run / "parity.json").read_text())["torchscript"]["end_to_end"]["images"] == 12
    model = torch.jit.load(run / "model.pt")
    assert (model.resize_to, model.crop) == (180, 160)
    assert json.loads(model.metadata)["preprocessing"]["resize"] == 180


def _damage(path: Path) -> None:
    """Zero 1,000 bytes in the middle of the largest tensor stored in a zip archive (model.pt,
    model.pt2: members are stored uncompressed), keeping the archive itself valid."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert member.compress_type == zipfile.ZIP_STORED and member.file_size > 4000
    with open(path, "r+b") as f:
        f.seek(member.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
        f.seek(member.header_offset + 30 + name_len + extra_len + member.file_size // 2)
        f.write(bytes(1000))


def test_a_damaged_model_file_is_refused_when_loaded(binary_run, tmp_path):
    import pipeline
    from pipeline.errors import InputFileError

    model = tmp_path / "model.pt"
    shutil.copy(binary_run / "model.pt", model)
    assert pipeline.load_model(model, "cpu").classes == ["ants", "bees"]  # intact: checked and loaded
    _damage(model)
    assert torch.jit.load(str(model)) is not None  # torch itself notices nothing
    with pytest.raises(InputFileError, match="model.pt is damaged or was edited: its weights"):
        pipeline.load_model(model, "cpu")
    image = tmp_path / "x.png"
    write_image(image, 1)
    assert_one_line_error(run_cli("predict", model, image), "is damaged", "export it again")


def test_no_room_for_the_model_is_refused_before_anything_is_written(binary_run, tmp_path, monkeypatch):
    run = _copy_run(binary_run, tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=5 * 2**20))
    assert_one_line_error(run_cli("export", run), "not enough free space in", "model.pt", "MiB needed, 5 MiB free")
    assert not (run / "model.pt").exists() and not list(run.glob("*.writing-*"))


def test_a_write_that_fails_midway_is_one_line_and_leaves_nothing(binary_run, tmp_path, monkeypatch):
    import errno

    from pipeline.shipping import formats

    run = _copy_run(binary_run, tmp_path)

    def full_disk(fmt, model, path, program=None):
        Path(path).write_bytes(b"PK" * 1000)  # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(formats, "write", full_disk)
    assert_one_line_error(run_cli("export", run), "writing model.pt into", "failed: No space left on device")
    assert not (run / "model.pt").exists() and not (run / "head.pt").exists() and not list(run.glob("*.writing-*"))


@pytest.mark.slow
def test_photos_edited_after_extraction_are_named_and_can_be_skipped(tmp_path):
    from tests.conftest import fitted_run

    run = _copy_run(fitted_run(tmp_path, {"ants": 2, "bees": 2}, "edited", "fp32"), tmp_path / "copy")
    for photo in sorted((tmp_path / "edited-images").rglob("*.png")):
        write_image(photo, 1000 + len(str(photo)), size=(97, 61))  # other pixels, another size
    result = run_cli("export", run)
    assert_one_line_error(result, "disagrees with scikit-learn", "changed since extraction (size or mtime), e.g. ",
                          "--skip-image-parity")
    assert not (run / "model.pt").exists()
    result = run_cli("export", run, "--skip-image-parity")
    assert result.code == 0, result.err
    assert "model.pt end to end not checked: asked for (--skip-image-parity)" in result.out
    parity = json.loads((run / "parity.json").read_text())
    assert parity["torchscript"]["end_to_end"] == {"skipped": "asked for (--skip-image-parity)"}
    assert parity["cached_features"]["max_abs_diff"] <= 1e-5  # the cached-feature check still ran


@pytest.fixture
def synthetic_runs(tmp_path):
    """Two fit runs (A, B) of one synthetic cache: quick, and enough for the checks export makes
    before it builds a backbone."""
    import pipeline
    from tests.conftest import blobs, make_cache

    X, y, classes = blobs(10, 2, 4)
    cache = make_cache(tmp_path / "c.h5", X, y, classes, splits=["train", "val"] * 10)
    for name, C in (("A", 1.0), ("B", 0.01)):  # the head files alone: what export reads of a run
        (tmp_path / name).mkdir()
        head_mod.save(pipeline.fit(cache, None, C=C).head, str(tmp_path / name))
    (tmp_path / "B" / "report.md").write_text("# B's report")
    return tmp_path


def test_export_refuses_a_folder_holding_another_runs_files_and_an_empty_out(synthetic_runs):
    import pipeline
    from pipeline.errors import InputFileError, SettingError

    b = synthetic_runs / "B"
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    for out in (b, b / "model.pt"):
        with pytest.raises(InputFileError, match="holds another run's files .*head.json"):
            pipeline.export(synthetic_runs / "A", out)
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    assert_one_line_error(run_cli("export", synthetic_runs / "A", "--out", b), "holds another run's files")
    with pytest.raises(SettingError, match="--out .* is empty"):
        pipeline.export(synthetic_runs / "A", "")  # was: written into the current folder
    assert_one_line_error(run_cli("export", synthetic_runs / "A", "--out", ""), "is empty")


def test_export_removes_temporaries_of_killed_exports_and_names_a_replaced_cache(synthetic_runs):
    import pipeline
    from pipeline.errors import InputFileError
    from tests.conftest import blobs
    from tests.test_files import _dead_pid

    a = synthetic_runs / "A"
    left = a / f"model.pt.writing-{_dead_pid()}"  # what `kill -9` during an export leaves
    left.write_bytes(b"13.9 MB of a half-written model")
    assert_one_line_error(run_cli("export", a))  # fails later: a synthetic cache has no backbone to ship
    assert not left.exists()
    X, y, classes = blobs(10, 2, 8)  # the cache replaced by an extraction of another dimension
    pipeline.write_cache(synthetic_runs / "c.h5", X, y, classes=classes, overwrite=True)
    with pytest.raises(InputFileError, match="no longer the one this head was fitted on .*8-d features, the head takes 4-d"):
        pipeline.export(a)


def test_a_cache_without_a_backbone_fits_and_ships_its_head_alone(tmp_path):
    """Features computed elsewhere (`write_cache`, no backbone): `transfer fit` writes the run, a page
    without thumbnails or warnings, head.pt checked against scikit-learn, and one line on why no
    model file; `transfer export` of that run, which asks for a model file, is refused in one line."""
    from pipeline import write_cache

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(1.5, 1, (30, 8))]).astype(np.float32)
    cache = tmp_path / "elsewhere.h5"
    write_cache(cache, X, np.repeat([0, 1], 30), classes=["a", "b"], split=["train", "val", "test"] * 20)
    run = tmp_path / "run"
    result = run_cli("fit", cache, "--out", run, "--C", "0.1")
    assert result.code == 0, result.err
    said = [line for line in result.err.splitlines() if line.startswith(("warning", "note"))]
    assert said == [], result.err  # progress lines name the page's parts; no warning about thumbnails
    skipped = [line for line in result.out.splitlines() if "model" in line and "skipped" in line]
    assert len(skipped) == 1 and "records no backbone" in skipped[0], result.out
    assert not [p for p in run.glob("model.*") if p.suffix in (".pt", ".onnx", ".pt2")]
    assert (run / "head.pt").is_file() and (run / "head.npz").is_file()
    state = torch.load(run / "head.pt", weights_only=True)
    linear = torch.nn.Linear(8, 2).double()
    linear.load_state_dict({k: v.double() for k, v in state.items()})
    reference = head_mod.sklearn_from_arrays(head_mod.load(run))
    with torch.no_grad():
        ours = torch.softmax(linear(torch.from_numpy(X).double()), 1).numpy()
    assert np.abs(ours - reference.predict_proba(X)).max() < 1e-6
    page = (run / "report.html").read_text()
    assert "no image file" in page and "image not found" not in page and "no image folder recorded" in page
    before = sorted(p.name for p in run.iterdir())
    refused = run_cli("export", run)
    assert_one_line_error(refused, "records no backbone", "head.pt")
    assert sorted(p.name for p in run.iterdir()) == before


def test_export_shows_its_steps_before_the_first_figure_and_imports_no_dynamo(binary_run, tmp_path):
    """#25: no silent minute (phases on stderr while it works); #23: model.pt alone needs no torch._dynamo or onnx."""
    import os

    out = tmp_path / "m" / "model.pt"
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "cli.py"), "export", str(binary_run),
                           "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    # torch._dynamo comes with torchvision 0.29 itself (torchvision.ops.roi_align), which every backbone needs
    assert not {"onnx", "onnxruntime", "onnxscript", "torch.onnx._internal.exporter._core"} & imported
    said = [line for line in lines if not line.startswith("import time:")]
    first = next(i for i, line in enumerate(said) if line.startswith("parity: "))
    before = "\n".join(said[:first])
    for step in ("building the model: efficientnet_lite0", "reading the images to check", "writing model.pt",
                 "model.pt written and loaded back in", "checking model.pt on 12 original images"):
        assert step in before, before
    assert "precision: fp32 (auto: the features were extracted in fp32)" in proc.stdout
    model, head = (next(line.split(": ", 1)[1] for line in said if line.startswith(what)) for what in ("model: ", "head: "))
    assert os.path.dirname(model.split(" (")[0]) == os.path.dirname(head)  # both relative, or both absolute


def test_auto_precision_follows_the_cache_and_the_machine(monkeypatch):
    from types import SimpleNamespace

    from pipeline.errors import SettingError
    from pipeline.shipping import export as export_mod

    def resolved(requested, precision, chosen=("torchscript",)):
        return export_mod.resolve_precision(requested, SimpleNamespace(provenance={"precision": precision}),
                                            list(chosen)).value

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(export_mod, "cpu_bf16", lambda: (False, "this CPU emulates bf16"))
    assert resolved("auto", "bf16") == "fp32" and resolved("auto", "fp32") == "fp32"
    assert resolved("bf16", "fp32") == "bf16" and resolved("fp32", "bf16") == "fp32"
    monkeypatch.setattr(export_mod, "cpu_bf16", lambda: (True, "AMX"))
    assert resolved("auto", "bf16") == "bf16" and resolved("auto", "fp32") == "fp32"
    assert resolved("auto", "bf16", ("torchscript", "onnx")) == "fp32"  # model.onnx is fp32 only
    with pytest.raises(SettingError, match="model.onnx is written in fp32 only"):
        resolved("bf16", "bf16", ("onnx",))


def test_a_bf16_model_pt_is_checked_to_the_bf16_bound_and_predicts(three_run, tmp_path, monkeypatch):
    from pipeline import export as export_function
    from pipeline.shipping import parity
    from pipeline.shipping.predict import predict

    monkeypatch.setattr(parity, "PARITY_IMAGES", 3)  # bf16 is emulated on CPUs without AVX-512 BF16: ~12x fp32's time
    exported = export_function(three_run, tmp_path / "model.pt", precision="bf16")
    e2e = exported.parity["torchscript"]["end_to_end"]
    assert exported.precision == "bf16" and e2e["model_precision"] == "bf16"
    assert e2e["images"] > 0 and e2e["max_abs_diff"] <= e2e["tolerance"] == 5e-2 and e2e["argmax_identical"]
    assert e2e["cached_feature_cosine_min"] > 0.9  # the bf16 cache's rows are still their photos' features
    assert "precision: bf16 (asked for)" in exported.lines()
    extra = {"transfer.json": ""}
    torch.jit.load(tmp_path / "model.pt", _extra_files=extra)
    assert json.loads(extra["transfer.json"])["precision"] == "bf16"
    assert (tmp_path / "model.pt").stat().st_size < 0.7 * (three_run / "model.pt").stat().st_size  # bf16 weights
    images = sorted(Path(read_cache(json.loads((three_run / "head.json").read_text())["provenance"]["cache"])
                         .image_dir).rglob("*.png"))[:1]
    got = predict(tmp_path / "model.pt", images, top_k=1)
    assert all(p.error is None and p.labels[0] in ("a", "b", "c") for p in got)
