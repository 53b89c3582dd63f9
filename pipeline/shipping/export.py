"""Stage 3: ship it. The fitted head as a torch Linear (head.pt) and the model in one or more
formats (model.pt, model.onnx, model.pt2), each written under a temporary name, checked against
scikit-learn as loaded back (`parity`), and renamed into place only when every check passed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import head as head_mod
from ..backbones import parse as parse_backbone
from ..cache import Cache, open_caches
from ..cache.format import DEFAULT_PROVENANCE
from ..devices import Choice, cpu_bf16
from ..errors import InputFileError, SettingError, TransferError
from ..files import (check_path_given, display_path, make_folder_for, remove_quietly, remove_stale_temporaries,
                     size_text, write_atomically)
from ..fitting.probe import FitResult
from ..progress import resolve
from ..settings import Options, validate
from . import formats as formats_mod
from . import parity as checks
from .model import build, linear_state

PRECISION_CHOICES = ("auto", "fp32", "bf16")


@dataclass
class ExportResult:
    model_path: str | None  # model.pt (or the one other format written): uint8 images in, probabilities out
    head_path: str  # head.pt: the torch.nn.Linear(D, K) state_dict
    parity: dict  # what was checked against scikit-learn (also in parity.json beside the model)
    paths: dict = field(default_factory=dict)  # format -> file written ("torchscript", "onnx", "pt2")
    precision: str = "fp32"  # the backbone's inside the model files
    precision_why: str = ""
    sample_lines: list = field(default_factory=list)  # what the sample of original images says (unreadable ones)
    skipped: str = ""  # why no model file was written (a cache with no backbone), when none was

    def lines(self) -> list[str]:
        """What was checked and written, in a few lines for the user."""
        h = self.parity["cached_features"]
        lines = [f"parity: torch Linear vs scikit-learn on {h['rows']} cached rows: max |p diff| "
                 f"{h['max_abs_diff']:.1e} (<= {h['tolerance']:.0e}), same argmax"]
        for fmt, path in self.paths.items():
            checked = self.parity[fmt]
            name, e, h = os.path.basename(path), checked["end_to_end"], checked["cached_features"]
            if "skipped" in h:
                lines.append(f"parity: {name}'s head on cached rows not checked: {h['skipped']}")
            else:
                lines.append(f"parity: {name}'s head vs scikit-learn on {h['rows']} cached rows: max |p diff| "
                             f"{h['max_abs_diff']:.1e} (<= {h['tolerance']:.0e}), same argmax")
            if "skipped" in e:
                lines.append(f"parity: {name} end to end not checked: {e['skipped']}")
                continue
            lines.append(f"parity: {name} on {e['images']} original images vs scikit-learn: max |p diff| "
                         f"{e['max_abs_diff']:.1e} (<= {e['tolerance']:.0e}), same argmax")
            if "reference" in e or "cached_feature_cosine_min" in e:
                lines.append(f"  (reference: {e.get('reference', 'the cached features')}; cached features at cosine "
                             f">= {e['cached_feature_cosine_min']:.4f} to the photos' fp32 features, floor "
                             f"{e['cosine_floor']})")
        lines += self.sample_lines
        if self.paths:
            lines.append(f"precision: {self.precision} ({self.precision_why})")
        lines += [f"model: {display_path(path)} ({size_text(os.path.getsize(path))})" for path in self.paths.values()]
        if self.skipped:
            lines.append(f"model files skipped: {self.skipped}")
        return lines + [f"head: {display_path(self.head_path)}"]

    def warnings(self) -> list[str]:
        """Checks that could not run (no original image readable): said apart, on stderr by the CLI."""
        return [f"{os.path.basename(self.paths[fmt])} was not checked on original images: {e['skipped']}"
                for fmt in self.paths for e in [self.parity[fmt]["end_to_end"]]
                if "skipped" in e and e.get("images") == 0]


def export(source, out: str | os.PathLike | None = None, formats=None,
           weights: str | os.PathLike | None = None, skip_image_parity: bool = False, precision: str = "auto",
           progress="auto") -> ExportResult:
    """Write head.pt and the model in each of `formats`, after checking each against scikit-learn.

    source: a fit run folder, or the FitResult of `fit` (written or not). out: the folder to
    write into (default: the run folder), or the model file's path (*.pt, *.onnx or *.pt2, one
    format). formats: "torchscript" (model.pt), "onnx" (model.onnx), "pt2" (model.pt2), a list
    of them, or "all"; None: model.pt, or head.pt alone (ExportResult.skipped says why) when the
    cache records no backbone to ship (a `write_cache` of features made elsewhere). A FitResult that
    was never written needs `out`. Any folder but the run folder also gets the head files (head.npz,
    head.json), so that it describes its model on its own; one that holds another run's files is
    refused. weights: the backbone's weights file, when the one recorded
    at extraction has moved (it must have the recorded sha256). skip_image_parity: skip only the
    check on original images (for photos edited since extraction); the cached-feature checks run.
    precision: the backbone's inside the model, "fp32", "bf16" (not for model.onnx), or "auto": bf16
    where the cache is bf16/fp16 and this machine computes bf16 natively (a GPU, or a CPU with AVX-512
    BF16, AMX or Arm BF16), else fp32. progress: see pipeline.progress (each step and check is shown).

    >>> exported = export(fit("cache/photos.h5"), "models/photos", formats="all")
    >>> exported.paths                    # {'torchscript': 'models/photos/model.pt', 'onnx': ..., 'pt2': ...}
    """
    check_path_given(out, "--out (the folder or model file to write)")
    chosen = formats_mod.parse_formats("torchscript" if formats is None else formats)
    validate("precision", precision, [Options(PRECISION_CHOICES)], "--precision")
    if isinstance(source, FitResult):
        head, reference, cache, run_dir = source.head, source.pipeline, source.cache, source.run_dir
    else:
        run_dir = os.fspath(source)
        head = head_mod.load(run_dir)
        reference = head_mod.sklearn_from_arrays(head)
        cache = open_caches(head.meta["provenance"]["cache"])  # a path, or the parts a fit read as one
    if cache.path is None:
        raise SettingError("export: this head was fitted on arrays in memory, with no backbone to ship; "
                           "`pipeline.shipping.model.linear_state(result.head)` is its torch.nn.Linear state_dict")
    _check_cache_fits(head, cache)
    if out is None and run_dir is None:
        raise SettingError("export: this fit was not written to a run folder; pass out= (a folder) to write to")
    out = os.fspath(out) if out is not None else run_dir
    paths = _model_paths(out, chosen)
    folder = os.path.dirname(os.path.abspath(next(iter(paths.values()))))
    for path in [*paths.values(), os.path.join(folder, "head.pt"), os.path.join(folder, "parity.json")]:
        remove_stale_temporaries(path)  # model.pt.writing-PID left by an export killed with kill -9
    elsewhere = os.path.abspath(folder) != os.path.abspath(run_dir or "")
    if elsewhere:
        _check_not_another_run(folder, head)
    missing = missing_backbone(head.meta["provenance"], cache)
    if missing and formats is not None:
        raise SettingError(f"export: {missing}; a model file holds the backbone, so none can be written; the new "
                           "last layer is head.npz and head.pt (a torch.nn.Linear state_dict), which `transfer fit` "
                           "writes (Python: export with formats=None)")
    make_folder_for(os.path.join(folder, "head.pt"))
    if missing:
        result = _export_head(head, reference, cache, folder, missing)
    else:
        result = _export(head, reference, cache, paths, folder, weights, skip_image_parity,
                         resolve_precision(precision, cache, chosen), resolve(progress))
    if elsewhere:
        head_mod.save(head, folder)  # so the folder describes its model on its own
    return result


# What a run folder (or an export into a folder) holds: a folder holding any of them belongs to a run.
RUN_FILES = ("head.json", "head.npz", "head.pt", "parity.json", "metrics.json", "model.joblib", "report.md",
             *("model" + suffix for suffix in formats_mod.FORMATS.values()))


def _check_not_another_run(folder: str, head: head_mod.LinearHead) -> None:
    """Refuse, before any work, to write into a folder holding another run's files: its head.json,
    metrics and report would go on describing another model than the model.pt beside them."""
    present = [name for name in RUN_FILES if os.path.lexists(os.path.join(folder, name))]
    if not present:
        return
    try:
        theirs = head_mod.load(folder)
    except TransferError:
        theirs = None
    if theirs is None or not (theirs.classes == head.classes and np.array_equal(theirs.weight, head.weight)
                              and np.array_equal(theirs.bias, head.bias)):
        whose = "another run's" if theirs is not None else "a run's (but no head.json naming it)"
        raise InputFileError(f"--out {display_path(folder)} holds {whose} files ({', '.join(present[:3])}); writing "
                             "this model there would leave them describing another model: export into the run "
                             "folder itself, or a new or empty folder")


def _check_cache_fits(head: head_mod.LinearHead, cache: Cache) -> None:
    """The cache the parity checks read must hold the features this head was fitted on: one replaced
    by another extraction (other backbone, layer, dimension) is named, not a crash."""
    recorded = head.meta.get("provenance") or {}
    now = cache.provenance
    differs = [k for k in ("backbone", "weights_sha256", "layer", "preprocessing") if k in recorded
               and json.dumps(recorded.get(k), sort_keys=True) != json.dumps(now.get(k), sort_keys=True)]
    if cache.dim != head.dim or differs:
        what = f"{cache.dim}-d features, the head takes {head.dim}-d ones" if cache.dim != head.dim else \
            f"{differs[0]} {json.dumps(now.get(differs[0]))[:40]}, the head was fitted on {json.dumps(recorded.get(differs[0]))[:40]}"
        raise InputFileError(f"the cache {display_path(cache.path)} is no longer the one this head was fitted on "
                             f"({what}): it was replaced since the fit; fit again, or extract it again as it was")


def missing_backbone(provenance: dict, cache: Cache) -> str:
    """Why no model file can be built for a head of this provenance ('' when one can): a cache
    written by `write_cache` records no backbone, or one this library does not know."""
    name = provenance.get("backbone")
    if not name or name == DEFAULT_PROVENANCE["backbone"]:
        return (f"the cache {display_path(cache.path)} records no backbone (written by write_cache without "
                "provenance['backbone'])")
    try:
        parse_backbone(str(name))
    except TransferError:
        return f"the cache {display_path(cache.path)} records backbone {name!r}, which transfer cannot build"
    return ""


def _export_head(head: head_mod.LinearHead, reference, cache: Cache, folder: str, why: str) -> ExportResult:
    """head.pt alone, checked against scikit-learn on the cached features (a cache with no backbone)."""
    report = {"cached_features": checks.on_features(head, reference, cache)}
    head_path = os.path.join(folder, "head.pt")
    write_atomically(lambda p: torch.save(linear_state(head), p), head_path)
    write_atomically(lambda p: _write_json(report, p), os.path.join(folder, "parity.json"))
    return ExportResult(None, head_path, report, {}, skipped=f"{why}; head.pt and head.npz hold the new last layer")


def _model_paths(out: str, chosen: list[str]) -> dict[str, str]:
    """format -> the file to write: out/model.pt etc., or `out` itself when it names one file."""
    named = [f for f, suffix in formats_mod.FORMATS.items() if out.lower().endswith(suffix)]
    if not named:
        return {f: os.path.join(out, "model" + formats_mod.FORMATS[f]) for f in chosen}
    if chosen != named:
        raise SettingError(f"--out {out} names one {named[0]} file but the format asked for is {', '.join(chosen)}; "
                           "give a folder, or --format " + named[0])
    return {named[0]: out}


def resolve_precision(requested: str, cache: Cache, chosen: list[str]) -> Choice:
    """The backbone's precision inside the model files, and why (see `export`)."""
    if requested == "bf16" and "onnx" in chosen:
        raise SettingError("--precision bf16: model.onnx is written in fp32 only (onnxruntime's CPU provider "
                           "runs no bf16 convolutions); export model.onnx with --precision fp32 or auto")
    if requested != "auto":
        return Choice(requested, "asked for")
    extracted = cache.provenance.get("precision")
    if extracted not in ("bf16", "fp16"):
        return Choice("fp32", f"auto: the features were extracted in {extracted or 'fp32'}")
    if "onnx" in chosen:
        return Choice("fp32", f"auto: the features were extracted in {extracted}, but model.onnx is fp32 only")
    if torch.cuda.is_available():
        return Choice("bf16", f"auto: the features were extracted in {extracted}, and this machine has a GPU")
    native, why = cpu_bf16()
    return Choice("bf16" if native else "fp32", f"auto: the features were extracted in {extracted}; {why}")


def _export(head: head_mod.LinearHead, reference, cache: Cache, paths: dict[str, str], folder: str,
            weights: str | None, skip_image_parity: bool, precision: Choice, progress) -> ExportResult:
    """parity.json: {"cached_features": the torch Linear, FORMAT: {"file", "cached_features", "end_to_end"}}."""
    try:
        return _write_checked(head, reference, cache, paths, folder, weights, skip_image_parity, precision, progress)
    finally:
        progress.close()


def _write_checked(head, reference, cache, paths, folder, weights, skip_image_parity, precision, progress):
    linear = checks.on_features(head, reference, cache)
    report: dict = {"cached_features": linear}
    progress.note(f"building the model: {head.meta['provenance'].get('backbone')} + the head, backbone in "
                  f"{precision.value} ({precision.why})")
    model, backbone = build(head, weights, precision.value)
    _check_free_space(model, paths, folder)
    sample = None
    if not skip_image_parity:
        sample = checks.sample_images(cache, backbone, checks.needs_fresh(cache, precision.value), progress=progress)
    program = None
    # Every file is written under a temporary name and checked as loaded back from it; only when all
    # agree with scikit-learn are they renamed into place.
    written = {}
    try:
        for fmt, path in paths.items():
            name = os.path.basename(path)
            if fmt in ("onnx", "pt2") and program is None:  # both start from one torch.export (traced once)
                progress.note("tracing the model with torch.export (model.onnx and model.pt2 start from it)")
                started = time.perf_counter()
                program = formats_mod.image_program(model)
                progress.note(f"  traced in {time.perf_counter() - started:.1f} s")
            progress.note(f"writing {name}")
            started = time.perf_counter()
            written[fmt] = tmp = f"{path}.writing-{os.getpid()}"
            try:
                formats_mod.write(fmt, model, tmp, program)
            except (OSError, RuntimeError) as e:  # a full disk, a vanished folder, the writer's own failure
                reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip().splitlines()
                raise TransferError(f"writing {name} into {display_path(folder)} failed: "
                                    f"{(reason or [type(e).__name__])[0][:200]}; no model file was written") from None
            runner, _ = formats_mod.load(tmp, torch.device("cpu"), fmt)
            progress.note(f"  {name} written and loaded back in {time.perf_counter() - started:.1f} s "
                          f"({size_text(os.path.getsize(tmp))})")
            report[fmt] = {"file": name, "cached_features": checks.format_on_features(runner, reference, cache, name)}
            report[fmt]["end_to_end"] = ({"skipped": "asked for (--skip-image-parity)"} if skip_image_parity else
                                         checks.end_to_end(runner, reference, cache, sample, name, precision.value,
                                                           progress))
        head_path = os.path.join(os.path.dirname(next(iter(paths.values()))), "head.pt")
        write_atomically(lambda p: torch.save(linear_state(head), p), head_path)
        for fmt, path in paths.items():
            os.replace(written.pop(fmt), path)
    finally:
        for tmp in written.values():
            remove_quietly(tmp)
    parity_path = os.path.join(folder, "parity.json")
    try:  # keep what an earlier export checked for the formats not rewritten now
        with open(parity_path) as f:
            report = {**json.load(f), **report}
    except (OSError, ValueError):
        pass
    write_atomically(lambda p: _write_json(report, p), parity_path)
    model_path = paths.get("torchscript") or next(iter(paths.values()))
    return ExportResult(model_path, head_path, report, dict(paths), precision.value, precision.why,
                        sample.lines() if sample is not None else [])


# Beyond the weights, a model file holds its code, graph and metadata: measured under 5% of
# EfficientNet-Lite0's model.pt; 10% and 16 MiB leave room for a few more.
SPACE_MARGIN, SPACE_EXTRA = 1.10, 16 * 2**20


def _check_free_space(model: nn.Module, paths: dict[str, str], folder: str) -> None:
    """Refuse before writing when the folder cannot hold every model file at once (they are all
    written under temporary names before any is renamed into place)."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    need = int(len(paths) * (weights * SPACE_MARGIN + SPACE_EXTRA))
    free = shutil.disk_usage(folder).free
    if free < need:
        names = ", ".join(os.path.basename(p) for p in paths.values())
        raise TransferError(f"not enough free space in {display_path(folder)} for {names}: about "
                            f"{need / 2**20:,.0f} MiB needed, {free / 2**20:,.0f} MiB free; no model file was written")


def _write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
