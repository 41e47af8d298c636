"""Name -> method registry. The CLI's choices, the README's table and the tests' parametrisation read it."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from saliencylab.errors import UserError

Method = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry name.
        fn: `(model, x[B, C, *spatial], target[B], **options) -> map[B, *spatial]`.
        family: gradient, cam, perturbation or model-free (the order of listings).
        paper: where the method comes from.
        uses_model: False for model-free methods (spectral residual).
        display: the normalisation that shows it best ('minmax' for maps with a large offset, like RISE).
    """

    name: str
    fn: Method
    family: str
    paper: str
    uses_model: bool = True
    display: str = "percentile"

    def options(self) -> dict[str, Any]:
        """Keyword-only options and their defaults."""
        sig = inspect.signature(self.fn)
        return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, family: str, paper: str, uses_model: bool = True,
                    display: str = "percentile") -> Callable[[Method], Method]:
    """Register `fn` under `name`; a duplicate name is an error."""

    def deco(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = MethodSpec(name, fn, family, paper, uses_model, display)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    """Look a method up by name, with close-match suggestions in the error."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown method '{name}'.{hint} Choose from: {', '.join(METHODS)}")
    return METHODS[name]


def parse_methods(spec: str) -> list[MethodSpec]:
    """'vanilla,gradcam' -> specs, checked; 'all' -> every registered method."""
    names = list(METHODS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError("--methods is empty; name at least one method, e.g. --methods vanilla,gradcam")
    return [get_method(n) for n in names]
