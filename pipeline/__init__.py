"""transfer as a library: every stage of images -> backbone -> cache -> head -> model is one call.

    import pipeline
    pipeline.extract("photos", "cache/photos.h5", backbone="efficientnet_lite0")   # -> ExtractSummary
    result = pipeline.fit("cache/photos.h5")               # -> FitResult (nothing written without out=)
    exported = pipeline.export(result, "models/photos")     # -> ExportResult: model.pt, head.pt, parity
    model = pipeline.load_model(exported.model_path)        # -> Model
    predictions = pipeline.predict(model, ["new_photos"])   # -> [Prediction(path, labels, probabilities)]

`read_cache` / `write_cache` read and write feature caches (features computed here or anywhere else).
Names are imported on first use, so `import pipeline` stays light (no torch until a stage needs it).
"""

from __future__ import annotations

import importlib
import sys
import types

_WHERE = {
    "extract": "extract", "ExtractSummary": "extract", "ExtractState": "extract",
    "read_cache": "cache", "write_cache": "cache", "Cache": "cache",
    "fit": "fit", "FitResult": "fit", "FitSettings": "fit",
    "LinearHead": "head",
    "export": "export", "ExportResult": "export",
    "load_model": "predict", "predict": "predict", "Model": "predict", "Prediction": "predict",
    "run_experiment": "experiment", "ExperimentRequest": "experiment",
    "TransferError": "errors", "SettingError": "errors", "InputFileError": "errors",
    "IncompleteCacheError": "errors", "IncompatibleCachesError": "errors",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    # PEP 562 lazy attributes: the stage modules import torch, scikit-learn and h5py.
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # When a stage module first loads, the import system binds it on its package
        # (pipeline.fit = <module>), which would hide the function of the same name: keep the function.
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
