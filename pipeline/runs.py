"""The calls that compute and then write a run folder: fit, run_experiment, inspect, evaluate.

Each is one call from Python and one `transfer` command, with the same run-folder policy
(`files.run_folder`): `out=None` writes nothing, `out="auto"` reserves `reports/<name>-<time>`,
any other folder is checked before the work starts; a folder appears only when complete. These
calls compose the stages (fitting, reports) and sit above them; nothing below imports this.
"""

from __future__ import annotations

import os
import shlex

from .devices import session, this_process
from .errors import Interrupted
from .files import AUTO, new_folder, run_folder
from .fitting.experiment import ExperimentRequest, ExperimentResult, finish_saved, run_all, saved_runs
from .fitting.probe import FitResult, as_cache, fit_head, python_command
from .fitting.settings import FitSettings
from .progress import resolve
from .reports import inspection as inspection_mod
from .reports.experiment import write_experiment
from .reports.fit_run import write_fit_run
from .reports.evaluation import write_evaluation
from .reports.inspection import LEAK_THRESHOLD, Inspection
from .reports.pages import write_inspection


def fit(data, out: str | os.PathLike | None = None, *, command: str | None = None, progress="auto",
        **settings) -> FitResult:
    """Fit the new last layer on cached features by the linear-probe protocol; no network is run.

    data: a cache path, a `Cache`, or arrays `(X, y, classes, split)`: X (N, D), y (N,) int,
    classes (K,) names, split (N,) of "train"/"val"/"test" or None (then a seeded stratified split).
    settings: FitSettings fields (C=None chooses C on the validation split, class_weight, normalize,
    pca, solver="auto"|"sklearn"|"streamed", device, ...).
    out: a run folder to write (head, metrics, report, plots); "auto": reports/<cache name>-<time>;
    None writes nothing. progress: True for bars, False for none, "auto" (bars when interactive), or
    a progress.Progress (pipeline.progress). Under torchrun every rank
    fits its slice of the rows with the streamed solver and rank 0 alone writes `out` and reports.

    >>> result = fit("cache/photos.h5")                       # C chosen on the validation split
    >>> result.scores["top1"], result.head.weight.shape       # (K, D) folded Linear weights
    """
    cache = as_cache(data)
    leads = this_process().leads
    name = os.path.splitext(os.path.basename(cache.path or "arrays"))[0]
    progress = resolve(progress if leads else None)
    try:
        with run_folder(out if leads else None, name) as folder:
            with session():
                result = fit_head(cache, FitSettings.from_kwargs(**settings), progress)
            if folder is not None:
                write_fit_run(result, folder, command or python_command(cache, result.settings), progress)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted("interrupted while fitting: nothing was written (a run folder appears only when "
                          "complete)") from None
    return result


def run_experiment(req: ExperimentRequest, progress="auto") -> ExperimentResult:
    """Many heads and settings on cached features only (see fitting.experiment); with req.out
    ("auto" or a folder), results.csv, summary.md and the plots are written there, and an
    interrupted experiment resumes from OUT.partial when run again (req.out is set to the folder)."""
    auto = req.out == AUTO
    progress = resolve(progress)
    with run_folder(req.out, "experiments") as folder:
        req.out = folder
        try:
            result = run_all(req, progress)
        except Interrupted:
            raise
        except KeyboardInterrupt:
            if folder is None:
                raise Interrupted("interrupted: nothing was saved (no out folder)") from None
            again = (req.command or "run_experiment") + (f" --out {shlex.quote(folder)}" if auto else "")
            raise Interrupted(f"interrupted: {saved_runs(folder)} finished runs are saved in {folder}.partial; "
                              f"resume with: {again}") from None
        if folder is not None:
            progress.phase("writing results.csv, summary.md and the plots", 1, "folder")
            write_experiment(result, folder, req.command)
            finish_saved(folder)
            progress.advance(1)
            progress.close()
    return result


def inspect(data, out: str | os.PathLike | None = None, *, threshold: float | None = None, C: float | None = None,
            top: int = 24, seed: int = 0, progress="auto") -> Inspection:
    """Leaks, byte-identical duplicates, suspect labels, a map and the class balance of a cache.

    data: a cache path or a Cache. out: a folder to write inspect.html, label_issues.csv and map.png
    into ("auto": reports/inspect-<cache name>-<time>; None: nothing is written). C: the
    regularisation of the head cross-validated for suspect labels (None: the C `fit` chooses on this
    cache, so that `fit`'s report lists the same suspects). top: how many suspects the page shows.
    threshold: the cosine of mean-centred features above which two images are the same picture
    (None: LEAK_THRESHOLD). seed: fit's seed (its splits and folds).
    progress: True, False, "auto" (bars when interactive) or a progress.Progress: one phase per section.

    >>> found = inspect("cache/photos.h5")
    >>> [(found.cache.paths[p.a], found.cache.paths[p.b]) for p in found.leaks]
    """
    threshold = LEAK_THRESHOLD if threshold is None else threshold
    inspection_mod.check_settings(threshold, C, top)
    progress = resolve(progress)
    path = getattr(data, "path", None) or os.fspath(data)
    with run_folder(out, f"inspect-{os.path.splitext(os.path.basename(path))[0]}") as folder:
        found = inspection_mod.inspect(data, threshold=threshold, C=C, top=top, seed=seed, progress=progress)
        if folder is not None:
            progress.phase("inspect: inspect.html (thumbnails) and map.png", 1, "page")
            with new_folder(folder) as tmp:
                found.warnings = write_inspection(found, tmp)
            found.out = folder
            progress.advance(1)
            progress.close()
    return found


def evaluate(model, data, out: str | os.PathLike | None = None, *, split: str | None = None, batch_size: int = 16,
             device: str = "auto", progress="auto"):
    """Score a model file (model.pt, model.onnx, model.pt2) on labelled images: top-1, balanced
    accuracy, log-loss, ECE, per-class precision/recall/F1 and the confusion matrix.

    data: a folder with one subfolder per class (or train/val/test folders of them; `split` picks
    one), or a .csv/.jsonl manifest (path,label[,split]). out: a folder to write metrics.json,
    predictions.csv, the plots and report.html (the worst errors) into ("auto":
    reports/evaluate-<model folder>-<time>; None: nothing is written). progress: True, False, "auto"
    (bars when interactive) or a progress.Progress: the images' bar, then writing the folder.

    >>> evaluate("models/photos/model.pt", "new_photos/", "auto").scores["top1"]
    """
    from .shipping.evaluate import evaluate as evaluate_model  # here: it imports torch, which fit never needs
    name = os.path.basename(os.path.dirname(os.path.abspath(os.fspath(model if isinstance(model, (str, os.PathLike))
                                                                       else model.path))))
    with run_folder(out, f"evaluate-{name or 'model'}") as folder:
        progress = resolve(progress)
        found = evaluate_model(model, data, split=split, batch_size=batch_size, device=device, progress=progress)
        if folder is not None:
            progress.phase("evaluate: report.html (thumbnails), predictions.csv and the plots", 1, "folder")
            found.warnings = write_evaluation(found, folder)
            progress.advance(1)
            progress.close()
    return found
