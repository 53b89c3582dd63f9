"""transfer as a library: every stage of images -> backbone -> cache -> head -> model is one call.

    import pipeline
    pipeline.extract("photos", "cache/photos.h5", backbone="efficientnet_lite0")   # -> ExtractSummary
    result = pipeline.fit("cache/photos.h5")               # -> FitResult (nothing written without out=)
    exported = pipeline.export(result, "models/photos")     # -> ExportResult: model.pt, head.pt, parity
    model = pipeline.load_model(exported.model_path)        # -> Model
    predictions = pipeline.predict(model, ["new_photos"])   # -> [Prediction(path, labels, probabilities)]
    scored = pipeline.evaluate(exported.model_path, "labelled_photos")  # -> Evaluation: top-1, log-loss, ECE, ...

`read_cache` / `write_cache` read and write feature caches (features computed here or anywhere else).
Names are imported on first use, so `import pipeline` stays light (no torch until a stage needs it).
docs/architecture.md shows where each lives.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

def _installed(name: str, missing: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return missing


__version__ = _installed("transfer", "0+unknown")  # unknown: a checkout used without `pip install`


def version_line() -> str:
    """transfer's version and those of the libraries that shape its results (`transfer --version`)."""
    others = ", ".join(f"{n} {_installed(n, 'not installed')}" for n in ("torch", "torchvision", "timm", "scikit-learn"))
    return f"transfer {__version__} ({others}; Python {sys.version.split()[0]})"

_WHERE = {
    "extract": "extraction", "ExtractSummary": "extraction", "ExtractState": "extraction",
    "ExtractPlan": "extraction",
    "read_cache": "cache", "write_cache": "cache", "Cache": "cache",
    "Embedder": "extraction.embedder", "merge_caches": "cache", "PartsCache": "cache",
    "fit": "runs", "FitResult": "fitting.probe", "FitSettings": "fitting.settings",
    "LinearHead": "head",
    "export": "shipping.export", "ExportResult": "shipping.export",
    "load_model": "shipping.predict", "predict": "shipping.predict", "Model": "shipping.predict",
    "Prediction": "shipping.predict",
    "run_experiment": "runs", "ExperimentRequest": "fitting.experiment",
    "inspect": "runs", "Inspection": "reports.inspection",
    "evaluate": "runs", "Evaluation": "shipping.evaluate",
    "list_backbones": "backbones", "list_layers": "backbones", "bench_backbones": "backbones.bench",
    "TransferError": "errors", "SettingError": "errors", "InputFileError": "errors",
    "IncompleteCacheError": "errors", "IncompatibleCachesError": "errors", "Interrupted": "errors",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    # PEP 562 lazy attributes: the stage modules import torch, scikit-learn and h5py. No public name
    # is also a submodule's name, so an import of a submodule never hides a function here.
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
