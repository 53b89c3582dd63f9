"""Fitting at scale: the streamed solver (pipeline/solver.py) against scikit-learn, in one run.

Three parts, each printing ratios measured within the run (this machine drifts between minutes):

  memory  peak RSS of `cli.py fit --solver streamed|sklearn` (fresh processes) on caches of 20,000
          and 160,000 rows (D 1,024, K 50). Target: streamed(160k) / streamed(20k) <= 1.3.
  speed   `--C auto` on 20,000 x 1,024 x 50: the whole fit with each solver (both warm-started,
          as fit does now), and the same C values cold (each fit from zero, as fit did before:
          scikit-learn's cold sweep is the old `transfer fit`). Target: streamed >= 2x faster.
  scale   a 700,000 x 4,096 x 100 cache (11 GB on disk, more than scikit-learn fits in memory
          here): one streamed pass for the scaler, then a few L-BFGS iterations at C = 1 in a
          fresh process; peak RSS (target < 2 GB), seconds per loss/gradient evaluation against
          the bytes read and FLOPs it needs, and an on-paper extrapolation to an ImageNet probe.

Caches are written with `pipeline.write_cache` into --workdir (default: a temporary folder) and
deleted at the end. Gaussian classes: centres N(0, 0.08^2) per feature plus N(0, 1) noise, so the
classes overlap as real features do (val top-1 about 0.4 with 50 classes).

    .venv/bin/python benchmarks/fit_scale.py memory|speed|scale [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _rss import peak_rss  # noqa: E402
import pipeline  # noqa: E402

BLOCK = 8192
CENTRE_SPREAD = 0.08  # classes overlap like real features: val top-1 about 0.4 at 20,000 x 1,024 x 50


def write_synthetic(path: Path, rows: int, dim: int, classes: int, seed: int = 0) -> None:
    """Gaussian classes in a 60/20/20 train/val/test split, written block by block."""
    if path.exists():
        return
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, CENTRE_SPREAD, size=(classes, dim)).astype(np.float32)

    def blocks():
        for lo in range(0, rows, BLOCK):
            at = np.arange(lo, min(lo + BLOCK, rows))
            labels = at % classes
            part = (at // classes) % 10
            split = np.where(part < 6, "train", np.where(part < 8, "val", "test"))
            noise = rng.standard_normal((len(at), dim), dtype=np.float32)
            yield centres[labels] + noise, labels, split

    pipeline.write_cache(path, blocks(), classes=[f"c{i:03d}" for i in range(classes)],
                         provenance={"backbone": "synthetic", "layer": "synthetic", "seed": seed})


def cli_fit(cache: Path, run: Path, *args: str) -> tuple[int, float, dict]:
    """Peak RSS (bytes), wall seconds and metrics.json of one `cli.py fit` in a fresh process."""
    peak, seconds, _ = peak_rss([sys.executable, str(ROOT / "cli.py"), "fit", str(cache), "--no-export",
                                 "--out", str(run), *args])
    metrics = json.loads((run / "metrics.json").read_text())
    shutil.rmtree(run)
    return peak, seconds, metrics


def memory(work: Path) -> None:
    dim, classes = 1024, 50
    peaks = {}
    for rows in (20_000, 160_000):
        cache = work / f"mem-{rows}.h5"
        write_synthetic(cache, rows, dim, classes)
        for solver in ("streamed", "sklearn"):
            peak, seconds, _ = cli_fit(cache, work / "run", "--solver", solver, "--C", "1", "--max-iter", "30")
            peaks[solver, rows] = peak
            print(f"  {solver:8s} N={rows:>7,}: peak RSS {peak / 2**20:7.0f} MiB  ({seconds:.0f} s)", flush=True)
    print(f"memory (D {dim}, K {classes}, --C 1, --max-iter 30): peak RSS at N=160,000 / N=20,000:")
    for solver in ("streamed", "sklearn"):
        print(f"  {solver:8s} {peaks[solver, 160_000] / peaks[solver, 20_000]:.2f}x")
    print(f"  streamed / sklearn at N=160,000: {peaks['streamed', 160_000] / peaks['sklearn', 160_000]:.2f}")
    from pipeline.fitting.probe import sklearn_bytes

    grown = peaks["sklearn", 160_000] - peaks["sklearn", 20_000]
    estimated = sklearn_bytes(160_000, dim, classes) - sklearn_bytes(20_000, dim, classes)
    print(f"  sklearn's growth 20k -> 160k: measured {grown / 2**20:.0f} MiB, fit.sklearn_bytes estimates "
          f"{estimated / 2**20:.0f} MiB (ratio {grown / estimated:.2f}; solver=auto keeps sklearn while the "
          f"estimate is under half the available memory)")


def cold_sweeps(cache_path: Path, Cs: list[float]) -> dict:
    """Each C from zero, as `fit` did before warm starts: iterations and seconds per solver."""
    import torch  # noqa: F401  (the streamed solver's import, outside the timings)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.fitting import solver
    from pipeline.fitting.settings import FitSettings
    from pipeline.fitting.splits import run_splits

    cache = pipeline.read_cache(cache_path)
    splits = run_splits(cache, FitSettings())
    out = {}
    t = time.perf_counter()
    source = solver.CacheBlocks(cache, splits.train)
    scaler = solver.fit_scaler(source)
    objective = solver.Objective(source, len(cache.classes), scaler.mean_, scaler.scale_)
    runs = [objective.solve(C) for C in Cs]
    out["streamed"] = (sum(r.iterations for r in runs), time.perf_counter() - t)
    t = time.perf_counter()
    X = cache.features(splits.train, dtype=np.float64)
    X = StandardScaler().fit_transform(X)
    y = cache.labels[splits.train]
    iterations = 0
    for C in Cs:
        iterations += int(LogisticRegression(C=C, max_iter=1000).fit(X, y).n_iter_[0])
    out["sklearn"] = (iterations, time.perf_counter() - t)
    return out


def one_evaluation(cache_path: Path) -> tuple[float, float]:
    """CPU milliseconds of one loss/gradient, streamed (held float32) vs scikit-learn's float64."""
    import torch
    from sklearn._loss.loss import HalfMultinomialLoss
    from sklearn.linear_model._linear_loss import LinearModelLoss
    from threadpoolctl import threadpool_limits

    from pipeline.fitting import solver
    from pipeline.fitting.settings import FitSettings
    from pipeline.fitting.splits import run_splits

    cache = pipeline.read_cache(cache_path)
    train = run_splits(cache, FitSettings()).train
    X, y = cache.features(train, dtype=np.float64), cache.labels[train].astype(np.float64)
    X = (X - X.mean(0)) / X.std(0)
    k, d = len(cache.classes), cache.dim
    W = np.random.default_rng(0).normal(0, 0.01, size=(k, d))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        objective = solver.Objective(solver.ArrayBlocks(X.astype(np.float32), y.astype(np.int64)), k, hold=True)
        loss = LinearModelLoss(HalfMultinomialLoss(n_classes=k), fit_intercept=True)
        w = np.asfortranarray(np.hstack([W, np.zeros((k, 1))])).ravel(order="F")
        times = []
        for call in (lambda: objective.loss_and_gradient(W, np.zeros(k)),
                     lambda: loss.loss_gradient(w, X, y, None, 1e-3)):
            call()
            started = time.process_time()
            for _ in range(5):
                call()
            times.append((time.process_time() - started) / 5 * 1e3)
    torch.set_num_threads(threads)
    return times[0], times[1]


def speed(work: Path, rounds: int) -> None:
    rows, dim, classes = 20_000, 1024, 50
    cache = work / f"speed-{rows}.h5"
    write_synthetic(cache, rows, dim, classes)
    seconds = {"streamed": [], "sklearn": []}
    metrics = {}
    for r in range(rounds):  # alternating, so that drift hits both
        for solver in (("sklearn", "streamed") if r % 2 == 0 else ("streamed", "sklearn")):
            _, wall, m = cli_fit(cache, work / "run", "--solver", solver)
            seconds[solver].append(m["timings"]["total_s"])
            metrics[solver] = m
            print(f"  round {r + 1} {solver:8s}: fit {m['timings']['total_s']:.1f} s (process {wall:.1f} s), "
                  f"chosen C {m['C']:.4g}", flush=True)
    Cs = [row["C"] for row in metrics["streamed"]["C_selection"]["sweep"]]
    cold = cold_sweeps(cache, Cs)
    med = {s: float(np.median(v)) for s, v in seconds.items()}
    print(f"speed: `fit --C auto` on {rows:,} x {dim:,} x {classes} (train {metrics['sklearn']['splits']['train']:,}), "
          f"median of {rounds} round(s):")
    print(f"  sklearn {med['sklearn']:.1f} s, streamed {med['streamed']:.1f} s: streamed is "
          f"{med['sklearn'] / med['streamed']:.2f}x faster")
    for solver in ("sklearn", "streamed"):
        m = metrics[solver]
        warm = sum(r["iterations"] for r in m["C_selection"]["sweep"])
        print(f"  {solver:8s} chosen C {m['C']:.4g}, val top-1 {max(r['val_top1'] for r in m['C_selection']['sweep']):.4f}, "
              f"sweep {m['timings']['sweep_s']:.1f} s; iterations over the {len(Cs)} C values: warm {warm}, "
              f"cold {cold[solver][0]} ({cold[solver][0] / max(warm, 1):.2f}x); cold sweep alone "
              f"{cold[solver][1]:.1f} s")
    evals = sum(r["evaluations"] for r in metrics["streamed"]["C_selection"]["sweep"])
    evals += metrics["streamed"]["convergence"]["evaluations"]
    print(f"  streamed: {evals} loss/gradient evaluations in the whole fit (sweep + refit)")
    streamed_ms, sklearn_ms = one_evaluation(cache)
    print(f"  one loss/gradient on the train rows, CPU time, one thread: streamed {streamed_ms:.0f} ms, "
          f"scikit-learn's (LinearModelLoss.loss_gradient, what its lbfgs calls) {sklearn_ms:.0f} ms: "
          f"{sklearn_ms / streamed_ms:.2f}x")
    print(f"  old `transfer fit --C auto` sweep (sklearn, cold) {cold['sklearn'][1]:.1f} s vs streamed warm sweep "
          f"{metrics['streamed']['timings']['sweep_s']:.1f} s: "
          f"{cold['sklearn'][1] / metrics['streamed']['timings']['sweep_s']:.2f}x")


SCALE_CHILD = """
import json, sys, time
import numpy as np, torch
sys.path.insert(0, {root!r})
import pipeline
from pipeline.fitting import solver

cache = pipeline.read_cache({cache!r})
source = solver.CacheBlocks(cache)
t = time.perf_counter()
read = sum(X.nbytes for X, _, _ in source.blocks())
read_s = time.perf_counter() - t
t = time.perf_counter()
scaler = solver.fit_scaler(source)
scaler_s = time.perf_counter() - t
objective = solver.Objective(source, len(cache.classes), scaler.mean_, scaler.scale_)
times = []
real = objective.loss_and_gradient
def timed(*a, **k):
    t0 = time.perf_counter(); out = real(*a, **k); times.append(time.perf_counter() - t0); return out
objective.loss_and_gradient = timed
s = objective.solve(1.0, max_iter={iterations})
# the two block matmuls alone, on one block in memory: this CPU's rate for them
X = torch.randn(source.block_rows, cache.dim); W = torch.randn(len(cache.classes), cache.dim, dtype=torch.float32)
X @ W.T
t = time.perf_counter()
for _ in range(5):
    P = X @ W.T; P.T @ X
flops_per_s = 5 * 4 * X.shape[0] * X.shape[1] * W.shape[0] / (time.perf_counter() - t)
print(json.dumps({{"rows": cache.n, "read_bytes": read, "read_s": read_s, "scaler_s": scaler_s,
                   "eval_s": times, "iterations": s.iterations, "evaluations": s.evaluations,
                   "block_rows": source.block_rows, "matmul_flops_per_s": flops_per_s,
                   "objective": s.objective}}))
"""


def scale(work: Path, rows: int, dim: int, classes: int, iterations: int, sweep_evals: int) -> None:
    cache = work / f"scale-{rows}.h5"
    t = time.perf_counter()
    write_synthetic(cache, rows, dim, classes)
    size = cache.stat().st_size
    print(f"  wrote {cache.name}: {size / 2**30:.1f} GiB in {time.perf_counter() - t:.0f} s", flush=True)
    code = SCALE_CHILD.format(root=str(ROOT), cache=str(cache), iterations=iterations)
    peak, seconds, result = peak_rss([sys.executable, "-c", code])
    r = json.loads(result.stdout.strip().splitlines()[-1])
    evals = np.array(r["eval_s"])
    flops = 4 * rows * dim * classes  # X W^T and R^T X, 2 flops per multiply-add
    per_eval = float(np.median(evals))
    matrix = rows * dim * 8
    print(f"scale: {rows:,} x {dim:,} x {classes} ({r['read_bytes'] / 2**30:.1f} GiB of float32 features; "
          f"scikit-learn's float64 copy alone would be {matrix / 2**30:.1f} GiB)")
    print(f"  peak RSS {peak / 2**30:.2f} GiB for the whole process ({seconds:.0f} s): scaler pass, "
          f"{r['iterations']} L-BFGS iterations ({r['evaluations']} evaluations) at C = 1")
    print(f"  read pass alone {r['read_s']:.0f} s ({r['read_bytes'] / r['read_s'] / 2**30:.2f} GiB/s); "
          f"scaler pass {r['scaler_s']:.0f} s")
    print(f"  loss/gradient evaluation: median {per_eval:.1f} s (all: {', '.join(f'{e:.0f}' for e in evals)}) "
          f"= {r['read_bytes'] / per_eval / 2**30:.2f} GiB/s read, {flops / per_eval / 1e9:.1f} GFLOP/s "
          f"of {flops / 1e12:.2f} TFLOP; the two matmuls alone run at "
          f"{r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s here")
    # On paper: ImageNet's linear probe, 1.28M x 4,096 x 1,000, whole fit = sweep + refit.
    n, d, k = 1_281_167, 4096, 1000
    inet_flops, inet_bytes = 4 * n * d * k, n * d * 4
    cpu_eval = max(inet_flops / (flops / per_eval), inet_bytes / (r["read_bytes"] / per_eval))
    print(f"  ImageNet probe on paper ({n:,} x {d:,} x {k:,}): {inet_flops / 1e12:.0f} TFLOP and "
          f"{inet_bytes / 2**30:.0f} GiB per evaluation; at this run's rates {cpu_eval / 60:.0f} min per evaluation "
          f"on this CPU; x {sweep_evals} evaluations (the --C auto fit measured by `speed`) = "
          f"{sweep_evals * cpu_eval / 86400:.1f} days")
    gpu_rate = 40e12  # assumed, not measured: ~2/3 of an H100's 67 TFLOP/s FP32 (60 with TF32 off)
    gpu_eval = inet_flops / gpu_rate
    print(f"  one H100 (assumed {gpu_rate / 1e12:.0f} TFLOP/s FP32, features held in its 80 GB): "
          f"{gpu_eval:.2f} s per evaluation, x {sweep_evals} = {sweep_evals * gpu_eval / 60:.0f} min "
          f"(+ one read of {inet_bytes / 2**30:.0f} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["memory", "speed", "scale"])
    parser.add_argument("--workdir", default=None, help="where the caches go [default: a temporary folder]")
    parser.add_argument("--keep", action="store_true", help="keep the caches (for a rerun)")
    parser.add_argument("--rounds", type=int, default=1, help="speed: alternating rounds")
    parser.add_argument("--rows", type=int, default=700_000, help="scale: rows")
    parser.add_argument("--dim", type=int, default=4096, help="scale: feature dimension")
    parser.add_argument("--classes", type=int, default=100, help="scale: classes")
    parser.add_argument("--iterations", type=int, default=3, help="scale: L-BFGS iterations")
    parser.add_argument("--sweep-evals", type=int, default=81,
                        help="scale: evaluations a whole --C auto fit takes, for the extrapolation "
                             "(default: what `speed` printed on 2026-11-28)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fit_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.part == "memory":
            memory(work)
        elif args.part == "speed":
            speed(work, args.rounds)
        else:
            scale(work, args.rows, args.dim, args.classes, args.iterations, args.sweep_evals)
    finally:
        if not args.keep:
            for cache in work.glob("*.h5"):
                cache.unlink()
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
