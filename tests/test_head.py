"""pipeline/head.py: folding a fitted sklearn pipeline into one affine layer, exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from pipeline import head
from pipeline.errors import InputFileError, TransferError
from tests.conftest import blobs


@pytest.mark.parametrize("n_classes", [2, 3, 7])
@pytest.mark.parametrize("steps", [
    lambda: [StandardScaler()],
    lambda: [StandardScaler(), PCA(5, random_state=0)],
    lambda: [Normalizer()],
    lambda: [Normalizer(), PCA(4, random_state=0)],
    lambda: [],
])
def test_folded_head_reproduces_predict_proba(n_classes, steps):
    X, y, classes = blobs(30, n_classes, 12, seed=n_classes, spread=3.0)
    X = X.astype(np.float64) * 5 + 3  # scale and offset so the scaler matters
    pipe = make_pipeline(*steps(), LogisticRegression(C=0.3, max_iter=2000)).fit(X, y)
    folded = head.fold([s for _, s in pipe.steps], classes, {})
    assert folded.weight.shape == (n_classes, 12) and folded.bias.shape == (n_classes,)
    np.testing.assert_allclose(folded.proba(X), pipe.predict_proba(X), rtol=0, atol=1e-10)
    assert np.array_equal(folded.logits(X).argmax(1), pipe.predict(X))
    assert folded.arrays["coef"].shape[0] == (1 if n_classes == 2 else n_classes)


def test_binary_logits_are_zero_and_the_decision_function():
    X, y, _ = blobs(20, 2, 5, seed=1)
    X = X.astype(np.float64)  # sklearn would compute in float32 for float32 input
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    folded = head.fold([s for _, s in pipe.steps], ["a", "b"], {})
    logits = folded.logits(X)
    np.testing.assert_allclose(logits[:, 0], 0, atol=1e-12)
    np.testing.assert_allclose(logits[:, 1], pipe.decision_function(X), rtol=1e-10, atol=1e-10)


def test_save_and_load_round_trip_without_pickle(tmp_path):
    X, y, classes = blobs(20, 3, 6)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    folded = head.fold([s for _, s in pipe.steps], classes, {"provenance": {"backbone": "x"}})
    head.save(folded, str(tmp_path))
    loaded = head.load(str(tmp_path))
    assert loaded.classes == classes and loaded.meta["provenance"]["backbone"] == "x"
    np.testing.assert_array_equal(loaded.weight, folded.weight)
    with np.load(tmp_path / "head.npz", allow_pickle=False) as arrays:  # plain arrays, no objects
        assert all(arrays[k].dtype != object for k in arrays.files)


def test_loading_something_else_is_refused(tmp_path):
    with pytest.raises(TransferError, match="is not a fit run"):
        head.load(str(tmp_path))
    with pytest.raises(TransferError, match="is not a folder"):
        head.load(str(tmp_path / "nope"))


def test_a_normalizer_after_other_steps_cannot_be_folded():
    X, y, classes = blobs(20, 2, 4)
    pipe = make_pipeline(StandardScaler(), Normalizer(), LogisticRegression()).fit(X, y)
    with pytest.raises(TransferError, match="first step"):
        head.fold([s for _, s in pipe.steps], classes, {})


def test_a_head_json_that_does_not_match_its_arrays_is_refused(tmp_path):
    X, y, classes = blobs(20, 2, 4)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    head.save(head.fold([s for _, s in pipe.steps], classes, {}), str(tmp_path))
    doc = json.loads((tmp_path / "head.json").read_text())
    doc["classes"] = ["a", "b", "c"]  # hand-edited: three names for a two-class head
    (tmp_path / "head.json").write_text(json.dumps(doc))
    with pytest.raises(InputFileError, match=r"head.npz does not match head.json \(3 classes, dim 4\)"):
        head.load(str(tmp_path))
