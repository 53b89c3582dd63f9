"""Stage 2: the replacement last layer, fitted on cached features. One module per job:

- `settings`: FitSettings and what each setting allows;
- `splits`: the rows each phase uses;
- `selection`: choosing C (the coarse-to-fine sweep, validation or cross-validation);
- `in_memory` / `streamed` (+ `solver`): the two solvers, scikit-learn and L-BFGS over row blocks;
- `metrics`: scores and what they are on;
- `probe`: the whole protocol on one cache -> FitResult;
- `experiment`: many fits over grids, fractions and caches.
"""
