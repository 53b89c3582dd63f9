"""How a head is fitted: FitSettings, the one declaration of what each setting allows."""

from __future__ import annotations

from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import ClassVar, Literal

from ..errors import SettingError
from ..settings import SEED, Interval, NoneMeans, Options, validate_all

Normalization = Literal["standard", "l2", "none"]
ClassWeight = Literal["none", "balanced"]
CSelection = Literal["auto", "validation", "cv"]
Solver = Literal["auto", "sklearn", "streamed"]
Calibration = Literal["temperature", "none"]
Select = Literal["top1", "logloss"]
HoldOut = Literal["auto", "val"]
NORMALIZATIONS: tuple[Normalization, ...] = ("standard", "l2", "none")
CLASS_WEIGHTS: tuple[ClassWeight, ...] = ("none", "balanced")
C_SELECTIONS: tuple[CSelection, ...] = ("auto", "validation", "cv")
SOLVERS: tuple[Solver, ...] = ("auto", "sklearn", "streamed")
DEVICES = ("auto", "cpu", "cuda")
CALIBRATIONS: tuple[Calibration, ...] = ("temperature", "none")
SELECTS: tuple[Select, ...] = ("top1", "logloss")
HOLD_OUTS: tuple[HoldOut, ...] = ("auto", "val")


@dataclass
class FitSettings:
    """How the head is fitted; `CONSTRAINTS` is the one declaration of what each setting allows."""

    C: float | None = None  # None: choose on the validation split
    class_weight: ClassWeight = "none"
    max_iter: int = 1000
    seed: int = 0
    normalize: Normalization = "standard"
    pca: int | None = None
    train_fraction: float = 1.0  # stratified subsample of train and val (learning curves)
    repeat: int = 0  # which subsample: seeds it with seed + repeat
    C_selection: CSelection = "auto"  # how C=None is chosen: see choose_selection
    solver: Solver = "auto"  # auto: sklearn where its float64 features fit comfortably in memory, else streamed
    device: str = "auto"  # where the streamed solver computes: auto (a GPU when there is one), cpu, cuda
    calibrate: Calibration = "temperature"  # temperature scaling on held-out predictions, folded into the head
    select: Select = "top1"  # what ranks the Cs of a sweep: val top-1 (ties: log-loss), or val log-loss
    # auto: the test split scores the head (without one, the validation split or CV: optimistic).
    # val: the whole validation split is held out and scores the head; C and the temperature come
    # from cross-validation on the train rows, which alone fit it (learning curves without a test split).
    hold_out: HoldOut = "auto"

    CONSTRAINTS: ClassVar[dict[str, list]] = {
        "C": [NoneMeans("auto (None)"), Interval(Real, 0, None, closed="neither")],
        "class_weight": [Options(CLASS_WEIGHTS)],
        "max_iter": [Interval(Integral, 1, None)],
        "seed": SEED,
        "normalize": [Options(NORMALIZATIONS)],
        "pca": [NoneMeans("none (None)"), Interval(Integral, 1, None)],
        "train_fraction": [Interval(Real, 0, 1, closed="right")],
        "repeat": [Interval(Integral, 0, None)],
        "C_selection": [Options(C_SELECTIONS)],
        "solver": [Options(SOLVERS)],
        "device": [Options(DEVICES)],
        "calibrate": [Options(CALIBRATIONS)],
        "select": [Options(SELECTS)],
        "hold_out": [Options(HOLD_OUTS)],
    }

    @classmethod
    def from_kwargs(cls, **settings) -> "FitSettings":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise SettingError(f"unknown fit setting {unknown[0]!r}; expected any of {', '.join(names)}")
        return cls(**settings)

    def check(self, dim: int) -> None:
        validate_all(vars(self), self.CONSTRAINTS)
        if self.pca is not None and self.pca > dim:
            raise SettingError(f"PCA dimension {self.pca} is larger than the feature dimension {dim}")
        if self.pca is not None and self.solver == "streamed":
            raise SettingError("pca (--pca) is fitted in memory: use solver (--solver) sklearn or auto with it")
        if self.hold_out == "val" and self.solver == "streamed":
            raise SettingError("hold_out (--hold-out) val chooses C and the temperature by cross-validation, which "
                               "fits in memory: use solver (--solver) sklearn or auto with it")
