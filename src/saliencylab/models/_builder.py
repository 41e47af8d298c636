"""Building a classifier by name: a registered builder, `torchvision:<name>` or `timm:<name>`."""

from __future__ import annotations

import difflib
from typing import Any

from saliencylab.errors import UserError
from saliencylab.models._classifier import Classifier
from saliencylab.models._registry import _BUILDERS, get_builder


def is_named(name: str) -> bool:
    """True for a registry name or a `torchvision:`/`timm:` name."""
    return get_builder(name) is not None or name.startswith(("torchvision:", "timm:"))


def build_named(name: str, weights: str | None, arch: dict[str, Any]) -> Classifier:
    """The classifier called `name`, built with `weights` (a file, 'random' or None for the default source)."""
    builder = get_builder(name)
    if builder is not None:
        return builder(weights, **arch)
    if name.startswith("torchvision:"):
        from saliencylab.models.zoo import torchvision_classifier

        return torchvision_classifier(name.removeprefix("torchvision:"), weights, **arch)
    if name.startswith("timm:"):
        from saliencylab.models.zoo import timm_classifier

        return timm_classifier(name.removeprefix("timm:"), weights, **arch)
    close = difflib.get_close_matches(name, list(_BUILDERS), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown model '{name}'.{hint} Choose one of {', '.join(sorted(_BUILDERS))}, "
                    "torchvision:<name>, timm:<name>, a model file (.pt checkpoint or TorchScript, .pt2, .onnx, "
                    ".keras, .h5), a transformers folder, or package.module:factory")
