"""Settings checked in one place: constraints declared once per setting, in the style of
scikit-learn's `_parameter_constraints`, and one `validate` that every caller (the Python API,
`experiment`'s grids and the CLI) goes through.

A constraint is `None` (the value may be None), `NoneMeans` (the same, named), an `Interval` or an
`Options`; a value is valid when it meets any constraint in its list. Hand-written rather than sklearn's `_param_validation`,
which is private API that changes between releases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

from .errors import SettingError


@dataclass(frozen=True)
class Interval:
    """Numbers of `kind` (Integral or Real) between `low` and `high` (None: unbounded)."""

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"  # "both", "left", "right" or "neither"

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        low_ok = self.low is None or (value >= self.low if self.closed in ("both", "left") else value > self.low)
        high_ok = self.high is None or (value <= self.high if self.closed in ("both", "right") else value < self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        what = "a whole number" if self.kind is Integral else "a number"
        low, high = (None if v is None else (f"{v:d}" if self.kind is Integral else f"{v:g}")
                     for v in (self.low, self.high))
        if low is not None and high is not None:
            left = "[" if self.closed in ("both", "left") else "("
            right = "]" if self.closed in ("both", "right") else ")"
            return f"{what} in {left}{low}, {high}{right}"
        if low is not None:
            return f"{what} {'>=' if self.closed in ('both', 'left') else '>'} {low}"
        if high is not None:
            return f"{what} {'<=' if self.closed in ('both', 'right') else '<'} {high}"
        return what


@dataclass(frozen=True)
class Options:
    """One of a fixed set of strings."""

    values: tuple[str, ...]

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(self.values)


@dataclass(frozen=True)
class NoneMeans:
    """None, read as `meaning` (e.g. "auto"): what the message calls it."""

    meaning: str

    def accepts(self, value) -> bool:
        return value is None

    def describe(self) -> str:
        return self.meaning


SEED = [Interval(Integral, 0, 2**32 - 1)]  # what numpy and scikit-learn accept as a seed


def validate(name: str, value, constraints: list, flag: str | None = None) -> None:
    """Raise SettingError naming the setting (and its CLI flag) unless `value` meets a constraint."""
    for c in constraints:
        if (c is None and value is None) or (c is not None and c.accepts(value)):
            return
    allowed = " or ".join("None" if c is None else c.describe() for c in constraints)
    shown = f"{name} ({flag})" if flag else name
    raise SettingError(f"{shown} must be {allowed}; got {value!r}")


def validate_all(values: dict, constraints: dict[str, list], flags: dict[str, str] | None = None) -> None:
    """Every entry of `values` that has constraints."""
    for name, value in values.items():
        if name in constraints:
            validate(name, value, constraints[name], (flags or {}).get(name, "--" + name.replace("_", "-")))
