"""pipeline/solver.py: the streamed L-BFGS reaches scikit-learn's own objective, from arrays and from
the cache, warm starts save iterations, and two torchrun ranks compute what one process does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from threadpoolctl import threadpool_limits

from pipeline import solver
from pipeline import read_cache
from pipeline.errors import TransferError
from tests.conftest import ROOT, make_cache


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are small: one thread is as fast, and immune to a busy machine's oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def problem(n: int, dim: int, k: int, seed: int = 0):
    """Overlapping classes of unequal size, features on unequal scales and offsets, one constant."""
    rng = np.random.default_rng(seed)
    y = rng.choice(k, n, p=np.r_[4.0, np.ones(k - 1)] / (k + 3))
    y[:k] = np.arange(k)  # every class present
    X = rng.normal(0, 0.4, (k, dim))[y] + rng.normal(0, 1, (n, dim))
    X = X * rng.uniform(0.5, 4, dim) + rng.normal(0, 10, dim)
    X[:, 1] = 3.0
    return X.astype(np.float32), y


def sklearn_reference(X: np.ndarray, y: np.ndarray, C: float, class_weight=None):
    scaler = StandardScaler().fit(X.astype(np.float64))
    Z = scaler.transform(X.astype(np.float64))
    model = LogisticRegression(C=C, tol=1e-8, max_iter=10_000, class_weight=class_weight).fit(Z, y)
    return scaler, Z, model


def assert_reaches_sklearn(source, X, y, k, C, class_weight, **solve):
    scaler, Z, model = sklearn_reference(X, y, C, class_weight)
    mine = solver.fit_scaler(source)
    np.testing.assert_allclose(mine.mean_, scaler.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mine.scale_, scaler.scale_, rtol=1e-12)
    objective = solver.Objective(source, k, mine.mean_, mine.scale_, class_weight=class_weight)
    s = objective.solve(C, tol=1e-6, **solve)
    theirs = objective.value(model.coef_, model.intercept_, C)
    assert objective.value(s.coef, s.intercept, C) <= theirs * (1 + 1e-5)
    assert s.coef.shape == model.coef_.shape and s.intercept.shape == model.intercept_.shape
    proba = solver.predict_proba(source, s.coef, s.intercept, mine.mean_, mine.scale_)
    assert np.abs(proba - model.predict_proba(Z)).max() <= 1e-3
    return s


@pytest.mark.parametrize("k", [2, 3, 50])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_streamed_solution_reaches_sklearns_objective(k, class_weight):
    X, y = problem(1200, 24, k, seed=k)
    source = solver.ArrayBlocks(X, y, block_rows=256)  # several blocks, the last one short
    for C in (0.01, 1.0):
        s = assert_reaches_sklearn(source, X, y, k, C, class_weight)
        assert s.converged, s.message


def test_objective_is_sklearns_number():
    """value() is 0.5 ||W||^2 + C sum_i s_i logloss_i, computed here independently in float64."""
    X, y = problem(300, 6, 3)
    rng = np.random.default_rng(1)
    W, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    Z = X.astype(np.float64) @ W.T + b
    logloss = np.log(np.exp(Z).sum(1)) - Z[np.arange(len(y)), y]
    weights = len(y) / (3 * np.bincount(y))[y]
    expected = 0.5 * (W ** 2).sum() + 0.3 * (weights * logloss).sum()
    value = solver.Objective(solver.ArrayBlocks(X, y), 3, class_weight="balanced").value(W, b, 0.3)
    assert value == pytest.approx(expected, rel=1e-6)


def test_hymenoptera_features_reach_sklearns_objective(hymenoptera_lite0):
    cache = read_cache(hymenoptera_lite0)
    train = np.flatnonzero(cache.split == "train")
    X, y = cache.features(train), cache.labels[train]
    source = solver.CacheBlocks(cache, train, block_rows=100)
    for C in (0.0013, 0.1):  # 0.0013: what --C auto chooses on these features (README)
        assert_reaches_sklearn(source, X, y, 2, C, None)


def test_cache_blocks_and_held_blocks_give_the_array_result(tmp_path):
    X, y = problem(500, 12, 4, seed=3)
    path = make_cache(tmp_path / "c.h5", X, y, [f"c{i}" for i in range(4)])
    rows = np.sort(np.random.default_rng(0).choice(500, 300, replace=False))
    results = []
    for source, hold in ((solver.ArrayBlocks(X, y, rows, 64), True), (solver.CacheBlocks(str(path), rows, 64), False)):
        scaler = solver.fit_scaler(source)
        s = solver.Objective(source, 4, scaler.mean_, scaler.scale_, hold=hold).solve(0.5, tol=1e-6)
        results.append(s.coef)
    assert np.array_equal(results[0], results[1])  # the same rows, in the same blocks, give the same steps


def test_warm_start_walks_C_upward_in_fewer_iterations():
    X, y = problem(1500, 32, 10, seed=5)
    scaler = StandardScaler().fit(X.astype(np.float64))
    objective = solver.Objective(solver.ArrayBlocks(X, y), 10, scaler.mean_, scaler.scale_)
    Cs = 10.0 ** np.arange(-6, 6)  # fit's coarse decades
    warm = objective.path(Cs, tol=1e-5)
    cold = [objective.solve(C, tol=1e-5) for C in Cs]
    assert [s.warm for s in warm] == [False] + [True] * 11
    assert sum(s.iterations for s in warm) < 0.6 * sum(s.iterations for s in cold)  # measured: 199 vs 395
    for w, c in zip(warm, cold):  # the same minimum either way
        assert objective.value(w.coef, w.intercept, w.C) == pytest.approx(objective.value(c.coef, c.intercept, c.C),
                                                                          rel=1e-6)


def test_merged_moments_equal_one_scaler_over_all_parts():
    X, _ = problem(700, 9, 3)
    X[:, 2] = 1e6 + 1e-9 * np.arange(700)  # constant to float precision: scale 1, as sklearn decides
    parts = np.split(X.astype(np.float64), [100, 450])
    merged = solver.merge_moments(np.array([len(p) for p in parts]), np.stack([p.mean(0) for p in parts]),
                                  np.stack([p.var(0) for p in parts]))
    whole = StandardScaler().fit(X.astype(np.float64))
    np.testing.assert_allclose(merged.mean_, whole.mean_, rtol=1e-12)
    np.testing.assert_allclose(merged.scale_, whole.scale_, rtol=1e-9)
    assert merged.scale_[1] == merged.scale_[2] == 1.0


def test_bad_inputs_are_one_clear_error():
    X, y = problem(100, 4, 3)
    with pytest.raises(TransferError, match="class 2 has no rows"):
        solver.Objective(solver.ArrayBlocks(X, y, np.flatnonzero(y < 2)), 3)
    objective = solver.Objective(solver.ArrayBlocks(X, y), 3)
    with pytest.raises(TransferError, match=r"C must be a positive number"):
        objective.solve(0.0)
    start = objective.solve(1.0)
    start.coef = start.coef[:2]
    with pytest.raises(TransferError, match=r"coef \(3, 4\)"):
        objective.solve(2.0, start)


TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")
def test_two_torchrun_ranks_equal_one_process(tmp_path):
    X, y = problem(901, 16, 5, seed=7)  # odd: the ranks' slices differ in size
    path = make_cache(tmp_path / "c.h5", X, y, [f"c{i}" for i in range(5)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", str(ROOT / "tests" / "solver_rank.py"),
                           str(path), "0.3", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    ranks = [np.load(tmp_path / f"out.rank{r}.npz") for r in (0, 1)]
    assert [int(r["rows"]) for r in ranks] == [450, 451]
    for name in ("coef", "intercept", "mean", "scale"):  # every rank took the very same steps
        assert np.array_equal(ranks[0][name], ranks[1][name])
    source = solver.CacheBlocks(str(path), block_rows=64)
    scaler = solver.fit_scaler(source)
    one = solver.Objective(source, 5, scaler.mean_, scaler.scale_, class_weight="balanced", hold=False)
    s = one.solve(0.3, tol=1e-6)
    assert np.abs(ranks[0]["coef"] - s.coef).max() <= 1e-5 * np.abs(s.coef).max()
    assert np.abs(ranks[0]["intercept"] - s.intercept).max() <= 1e-5 * np.abs(s.coef).max()
