"""One torchrun rank of tests/test_solver.py's two-process check (not a test itself).

Usage: torchrun --standalone --nproc-per-node=N tests/solver_rank.py CACHE C OUT_PREFIX
Each rank fits its contiguous slice of the cache's rows (scaler and loss/gradient summed over the
ranks) and saves its solution to OUT_PREFIX.rank<R>.npz.
"""

import sys

import numpy as np
import torch.distributed as tdist

from pipeline import solver


def main(cache: str, C: float, prefix: str) -> None:
    tdist.init_process_group("gloo")
    try:
        rank, world = tdist.get_rank(), tdist.get_world_size()
        source = solver.CacheBlocks(cache, block_rows=64)
        mine = source.shard(rank, world)
        scaler = solver.fit_scaler(mine)
        objective = solver.Objective(mine, int(source.labels.max()) + 1, scaler.mean_, scaler.scale_,
                                     class_weight="balanced", hold=False)
        s = objective.solve(C, tol=1e-6)
        np.savez(f"{prefix}.rank{rank}.npz", coef=s.coef, intercept=s.intercept, iterations=s.iterations,
                 mean=scaler.mean_, scale=scaler.scale_, rows=mine.n)
    finally:
        tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
