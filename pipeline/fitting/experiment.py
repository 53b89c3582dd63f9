"""Cached-feature experiments: many heads and settings from one or more caches, never the network.

Every run is one `fit_head` call (the same code and seeds as `transfer fit`), so any row can be
reproduced exactly by the `transfer fit` command recorded beside it. Every point of a learning
curve is scored on the same rows: the test split, or, for caches without one, the whole validation
split held out from every run (`hold_out="val"`: only train is subsampled, C and the temperature
come from cross-validation on the run's own train rows); results.csv names the scored rows.
Runs go to joblib workers and
are saved as they finish (OUT.partial/runs.jsonl), so an interrupted experiment resumes.
`reports.experiment` writes the folder; `pipeline.runs.run_experiment` does both.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from numbers import Integral

import joblib
import numpy as np

from ..cache import Cache, identity, read_cache
from ..errors import IncompatibleCachesError, SettingError
from ..files import display_path, write_atomically
from ..progress import resolve
from ..settings import Interval, validate
from .probe import fit_head
from .settings import FitSettings
from .splits import make_splits, run_splits

GRID_KEYS = ("C", "class_weight", "normalize", "pca")


@dataclass
class ExperimentRequest:
    caches: list[str]
    grid: dict[str, list]  # key -> values, from parse_grid
    fractions: list[float] = field(default_factory=lambda: [1.0])
    repeats: int = 1
    seed: int = 0
    jobs: int | None = None  # parallel runs; None: the CPU cores, at most 4
    max_iter: int = 1000
    solver: str = "auto"  # fit's solver setting: auto, sklearn or streamed
    out: str | None = None  # the folder to write ("auto": reports/experiments-<time>); runs are saved in OUT.partial
    command: str = ""  # recorded in summary.md

    @classmethod
    def from_text(cls, caches, grid=(), fractions: str = "1.0", normalize: str = "standard", pca: int | None = None,
                  **options) -> "ExperimentRequest":
        """A request as `transfer experiment` takes it: "KEY=V1,V2" grid items, fractions as "0.1,0.3,1",
        and the normalize/pca every run uses unless the grid varies them."""
        return cls(list(caches), parse_grid(list(grid), normalize, pca), parse_fractions(fractions), **options)


@dataclass
class ExperimentResult:
    rows: list[dict]  # one per run, in plan order (the columns of results.csv, and each C sweep)
    best: dict[str, dict]  # per cache: the row with the best validation score
    out: str | None
    resumed: int  # runs found already finished in OUT.partial
    backbones: dict[str, str] = field(default_factory=dict)  # cache path -> what its features are (feature_label)

    def lines(self) -> list[str]:
        """The best setting per cache, and where everything is, in a few lines for the user."""
        lines = [f"resumed: {self.resumed} runs were already saved"] if self.resumed else []
        by_cv = any("held-out" in str(r.get("scored_on", "")) for r in self.best.values())
        lines.append(f"{len(self.rows)} runs; best setting per cache (chosen "
                     f"{'by cross-validation on train' if by_cv else 'on validation'}):")
        collapsed = sum(bool(r.get("collapsed")) for r in self.rows)
        for cache, r in self.best.items():
            held_out = "held-out" in str(r.get("scored_on", ""))
            scored, chose = ("held-out val", "cross-validated") if held_out else (r["evaluated_on"], "val")
            lines.append(f"  {display_path(os.path.basename(cache))}: {scored} top-1 {r['top1']:.4f}  ({chose} top-1 "
                         f"{r['val_top1']:.4f}, C={r['chosen_C']:.4g}, {r['normalize']}, pca {r['pca']}, "
                         f"class weight {r['class_weight']})")
            lines.append(f"    reproduce: {r['command']}")
        if collapsed:
            lines.append(f"warning: {collapsed} runs predict one class for every scored image (collapsed): "
                         "see summary.md")
        if self.out:
            lines.append(f"written: {display_path(self.out)}/ (results.csv, summary.md, accuracy_vs_C.png, "
                         "learning_curve.png)")
        return lines


@dataclass
class Run:
    index: int
    cache: str
    settings: FitSettings


def parse_value(key: str, text: str):
    """One grid value from text: C (a number or auto), class_weight, normalize, pca (a number or
    none); checked against FitSettings' own constraints."""
    text = text.strip()
    value: object = text
    if key in ("C", "pca") and text.lower() in ("auto", "none"):
        value = None
    elif key == "C":
        try:
            value = float(text)
        except ValueError:
            raise SettingError(f"grid value {text!r} for C is neither a number nor 'auto'") from None
    elif key == "pca":
        if not text.lstrip("-").isdigit():
            raise SettingError(f"grid value {text!r} for pca is neither a whole number nor 'none'")
        value = int(text)
    validate(key, value, FitSettings.CONSTRAINTS[key], f"--grid {key}=...")
    return value


def parse_grid(items: list[str], normalize: str = "standard", pca: int | None = None) -> dict[str, list]:
    """["C=0.1,1", "normalize=l2,standard"] -> {"C": [0.1, 1.0], ...}; unlisted keys keep one default.
    A key given twice (--grid C=1 --grid C=2) gets the values of both."""
    validate("pca", pca, FitSettings.CONSTRAINTS["pca"], "--pca")
    grid = {"C": [None], "class_weight": ["none"], "normalize": [parse_value("normalize", normalize)],
            "pca": [pca]}
    given: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise SettingError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        if key not in GRID_KEYS:
            raise SettingError(f"unknown grid key {key!r}; expected one of {', '.join(GRID_KEYS)}")
        given.setdefault(key, []).extend(parse_value(key, v) for v in values.split(","))
    for key, values in given.items():
        grid[key] = list(dict.fromkeys(values))  # keep order, drop repeats
    return grid


def parse_fractions(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise SettingError(f"train fraction {part.strip()!r} is not a number") from None
        validate("train_fraction", value, FitSettings.CONSTRAINTS["train_fraction"], "--train-fraction")
        out.append(value)
    return sorted(set(out))


def check_caches_match(paths: list[str]) -> list[Cache]:
    """Caches compared in one table must hold the same images, labels, classes and splits."""
    caches = [read_cache(p) for p in paths]
    first = caches[0]
    names = np.array(first.path_bytes, dtype=object)
    for other in caches[1:]:
        what = None
        if other.classes != first.classes:
            what = f"classes {first.classes[:3]}... vs {other.classes[:3]}..."
        elif other.n != first.n:
            what = f"{first.n} vs {other.n} images"
        else:
            differ = np.flatnonzero((names != np.array(other.path_bytes, dtype=object)) | (first.labels != other.labels))
            if len(differ):
                i = int(differ[0])
                what = f"row {i}: {first.paths[i]} vs {other.paths[i]}"
            elif (first.split is None) != (other.split is None) or (
                    first.split is not None and not np.array_equal(first.split, other.split)):
                what = "their train/val/test splits"
        if what:
            raise IncompatibleCachesError(f"caches {first.path} and {other.path} do not hold the same images and "
                                          f"labels ({what}); extract both from the same folder to compare them")
    return caches


def plan(req: ExperimentRequest, dim: int, hold_out: str = "auto") -> list[Run]:
    """Every run of the request, in order. hold_out: fit's hold_out setting for every run ("val"
    for a learning curve on caches without a test split: see `yardstick`)."""
    for pca in req.grid["pca"]:
        if pca is not None and pca > dim:
            raise SettingError(f"PCA dimension {pca} is larger than the feature dimension {dim}")
    validate("repeats", req.repeats, [Interval(Integral, 1, None)], "--repeats")
    if req.jobs is not None:  # None: default_jobs()
        validate("jobs", req.jobs, [Interval(Integral, 1, None)], "--jobs")
    validate("solver", req.solver, FitSettings.CONSTRAINTS["solver"], "--solver")
    runs = []
    combos = list(itertools.product(*(req.grid[k] for k in GRID_KEYS)))
    for cache in req.caches:
        for C, class_weight, normalize, pca in combos:
            for fraction in req.fractions:
                for repeat in range(req.repeats if fraction < 1 else 1):  # the whole train split is one sample
                    settings = FitSettings(C=C, class_weight=class_weight, max_iter=req.max_iter, seed=req.seed,
                                           normalize=normalize, pca=pca, train_fraction=fraction, repeat=repeat,
                                           solver=req.solver, hold_out=hold_out)
                    runs.append(Run(len(runs), cache, settings))
    return runs


def fit_command(cache: str, s: FitSettings) -> str:
    """The `transfer fit` command that reproduces one run exactly."""
    args = ["transfer", "fit", cache, "--C", "auto" if s.C is None else repr(s.C), "--class-weight", s.class_weight,
            "--normalize", s.normalize, "--seed", str(s.seed), "--max-iter", str(s.max_iter)]
    if s.pca is not None:
        args += ["--pca", str(s.pca)]
    if s.solver != "auto":
        args += ["--solver", s.solver]
    if s.train_fraction < 1:
        args += ["--train-fraction", repr(s.train_fraction), "--repeat", str(s.repeat)]
    if s.C_selection != "auto":
        args += ["--C-selection", s.C_selection]
    for name, default in (("calibrate", "temperature"), ("select", "top1"), ("hold_out", "auto")):
        if getattr(s, name) != default:
            args += ["--" + name.replace("_", "-"), getattr(s, name)]
    return shlex.join(args)


def yardstick(cache: Cache, req: ExperimentRequest) -> str:
    """fit's hold_out for every run: "val" when the request draws a learning curve (a fraction
    below 1) on a cache without a test split, so that every point is scored on the whole
    validation split; "auto" otherwise (the test split, whole, already scores every point)."""
    if min(req.fractions) >= 1:
        return "auto"
    return "val" if not len(make_splits(cache, req.seed).test) else "auto"


def scored_digest(cache: Cache, rows) -> str:
    """Which images scored a run, in 12 hex digits: the sha256 of their sorted path bytes (equal
    digests: the same images)."""
    names = sorted(cache.path_bytes[int(i)] for i in rows)
    return hashlib.sha256(b"\0".join(names)).hexdigest()[:12]


def run_one(run: Run) -> dict:
    """One row of results.csv (and the C sweep, for the plot)."""
    started = time.perf_counter()
    cache = read_cache(run.cache)
    result = fit_head(cache, run.settings)
    s, sizes = result.settings, result.splits.sizes()
    scored_rows = result.predictions[0]
    return {
        "run": run.index,
        "cache": run.cache,
        "C": "auto" if s.C is None else s.C,
        "chosen_C": result.C,
        "class_weight": s.class_weight,
        "normalize": s.normalize,
        "pca": "none" if s.pca is None else s.pca,
        "train_fraction": s.train_fraction,
        "repeat": s.repeat,
        "seed": s.seed,
        "n_train": sizes["train"],
        "n_val": sizes["val"],
        "n_test": sizes["test"],
        "n_fitted": len(result.splits.train) + len(result.splits.val),
        "evaluated_on": result.evaluated_on,
        "scored_on": result.describe_evaluation(),
        "n_scored": len(scored_rows),
        "scored_images": scored_digest(cache, scored_rows),
        "top1": result.scores["top1"],
        "balanced_accuracy": result.scores["balanced_accuracy"],
        "log_loss": result.scores["log_loss"],
        "ece": result.scores["ece"],
        "ece_uncalibrated": result.calibration["before"]["ece"],
        "temperature": result.calibration["temperature"],
        "classes_predicted": result.scores["classes_predicted"],
        "collapsed": result.scores["classes_predicted"] == 1,
        "collapsed_to": result.classes[int(result.predictions[1][0].argmax())]
        if result.scores["classes_predicted"] == 1 else "",
        "val_top1": result.validation["top1"],
        "val_log_loss": result.validation["log_loss"],
        "val_classes_predicted": result.validation["classes_predicted"],
        "converged": result.convergence["converged"],
        "fit_seconds": time.perf_counter() - started,
        "command": fit_command(run.cache, s),
        "_sweep": result.sweep,
    }


def default_jobs() -> int:
    """Parallel runs when none are asked for: the CPU cores, at most 4 (each run is one process)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores)


def run_all(req: ExperimentRequest, progress=None) -> ExperimentResult:
    """All runs, in plan order; the backbone is never built: only cached features are read.

    With req.out, every finished run is appended to OUT.partial/runs.jsonl at once and a rerun of
    the same experiment resumes from there (`finish_saved` removes it once the folder is written).
    progress: see pipeline.progress (one bar, a step per run)."""
    if not req.caches:
        raise SettingError("no cache given")
    caches = check_caches_match(req.caches)
    runs = plan(req, min(c.dim for c in caches), yardstick(caches[0], req))
    for r in runs:  # every setting and split is checked before the first fit starts
        r.settings.check(caches[0].dim)
        if r.cache == req.caches[0]:
            run_splits(caches[0], r.settings)
    saved = _Saved(req, caches) if req.out else None
    rows = saved.load() if saved else {}
    resumed = len(rows)
    progress = resolve(progress)
    progress.phase("experiment", len(runs), "run", done=resumed)
    todo = [r for r in runs if r.index not in rows]
    jobs = default_jobs() if req.jobs is None else req.jobs
    try:
        with joblib.Parallel(n_jobs=jobs, return_as="generator_unordered") as parallel:
            for row in parallel(joblib.delayed(run_one)(r) for r in todo):
                rows[row["run"]] = row
                if saved:
                    saved.append(row)
                progress.advance(1)
    finally:
        progress.close()
    ordered = [rows[i] for i in range(len(runs))]
    return ExperimentResult(ordered, best_per_cache(ordered), req.out, resumed,
                            {c.path: feature_label(c.provenance) for c in caches})


def finish_saved(out: str) -> None:
    """Remove OUT.partial once OUT is written."""
    shutil.rmtree(f"{out.rstrip(os.sep)}.partial", ignore_errors=True)


class _Saved:
    """OUT.partial: the runs of one experiment saved as they finish (one JSON line each), so an
    interrupted experiment loses at most the runs in flight."""

    def __init__(self, req: ExperimentRequest, caches: list[Cache]):
        self.folder = f"{req.out.rstrip(os.sep)}.partial"
        self.request = json.loads(json.dumps({
            "caches": [os.path.abspath(c.path) for c in caches],
            "identities": [identity(c.provenance) for c in caches],
            "grid": req.grid, "fractions": req.fractions, "repeats": req.repeats, "seed": req.seed,
            "max_iter": req.max_iter}))

    def load(self) -> dict[int, dict]:
        """The runs saved by an earlier, interrupted run of this same experiment."""
        request_file = os.path.join(self.folder, "request.json")
        if not os.path.exists(request_file):
            os.makedirs(self.folder, exist_ok=True)
            write_atomically(lambda p: _write_json(p, self.request), request_file)
            return {}
        with open(request_file) as f:
            if json.load(f) != self.request:
                raise SettingError(f"{display_path(self.folder)} holds the saved runs of another experiment; rerun "
                                   "that one to finish it, or delete the folder (or choose another --out)")
        rows = {}
        with open(os.path.join(self.folder, "runs.jsonl"), "a+") as f:
            f.seek(0)
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # the last line, cut short by the interruption
                rows[row["run"]] = row
        return rows

    def append(self, row: dict) -> None:
        with open(os.path.join(self.folder, "runs.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _write_json(path: str, doc) -> None:
    with open(path, "w") as f:
        json.dump(doc, f)


def saved_runs(out: str) -> int:
    """How many runs an interrupted experiment into `out` has saved (for the interruption message)."""
    try:
        with open(os.path.join(f"{out.rstrip(os.sep)}.partial", "runs.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def setting_key(row: dict) -> tuple:
    """What distinguishes two settings apart from C, fraction and repeat."""
    return (row["cache"], row["class_weight"], row["normalize"], row["pca"])


def best_per_cache(rows: list[dict]) -> dict[str, dict]:
    """Per cache, among its runs on the largest train fraction: the best validation top-1 (ties:
    lower validation log-loss). Chosen on validation, never on test, like C itself."""
    best = {}
    for cache in dict.fromkeys(r["cache"] for r in rows):
        mine = [r for r in rows if r["cache"] == cache]
        top_fraction = max(r["train_fraction"] for r in mine)
        candidates = [r for r in mine if r["train_fraction"] == top_fraction and r["repeat"] == 0]
        best[cache] = max(candidates, key=lambda r: (r["val_top1"], -r["val_log_loss"], -r["run"]))
    return best


def learning_curve(rows: list[dict]) -> list[dict]:
    """Mean, std, min and max of top-1 over repeats, per setting (and requested C) and train
    fraction; the images the head learned from (train + val, or train alone when val is held out);
    the scored images (their digests: one per point when every repeat was scored on the same rows)
    and how many of the repeats collapsed to one class."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(setting_key(r) + (r["C"], r["train_fraction"]), []).append(r)
    out = []
    for key, members in groups.items():
        scores = np.array([m["top1"] for m in members])
        learned = [m.get("n_fitted", m["n_train"] + m["n_val"]) for m in members]
        out.append({"cache": key[0], "class_weight": key[1], "normalize": key[2], "pca": key[3], "C": key[4],
                    "train_fraction": key[5], "n_labelled": int(np.mean(learned)),
                    "repeats": len(members), "top1_mean": float(scores.mean()), "top1_std": float(scores.std()),
                    "top1_min": float(scores.min()), "top1_max": float(scores.max()),
                    "n_scored": int(members[0].get("n_scored", 0)),
                    "scored_images": sorted({str(m.get("scored_images", "")) for m in members}),
                    "collapsed": sum(bool(m.get("collapsed")) for m in members)})
    return out


def feature_label(provenance: dict) -> str:
    """What a cache's features are, in a few words: 'efficientnet_lite0', 'resnet18 @ layer3 + flip'."""
    label = str(provenance.get("backbone", "?"))
    if provenance.get("layer_module"):
        label += f" @ {provenance['layer_module']}"
    if provenance.get("tta") not in (None, "none"):
        label += f" + {provenance['tta']}"
    return label
