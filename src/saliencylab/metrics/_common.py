"""Plumbing shared by the explanation metrics: undefined results, option checks, map checks."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec

import numpy as np

from saliencylab.errors import UserError

P = ParamSpec("P")


class UndefinedMetric(UserWarning):
    """A metric is NaN because its input makes it undefined (an empty mask, an all-zero map)."""


class MetricOptionError(UserError, ValueError):
    """A string (or numeric) option of a metric is not one of its allowed values.

    A `ValueError` for Python callers and a `UserError` (one line, exit 2) for the CLI.
    """


def undefined(reason: str, *, stacklevel: int = 3) -> float:
    """Warn with `UndefinedMetric(reason)` and return NaN."""
    warnings.warn(reason, UndefinedMetric, stacklevel=stacklevel)
    return math.nan


def choice(where: str, option: str, value: Any, allowed: Sequence[str]) -> str:
    """Return `value` if it is one of `allowed`, else raise naming the function, the option and the choices."""
    if not isinstance(value, str) or value not in allowed:
        raise MetricOptionError(f"{where}: {option} must be one of {', '.join(repr(a) for a in allowed)}; "
                                f"got {value!r}")
    return value


def at_least(where: str, option: str, value: float, low: float) -> None:
    """Raise unless value >= low (counts, steps, radii)."""
    if not value >= low:  # also refuses NaN
        raise MetricOptionError(f"{where}: {option} must be >= {low:g}; got {value!r}")


def non_finite(m: np.ndarray) -> str | None:
    """A reason when the map holds NaN or infinity (a failed method), else None."""
    bad = int(np.size(m) - np.isfinite(m).sum())
    if bad == 0:
        return None
    return "the map is NaN everywhere" if bad == np.size(m) else f"the map has {bad} non-finite values"


class Undefined(Exception):
    """Raised inside a metric when its input makes it undefined; `nan_if_undefined` turns it into NaN + warning."""


def nan_if_undefined(fn: Callable[P, float]) -> Callable[P, float]:
    """Decorator: a metric that raises `Undefined(reason)` returns NaN and warns `UndefinedMetric(reason)`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> float:
        try:
            return fn(*args, **kwargs)
        except Undefined as e:
            return undefined(str(e), stacklevel=3)

    return wrapper
