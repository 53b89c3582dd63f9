"""The head at any scale: scikit-learn's logistic regression, fitted by full-batch L-BFGS over row blocks.

It minimizes scikit-learn's objective exactly,

    0.5 * ||W||^2 + C * sum_i s_i * logloss_i          (the intercept is not penalized)

with s_i = 1, or n / (K * n_k) for class_weight='balanced' (scikit-learn's definition). Two classes
use scikit-learn's one-row binomial model (W (1, D), the logit of classes[1]); K >= 3 classes the
multinomial one (W (K, D)). Loss and gradient are sums over rows, so they are accumulated block by
block: features stream from a block source (the feature cache, or arrays), are standardized per
block and go through two matmuls in float32 with float64 sums, so memory is O(block x D + K x D)
whatever the number of rows. Under torchrun each rank sums its contiguous slice of rows and one
all_reduce per evaluation hands every rank the same loss and gradient: every rank takes the same
L-BFGS steps.

The optimizer is SciPy's L-BFGS-B, which scikit-learn itself calls, driven by the streamed
loss/gradient on the objective scaled as scikit-learn scales it, so `tol` (the gradient tolerance)
and `max_iter` mean what they mean for LogisticRegression. Measured against torch.optim.LBFGS
(strong Wolfe, same loss/gradient) on binary, 3- and 50-class problems at C = 1e-3, 0.1 and 10:
L-BFGS-B reached scikit-learn's objective to 1e-5 in as many or fewer evaluations in all nine
cases (e.g. 19 vs 21 and 32 vs 34 at 50 classes), and an evaluation (a pass over the data) is
what costs; the optimizer's own work on K x D parameters is negligible, on a GPU too.

Precision: float32 logits round the loss at about 1e-9 of its value, so near the optimum a line
search can no longer tell a step's gain from rounding; with scikit-learn's options (ftol 64 eps,
maxls 50) it then spent 3-5x the evaluations failing. So the float32 phase stops early at that
point (ftol 1e-10, maxls 5) and, when the gradient is not yet within `tol`, float64 matmuls finish
with scikit-learn's options. At tol 1e-4 (the default) that handover is rare.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as tdist
from scipy import optimize
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ..cache import read_cache
from ..errors import TransferError

BLOCK_BYTES = 32 << 20  # float32 features per block: 8,192 rows at D = 1,024; 2,048 at D = 4,096
HOLD_CPU_BYTES = 256 << 20  # on the CPU, standardized features up to this size are kept in memory
HOLD_GPU_FRACTION = 0.5  # on a GPU, up to this fraction of its free memory
FAST_FTOL = 1e-10  # float32 phase: relative progress below this is rounding, hand over to float64
FAST_MAX_LINE_SEARCH = 5  # more is float32 rounding at work: hand over to float64 early


def default_block_rows(dim: int) -> int:
    return int(np.clip(BLOCK_BYTES // (4 * max(dim, 1)), 256, 16384))


# --- block sources --------------------------------------------------------------------------------

class BlockSource(Protocol):
    """Rows to fit on, read a block at a time. n rows, dim features, labels (n,) int64."""

    n: int
    dim: int
    labels: np.ndarray

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (X (b, dim) float32, y (b,) int64, idx (b,) positions 0..n-1 of these rows)."""

    def shard(self, rank: int, world: int) -> "BlockSource":
        """A contiguous slice of these rows, one per rank, cut between blocks (see _slice)."""


def _slice(n: int, rank: int, world: int, block_rows: int) -> slice:
    """Rank `rank`'s contiguous share of n rows: whole blocks, so that every block, and its float32
    sums, is the one a single process computes; the ranks then differ from one process only in the
    order of float64 additions."""
    blocks = -(-n // block_rows)
    return slice(min(n, blocks * rank // world * block_rows), min(n, blocks * (rank + 1) // world * block_rows))


class ArrayBlocks:
    """Rows `rows` (default all) of in-memory arrays X (N, D) and y (N,)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None, block_rows: int | None = None):
        self.X, self._y = X, np.asarray(y, dtype=np.int64)
        self.rows = np.arange(len(X)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.n, self.dim = len(self.rows), X.shape[1]
        self.labels = self._y[self.rows]
        self.block_rows = block_rows or default_block_rows(self.dim)

    def blocks(self):
        for lo in range(0, self.n, self.block_rows):
            idx = np.arange(lo, min(lo + self.block_rows, self.n))
            yield np.asarray(self.X[self.rows[idx]], dtype=np.float32), self.labels[idx], idx

    def shard(self, rank: int, world: int) -> "ArrayBlocks":
        return ArrayBlocks(self.X, self._y, self.rows[_slice(self.n, rank, world, self.block_rows)], self.block_rows)


class CacheBlocks:
    """Rows `rows` (default all) of a feature cache (a path or a `Cache`), read block by block with
    `Cache.blocks`: never more than block_rows x D features in memory."""

    def __init__(self, cache, rows: np.ndarray | None = None, block_rows: int | None = None):
        if not hasattr(cache, "blocks"):
            cache = read_cache(cache)
        self.cache = cache
        self.rows = np.arange(cache.n) if rows is None else np.asarray(rows, dtype=np.int64)
        self.n, self.dim = len(self.rows), int(cache.dim)
        self.labels = np.asarray(cache.labels, dtype=np.int64)[self.rows]
        self.block_rows = block_rows or default_block_rows(self.dim)

    def blocks(self):
        for idx, X in self.cache.blocks(self.rows, self.block_rows):
            yield np.asarray(X, dtype=np.float32), self.labels[idx], np.asarray(idx)

    def shard(self, rank: int, world: int) -> "CacheBlocks":
        return CacheBlocks(self.cache, self.rows[_slice(self.n, rank, world, self.block_rows)], self.block_rows)


# --- across ranks ----------------------------------------------------------------------------------

def _world() -> int:
    """The ranks that share the sums: the process group's size (`devices.session` starts one
    under torchrun), 1 without one."""
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def my_shard(source: BlockSource) -> BlockSource:
    """This rank's contiguous slice of `source` (all of it in one process)."""
    world = _world()
    return source if world == 1 else source.shard(tdist.get_rank(), world)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all torchrun ranks (itself in one process). gloo reduces CPU tensors."""
    if _world() == 1:
        return t
    on_cpu = tdist.get_backend() == "gloo" and t.device.type != "cpu"
    buf = t.cpu() if on_cpu else t
    tdist.all_reduce(buf)
    return buf.to(t.device) if on_cpu else buf


# --- standardization -------------------------------------------------------------------------------

def fit_scaler(source: BlockSource) -> StandardScaler:
    """StandardScaler over all rows of `source` (all ranks' shards together), in one streamed pass.

    Blocks go through StandardScaler.partial_fit in float64, as the in-memory path does; under
    torchrun the ranks' (count, mean, variance) are merged by `merge_moments`."""
    scaler = StandardScaler()
    for X, _, _ in source.blocks():
        scaler.partial_fit(X.astype(np.float64))
    if _world() == 1:
        if source.n == 0:
            raise TransferError("cannot standardize features: no rows to fit on")
        return scaler
    d = source.dim
    mine = torch.zeros(1, 1 + 2 * d, dtype=torch.float64)
    if source.n:
        mine[0, 0] = scaler.n_samples_seen_
        mine[0, 1:1 + d], mine[0, 1 + d:] = torch.from_numpy(scaler.mean_), torch.from_numpy(scaler.var_)
    gathered = [torch.zeros_like(mine) for _ in range(_world())]
    tdist.all_gather(gathered, mine)
    stats = torch.cat(gathered).numpy()
    return merge_moments(stats[:, 0], stats[:, 1:1 + d], stats[:, 1 + d:])


def merge_moments(counts: np.ndarray, means: np.ndarray, variances: np.ndarray) -> StandardScaler:
    """One StandardScaler from the (count (P,), mean (P, D), variance (P, D)) of P disjoint parts:
    Chan et al.'s pairwise formula, then scale 1 for features scikit-learn calls constant."""
    n = float(counts.sum())
    if n == 0:
        raise TransferError("cannot standardize features: no rows to fit on")
    mean = (counts[:, None] * means).sum(0) / n
    var = (counts[:, None] * (variances + (means - mean) ** 2)).sum(0) / n
    scaler = StandardScaler()
    scaler.n_samples_seen_, scaler.mean_, scaler.var_, scaler.n_features_in_ = int(n), mean, var, means.shape[1]
    eps = np.finfo(np.float64).eps  # sklearn.preprocessing._data._is_constant_feature (scikit-learn 1.9)
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scaler.scale_ = np.where(constant, 1.0, np.sqrt(var))
    return scaler


# --- the objective ---------------------------------------------------------------------------------

@dataclass
class Solution:
    """coef (R, D), intercept (R,) float64 with R = 1 for two classes (scikit-learn's shapes)."""

    coef: np.ndarray
    intercept: np.ndarray
    C: float
    iterations: int
    evaluations: int  # passes over the rows
    precise_evaluations: int  # of which with float64 matmuls
    converged: bool
    message: str
    objective: float  # 0.5 ||W||^2 + C sum_i s_i logloss_i at the solution
    seconds: float
    warm: bool = False

    def record(self) -> dict:
        return {"C": self.C, "iterations": self.iterations, "evaluations": self.evaluations,
                "float64_evaluations": self.precise_evaluations,
                "converged": self.converged, "warm_start": self.warm, "message": self.message}


def _prepare(X: torch.Tensor, mean, scale, l2: bool) -> torch.Tensor:
    """A block as the model sees it, in place: (X - mean) / scale, or X / ||X|| per row (l2)."""
    if l2:
        X = X.div_(torch.linalg.vector_norm(X, dim=1, keepdim=True).clamp_(min=1e-12))  # head.py's rule
    if mean is not None:
        X = X.sub_(mean).div_(scale)
    return X


@dataclass
class _Block:
    X: torch.Tensor  # (b, D) float32, prepared, on the device
    y: torch.Tensor  # (b,) int64
    idx: np.ndarray  # (b,) positions of these rows in the source


class Prepared:
    """The rows of `source` as the model sees them: standardized with mean, scale (D,) (None: raw),
    or divided by their L2 norm (l2, scikit-learn's Normalizer), float32 on `device`. hold: keep
    them there between passes (None: when they fit in HOLD_CPU_BYTES, or half the GPU's free
    memory); otherwise every pass reads them from the source again."""

    def __init__(self, source: BlockSource, mean: np.ndarray | None = None, scale: np.ndarray | None = None,
                 l2: bool = False, device: str = "cpu", hold: bool | None = None):
        self.source, self.device, self._l2 = source, torch.device(device), l2
        self._mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self._scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32, device=self.device)
        if hold is None:
            hold = source.n * source.dim * 4 <= self._hold_budget()
        self.held: list[_Block] | None = list(self._stream()) if hold else None

    def _hold_budget(self) -> float:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return HOLD_GPU_FRACTION * free
        return HOLD_CPU_BYTES

    def _stream(self) -> Iterator[_Block]:
        for X, y, idx in self.source.blocks():
            Xt = _prepare(torch.from_numpy(X).to(self.device), self._mean, self._scale, self._l2)
            yield _Block(Xt, torch.from_numpy(y).to(self.device), idx)

    def blocks(self) -> Iterator[_Block]:
        return iter(self.held) if self.held is not None else self._stream()


def _matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B. On the CPU through NumPy's BLAS: for these tall, skinny float32 products it measured
    1.3x torch's (single thread, 8,192 x 1,024 by 50: ~30 vs ~21 GFLOP/s; a whole loss/gradient
    40 vs 52 ms of CPU time)."""
    if A.device.type == "cpu":
        return torch.from_numpy(A.numpy() @ B.numpy())
    return A @ B


class Objective:
    """scikit-learn's logistic-regression objective over the rows of `source` (this rank's shard).

    mean, scale, l2, device, hold: how the rows are prepared and kept (see `Prepared`). The class
    weights and the weight total are taken over all ranks' rows.
    """

    def __init__(self, source: BlockSource, n_classes: int, mean: np.ndarray | None = None,
                 scale: np.ndarray | None = None, class_weight: str | None = None, device: str = "cpu",
                 hold: bool | None = None, l2: bool = False):
        if n_classes < 2:
            raise TransferError(f"a classifier needs at least two classes, got {n_classes}")
        if class_weight not in (None, "none", "balanced"):
            raise TransferError(f"unknown class weight {class_weight!r}; expected none or balanced")
        self.source, self.K, self.dim = source, n_classes, source.dim
        self.rows_per_class = 1 if n_classes == 2 else n_classes  # R: rows of coef
        self.device = torch.device(device)
        counts = _sum_over_ranks(torch.from_numpy(np.bincount(source.labels, minlength=n_classes)
                                                  .astype(np.float64))).numpy()
        if (counts == 0).any():
            raise TransferError(f"class {int(np.flatnonzero(counts == 0)[0])} has no rows to fit on; "
                                "every class needs training rows")
        self.n_total = int(counts.sum())
        if class_weight == "balanced":  # sklearn.utils.compute_class_weight: n / (K * bincount(y))
            self.class_weights = self.n_total / (n_classes * counts)
            self.weight_sum = float((counts * self.class_weights).sum())
        else:
            self.class_weights, self.weight_sum = None, float(self.n_total)
        self._cw = None if self.class_weights is None else torch.from_numpy(self.class_weights).to(self.device)
        self.data = Prepared(source, mean, scale, l2, device, hold)
        self.evaluations = self.precise_evaluations = 0

    @property
    def size(self) -> int:
        """Number of parameters: R x D weights and R intercepts."""
        return self.rows_per_class * (self.dim + 1)

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        R, D = self.rows_per_class, self.dim
        return theta[:R * D].reshape(R, D), theta[R * D:]

    def pack(self, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
        R, D = self.rows_per_class, self.dim
        coef, intercept = np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)
        if coef.shape != (R, D) or intercept.shape != (R,):
            raise TransferError(f"a starting point must be coef {(R, D)} and intercept {(R,)}; "
                                f"got {coef.shape} and {intercept.shape}")
        return np.concatenate([coef.ravel(), intercept])

    @torch.no_grad()
    def loss_and_gradient(self, coef: np.ndarray, intercept: np.ndarray,
                          precise: bool = False) -> tuple[float, np.ndarray, np.ndarray]:
        """sum_i s_i logloss_i over all ranks' rows, and its gradient: (loss, dW (R, D), db (R,)).

        float32 arithmetic with float64 sums over rows; precise=True computes in float64 throughout."""
        self.evaluations += 1
        self.precise_evaluations += precise
        R, D = self.rows_per_class, self.dim
        dtype = torch.float64 if precise else torch.float32
        W = torch.from_numpy(np.ascontiguousarray(coef)).to(self.device, dtype)
        b = torch.from_numpy(np.asarray(intercept)).to(self.device, dtype)
        acc = torch.zeros(1 + R * D + R, dtype=torch.float64, device=self.device)  # [loss, dW, db]
        dW, db = acc[1:1 + R * D].view(R, D), acc[1 + R * D:]
        for block in self.data.blocks():
            X = block.X.to(dtype)
            Z = _matmul(X, W.T).add_(b)  # (b, R) logits
            if R == 1:  # binomial: loss softplus(z) - y z, residual sigmoid(z) - y
                z, y = Z[:, 0], block.y.to(dtype)
                loss = torch.nn.functional.softplus(z) - y * z
                residual = (torch.sigmoid(z) - y)[:, None]
            else:  # multinomial: loss logsumexp(z) - z_y, residual softmax(z) - onehot(y)
                lse = torch.logsumexp(Z, 1)
                loss = lse - Z.gather(1, block.y[:, None])[:, 0]
                residual = torch.exp(Z.sub_(lse[:, None]))
                residual.scatter_add_(1, block.y[:, None], torch.full((len(block.y), 1), -1.0, dtype=dtype,
                                                                    device=self.device))
            if self._cw is not None:
                w = self._cw[block.y].to(dtype)
                loss, residual = loss * w, residual * w[:, None]
            acc[0] += loss.sum(dtype=torch.float64)
            dW += _matmul(residual.T, X)
            db += residual.sum(0, dtype=torch.float64)
        acc = _sum_over_ranks(acc).cpu().numpy()
        return float(acc[0]), acc[1:1 + R * D].reshape(R, D), acc[1 + R * D:]

    def value(self, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
        """0.5 * ||W||^2 + C * sum_i s_i logloss_i: the number scikit-learn minimizes (float64)."""
        loss, _, _ = self.loss_and_gradient(coef, intercept, precise=True)
        return 0.5 * float(np.sum(np.square(coef))) + C * loss

    def _scaled(self, theta: np.ndarray, C: float, precise: bool) -> tuple[float, np.ndarray]:
        """The objective divided by C * sum(s), as scikit-learn's lbfgs sees it (same minimizer, and
        the gradient tolerance means the same), with its gradient, flat."""
        coef, intercept = self.unpack(theta)
        loss, dW, db = self.loss_and_gradient(coef, intercept, precise)
        s = self.weight_sum
        f = loss / s + 0.5 * float(np.dot(theta[:coef.size], theta[:coef.size])) / (C * s)
        return f, np.concatenate([(dW / s + coef / (C * s)).ravel(), db / s])

    def solve(self, C: float, start: Solution | None = None, tol: float = 1e-4, max_iter: int = 1000,
              callback: Callable[[], None] | None = None) -> Solution:
        """Minimize at C from zero, or warm-started from `start` (e.g. the solution at a smaller C);
        callback() after every iteration.

        float32 matmuls until the gradient is within `tol` or the float32 loss stops resolving
        progress; in that case float64 matmuls finish the job, with scikit-learn's own options."""
        if not (C > 0 and np.isfinite(C)):
            raise TransferError(f"C must be a positive number, got {C}")
        theta = np.zeros(self.size) if start is None else self.pack(start.coef, start.intercept)
        started, before, before_precise = time.perf_counter(), self.evaluations, self.precise_evaluations
        each = None if callback is None else (lambda xk: callback())
        res = optimize.minimize(self._scaled, theta, args=(C, False), jac=True, method="L-BFGS-B", callback=each,
                                options={"maxiter": max_iter, "maxls": FAST_MAX_LINE_SEARCH, "gtol": tol,
                                         "ftol": FAST_FTOL})
        iterations = int(res.nit)
        if res.status != 1 and np.abs(res.jac).max() > tol and iterations < max_iter:
            res = optimize.minimize(self._scaled, res.x, args=(C, True), jac=True, method="L-BFGS-B",
                                    callback=each, options={"maxiter": max_iter - iterations, "maxls": 50, "gtol": tol,
                                             "ftol": 64 * np.finfo(float).eps})
            iterations += int(res.nit)
        coef, intercept = self.unpack(res.x)
        return Solution(coef.copy(), intercept.copy(), float(C), iterations, self.evaluations - before,
                        self.precise_evaluations - before_precise, bool(res.status == 0), str(res.message),
                        float(res.fun) * C * self.weight_sum, time.perf_counter() - started,
                        warm=start is not None)

    def path(self, Cs, tol: float = 1e-4, max_iter: int = 1000, start: Solution | None = None) -> list[Solution]:
        """Solutions for Cs in increasing order, each warm-started from the one before."""
        out = []
        for C in sorted(float(c) for c in Cs):
            start = self.solve(C, start, tol, max_iter)
            out.append(start)
        return out


@torch.no_grad()
def predict_proba(data: Prepared, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Probabilities (n, K) float64 of the prepared rows (float64 from the float32 features); R = 1
    gives [1 - p, p] like LogisticRegression.predict_proba."""
    R = len(intercept)
    out = np.empty((data.source.n, 2 if R == 1 else R))
    W = torch.as_tensor(coef, dtype=torch.float64, device=data.device)
    b = torch.as_tensor(intercept, dtype=torch.float64, device=data.device)
    for block in data.blocks():
        Z = _matmul(block.X.double(), W.T) + b
        P = torch.cat([1 - torch.sigmoid(Z), torch.sigmoid(Z)], 1) if R == 1 else torch.softmax(Z, 1)
        out[block.idx] = P.cpu().numpy()
    return out


def as_logistic_regression(coef: np.ndarray, intercept: np.ndarray, n_classes: int, iterations: int,
                           **params) -> LogisticRegression:
    """A fitted scikit-learn LogisticRegression holding this solution (classes 0..K-1, as a fit on
    the cache's labels has), so predict_proba, joblib and the export work unchanged."""
    model = LogisticRegression(**params)
    model.classes_ = np.arange(n_classes)
    model.coef_, model.intercept_ = np.array(coef, dtype=np.float64), np.array(intercept, dtype=np.float64)
    model.n_features_in_ = coef.shape[1]
    model.n_iter_ = np.array([iterations], dtype=np.int32)
    return model
