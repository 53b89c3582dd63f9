"""Stage 2: the replacement last layer, fitted on one cache by the linear-probe protocol.

`fit_head` composes the parts: `splits` gives the rows, a solver (`in_memory`, scikit-learn; or
`streamed`, L-BFGS over row blocks) chooses C as `selection` says and refits on train+val,
`calibration` fits a temperature on the held-out predictions, `metrics` scores the result, and
`head.fold` turns the fitted pipeline (and the temperature) into one Linear: a FitResult.
Nothing is written here (`pipeline.runs.fit` writes the run folder).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from typing import Literal

import psutil
from sklearn.pipeline import Pipeline

from ..cache import ArrayCache, Cache, head_provenance, open_caches, read_cache
from ..devices import this_process
from ..errors import SettingError
from ..files import display_path
from ..head import LinearHead, fold
from ..progress import resolve
from .calibration import fit_temperature, scale, scaled_model, summary
from .in_memory import fit_in_memory
from .metrics import describe_evaluation, scores
from .selection import other_choice
from .settings import FitSettings
from .splits import Splits, run_splits

# solver="auto" picks scikit-learn when its estimated peak (sklearn_bytes) is under this share of
# the memory available now; benchmarks/fit_scale.py measures the estimate.
MEMORY_SHARE = 0.5


@dataclass
class FitResult:
    """Everything a fit produced. `head` is the fitted pipeline folded into one affine map (what
    export ships); `pipeline` the scikit-learn pipeline it came from, calibrated like the head
    (the parity reference). `scores` and `predictions` are of the calibrated probabilities."""

    pipeline: Pipeline
    head: LinearHead
    C: float
    sweep: list[dict]  # one entry per C tried: C, val top-1, val log-loss, iterations, converged
    splits: Splits
    evaluated_on: Literal["test", "val", "cv"]  # cv: no test split, out-of-fold scores of the C choice
    scores: dict
    convergence: dict
    timings: dict
    classes: list[str]
    settings: FitSettings
    validation: dict  # top1, log_loss, classes_predicted on val of the train-only model at C (before calibration)
    cache: Cache  # what it was fitted on
    notes: list[str] = field(default_factory=list)
    run_dir: str | None = None  # the run folder, once written
    predictions: tuple | None = None  # (rows (n,), probabilities (n, K)) behind `scores`, rows of the cache
    warnings: list[str] = field(default_factory=list)  # from writing the run folder (e.g. images not found)
    solver: dict = field(default_factory=dict)  # name, reason, device, world_size
    selection: str = "given"  # how C was chosen: "validation", "cv" (k-fold on train+val) or "given"
    # method, temperature, fitted_on (words), n_fitted, status (calibration.fit_temperature's),
    # optimistic, and "before"/"after": ECE, log-loss, top-1 and reliability table of the evaluated
    # predictions, uncalibrated and calibrated
    calibration: dict = field(default_factory=dict)
    alternative: dict | None = None  # the other --select rule's C among those tried (selection.other_choice)

    def describe_evaluation(self) -> str:
        """What `scores` are on, in words (report.md, report.html and the CLI say it so)."""
        return describe_evaluation(self.evaluated_on, self.selection, self.splits.held_out_val)

    def lines(self) -> list[str]:
        """The fit in a few lines for the user: splits, C, scores, solver, time, run folder, notes."""
        s, sizes = self.scores, self.splits.sizes()
        rule = "top-1" if self.settings.select == "top1" else "log-loss"
        chosen = f"{self.C:.4g} (best val {rule} of {len(self.sweep)} fits)" if self.sweep else f"{self.C:.4g} (given)"
        top5 = f"  top-5 {s['top5']:.4f}" if s["top5"] is not None else ""
        solver = f"{self.solver['name']} on {self.solver['device']}"
        solver += f", {self.solver['world_size']} ranks" if self.solver["world_size"] > 1 else ""
        solver += f" (auto: {self.solver['reason']})" if self.settings.solver == "auto" else ""
        rows = [("splits", f"train {sizes['train']}  val {sizes['val']}  test {sizes['test'] or '-'}"),
                ("chosen C", chosen),
                (f"scores on {self.describe_evaluation()}", f"top-1 {s['top1']:.4f}{top5}  balanced "
                                                           f"{s['balanced_accuracy']:.4f}  log-loss {s['log_loss']:.4f}  "
                                                           f"ECE {s['ece']:.4f}"),
                ("calibration", calibration_line(self.calibration)),
                ("solver", solver), ("fit time", f"{self.timings['total_s']:.1f} s")]
        if self.run_dir:
            rows.append(("run folder", display_path(self.run_dir)))
        width = max(len(k) for k, _ in rows)
        return [f"{key:<{width}}  {value}" for key, value in rows] + [f"note: {n}" for n in self.notes[1:]]

    def cautions(self) -> list[str]:
        """What the user should act on: images the report could not show, a fit that stopped early."""
        stopped = [] if self.convergence["converged"] else [
            f"lbfgs stopped at --max-iter {self.settings.max_iter} before converging (C={self.C:.4g}); raise --max-iter"]
        return self.warnings + stopped


def calibration_line(c: dict) -> str:
    """The calibration in one line: T, what it was fitted on, ECE and log-loss before -> after."""
    b, a = c["before"], c["after"]
    change = (f"ECE {b['ece']:.4f} -> {a['ece']:.4f}, log-loss {b['log_loss']:.4f} -> {a['log_loss']:.4f}"
              + (" (optimistic: T was fitted on these predictions)" if c["optimistic"] else ""))
    if c["method"] == "none":
        return f"none (--calibrate none); ECE {b['ece']:.4f}"
    if c["status"] == "all right":
        return f"none: every one of {c['fitted_on']} is right, T = 1; ECE {b['ece']:.4f}"
    return f"temperature T = {c['temperature']:.3g}, fitted on {c['fitted_on']}: {change}"


def as_cache(data) -> Cache:
    """A Cache from a path, a list of paths (parts of one extraction, read as one), a Cache, or
    (X, y, classes[, split]) arrays."""
    if isinstance(data, Cache):
        return data
    if isinstance(data, (str, os.PathLike)):
        return read_cache(data)
    if isinstance(data, (tuple, list)) and data and all(isinstance(p, (str, os.PathLike)) for p in data):
        return open_caches(list(data))
    if isinstance(data, (tuple, list)) and len(data) in (3, 4):
        return ArrayCache(*data)
    raise SettingError(f"expected a cache path, a Cache or (X, y, classes, split) arrays; got {type(data).__name__}")


def python_command(cache: Cache, settings: FitSettings) -> str:
    """The Python call that reproduces a fit (recorded in its run folder)."""
    changed = {f.name: getattr(settings, f.name) for f in fields(settings)
               if getattr(settings, f.name) != f.default}
    parts = getattr(cache, "parts", None)
    args = [repr(parts) if parts else repr(cache.path) if cache.path else "(X, y, classes, split)"] + [f"{k}={v!r}" for k, v in changed.items()]
    return f"pipeline.fit({', '.join(args)})"


def sklearn_bytes(n_rows: int, dim: int, n_classes: int) -> int:
    """Estimated peak memory of the scikit-learn path beyond the interpreter: its float64 features
    (1.14x their size, measured by benchmarks/fit_memory.py) and lbfgs' (n, K) float64 work arrays."""
    return int(8 * n_rows * (1.14 * dim + 4 * n_classes))


def choose_solver(settings: FitSettings, n_rows: int, dim: int, n_classes: int) -> tuple[str, str]:
    """(solver, reason): `auto` keeps scikit-learn, the reference, wherever it fits comfortably."""
    world = this_process().world_size
    if world > 1 and settings.solver == "sklearn":
        raise SettingError(f"solver (--solver) sklearn runs in one process; under torchrun ({world} processes) "
                           "use streamed or auto")
    if settings.solver != "auto":
        return settings.solver, "asked for"
    if world > 1:
        return "streamed", f"{world} torchrun processes share the rows"
    if settings.pca is not None:
        return "sklearn", "PCA is fitted in memory"
    need, available = sklearn_bytes(n_rows, dim, n_classes), psutil.virtual_memory().available
    needed = f"{need / 2**30:.1f} GiB" if need >= 2**30 else f"{need / 2**20:.0f} MiB"
    gib = f"{needed} of the {available / 2**30:.1f} GiB available"
    if need <= MEMORY_SHARE * available:
        return "sklearn", f"scikit-learn's float64 features need about {gib}"
    return "streamed", f"scikit-learn would need about {gib}"


def fit_head(cache: Cache, settings: FitSettings, progress=None) -> FitResult:
    """The whole protocol on one cache, with the solver settings.solver names (or auto picks).
    progress: see pipeline.progress (one bar per phase)."""
    progress = resolve(progress)
    try:
        return _fit_head(cache, settings, progress)
    finally:
        progress.close()


def _fit_head(cache: Cache, settings: FitSettings, progress) -> FitResult:
    timings, started = {}, time.perf_counter()
    settings.check(cache.dim)
    splits = run_splits(cache, settings)
    classes, labels = cache.classes, cache.labels
    name, reason = choose_solver(settings, len(splits.train) + len(splits.val) + len(splits.test), cache.dim,
                                 len(classes))
    if settings.solver == "auto" and name == "streamed":
        progress.note(f"solver: streamed ({reason})")
    if name == "streamed" and settings.C is None and settings.C_selection == "cv":
        raise SettingError("C_selection (--C-selection) cv fits in memory: use solver (--solver) sklearn with it")
    if name == "streamed" and settings.hold_out == "val":
        raise SettingError("hold_out (--hold-out) val chooses C and the temperature by cross-validation, which "
                           "fits in memory: use solver (--solver) sklearn with it")
    if name == "streamed":
        from .streamed import fit_streamed as solve  # here: it imports torch, which scikit-learn fits never need
    else:
        solve = fit_in_memory
    fitted = solve(cache, settings, splits, timings, progress)
    # The train-only model at the chosen C on val (or the out-of-fold predictions of cv): what
    # settings are compared on (experiments), and the honest figure left when there is no test split.
    held_y = labels[fitted.val_rows]
    raw = scores(fitted.val_proba, held_y, classes)
    validation = {"top1": raw["top1"], "log_loss": raw["log_loss"], "classes_predicted": raw["classes_predicted"]}
    notes = [f"splits: {splits.source}", *fitted.notes]
    selection = "given" if settings.C is not None else fitted.selection
    evaluated_on = ("val" if splits.held_out_val else "test" if len(splits.test) else
                    "cv" if selection == "cv" else "val")
    if splits.held_out_val:
        notes.append(f"the validation split ({len(splits.test)} images) is held out: it scores the head; C, the "
                     f"temperature and the saved model used only the {len(splits.train)} train images")
    elif evaluated_on == "val" and settings.C is not None:
        notes.append("no test split: scores are on the validation split of the model fitted on train; "
                     "the saved model is refit on train+val")
    elif evaluated_on == "val":
        notes.append("no test split: scores are on the validation split that also chose C "
                     "(optimistic); the saved model is refit on train+val")
    elif evaluated_on == "cv":
        notes.append("no test split: scores are the cross-validated predictions that also chose C "
                     "(optimistic); the saved model is refit on train+val")
    temperature, fit_status = 1.0, "not asked for"
    if settings.calibrate == "temperature":
        temperature, fit_status = fit_temperature(fitted.val_proba, held_y)
    if len(splits.test):  # the test split, or the held-out validation split
        rows, before = splits.test, fitted.test_proba
    else:
        rows, before = fitted.val_rows, fitted.val_proba
    after = scale(before, temperature)
    predictions, final_scores = (rows, after), scores(after, labels[rows], classes)
    fitted_on = (f"the {len(held_y)} out-of-fold predictions of cross-validation on the "
                 f"{'train' if splits.held_out_val else 'train+val'} images" if fitted.selection == "cv" else
                 f"the {len(held_y)} validation images (the model fitted on train)")
    calibration = {"method": settings.calibrate, "temperature": temperature, "fitted_on": fitted_on,
                   "n_fitted": len(held_y), "status": fit_status, "optimistic": not len(splits.test),
                   "before": summary(before, labels[rows], len(classes)),
                   "after": summary(after, labels[rows], len(classes))}
    if fit_status == "bound":
        notes.append(f"calibration: the temperature reached the bound of its search (T = {temperature:.3g}): "
                     f"{fitted_on} barely pin it down; --calibrate none keeps the probabilities as fitted")
    elif fit_status == "all right":
        notes.append(f"calibration: none: all {fitted_on} are right, so they cannot tell how sharp the "
                     "probabilities should be (T = 1)")
    alternative = other_choice(fitted.sweep, settings.select)
    if alternative is not None and alternative["C"] != fitted.C:
        mine = next(r for r in fitted.sweep if r["C"] == fitted.C)
        scored = "cross-validated" if fitted.selection == "cv" else "val"
        notes.append(f"--select {alternative['select']} would choose C = {alternative['C']:.4g} among the "
                     f"{len(fitted.sweep)} Cs tried: {scored} top-1 {alternative['val_top1']:.4f} vs "
                     f"{mine['val_top1']:.4f}, {scored} log-loss {alternative['val_log_loss']:.4f} vs "
                     f"{mine['val_log_loss']:.4f} at the chosen C = {fitted.C:.4g} (before calibration)")
    C, sweep, steps = fitted.C, fitted.sweep, fitted.steps
    pipeline = Pipeline([(type(s).__name__.lower(), s) for s in steps] +
                        [("logisticregression", scaled_model(fitted.final, temperature))])
    where = [os.path.abspath(p) for p in cache.parts] if getattr(cache, "parts", None) else (
        os.path.abspath(cache.path) if cache.path else None)  # parts: the list, read as one again by export
    provenance = {"cache": where, **head_provenance(cache.provenance)}
    meta = {"provenance": provenance, "C": C, "settings": vars(settings),
            "calibration": {k: calibration[k] for k in ("method", "temperature", "fitted_on")}}
    head = fold(steps + [fitted.final], classes, meta, temperature)
    timings["total_s"] = time.perf_counter() - started
    if settings.C is None:
        unconverged = sum(not r["converged"] for r in sweep)
        if unconverged:
            notes.append(f"{unconverged} of {len(sweep)} sweep fits stopped at --max-iter {settings.max_iter}")
    solver_info = {"name": name, "reason": reason, "device": fitted.device, "world_size": this_process().world_size}
    return FitResult(pipeline, head, C, sweep, splits, evaluated_on, final_scores, fitted.convergence, timings,
                     classes, settings, validation, cache, notes, predictions=predictions, solver=solver_info,
                     selection=selection, calibration=calibration, alternative=alternative)
