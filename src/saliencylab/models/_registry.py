"""Name -> builder registry. A builder is `(weights: str | None, **arch) -> Classifier`; names are unique.

The built-in builders live in `zoo` and register when `saliencylab.models` is imported; this module
imports nothing of them (no import loop).
"""

from __future__ import annotations

from collections.abc import Callable

from saliencylab.models._classifier import Classifier

Builder = Callable[..., Classifier]
_BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register a builder `(weights: str | None, **arch) -> Classifier` under `name`; names are unique."""

    def deco(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = fn
        return fn

    return deco


def available_models() -> list[str]:
    """Registered names; `torchvision:<name>`, `timm:<name>`, files and `package.module:factory` work too."""
    return sorted(_BUILDERS)


def get_builder(name: str) -> Builder | None:
    """The builder registered under `name`, or None."""
    return _BUILDERS.get(name)
