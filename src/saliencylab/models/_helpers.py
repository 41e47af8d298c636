"""Model helpers: the automatic CAM-layer search, and the device choice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.ops import eval_mode


def resolve_device(device: str) -> torch.device:
    """The device named by --device: see `saliencylab.devices.choose_device`."""
    from saliencylab.devices import choose_device

    return choose_device(device)


def attention_modules(module: nn.Module) -> list[str]:
    """Names of the self-attention modules (transformer blocks), in definition order."""
    out = []
    for name, sub in module.named_modules():
        kind = type(sub).__name__
        if isinstance(sub, nn.MultiheadAttention) or (kind.endswith(("Attention", "SelfAttention"))
                                                      and not kind.startswith("Multiscale")):
            out.append(name)
    return out


def suggest_token_layer(module: nn.Module) -> str | None:
    """A sensible CAM layer of a transformer: the first LayerNorm of the block that holds the last attention."""
    names = attention_modules(module)
    if not names:
        return None
    modules = dict(module.named_modules())
    parts = names[-1].split(".")
    for cut in range(len(parts) - 1, 0, -1):
        block = ".".join(parts[:cut])
        norms = [n for n, m in modules[block].named_children() if isinstance(m, nn.LayerNorm)]
        if norms:
            return f"{block}.{norms[0]}"
    return ".".join(parts[:-1]) or None


def find_cam_layer(module: nn.Module, x: torch.Tensor) -> str:
    """The last module (in execution order) with a spatial output larger than 1, called exactly once,
    that is not a pooling layer.

    For a CNN this is the last convolutional stage before global pooling: `layer4` of a ResNet,
    `features` of a VGG, `bn2` of an EfficientNet. Every submodule keeps its own train/eval mode.

    Raises:
        UserError: on a model with attention blocks (their token activations need a declared layout; the
            message names the layer to use), or when no layer qualifies.
    """
    if getattr(module, "cam_layout", None) is not None and module.cam_layout.kind == "tokens":
        suggestion = suggest_token_layer(module)
        raise UserError(f"this model's CAM layer is a token layer and none is named; pass "
                        f"--set gradcam.layer={suggestion or 'NAME'}")
    if attention_modules(module):
        suggestion = suggest_token_layer(module)
        raise UserError("the model has attention blocks (a transformer): the CAM-layer search does not guess on "
                        f"it; load it through its adapter (timm:, a transformers folder) or name a layer, e.g. "
                        f"--set gradcam.layer={suggestion}")
    finished: list[str] = []
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape)
                finished.append(name)
        return hook

    try:
        for name, sub in module.named_modules():
            if name:
                handles.append(sub.register_forward_hook(make_hook(name)))
        with eval_mode(module), torch.no_grad():
            module(x[:1])
    finally:
        for h in handles:
            h.remove()
    pooling = {name for name, sub in module.named_modules() if "pool" in type(sub).__name__.lower()}
    for name in reversed(finished):
        shape = shapes[name]
        if calls[name] == 1 and len(shape) == x.ndim and int(np.prod(shape[2:])) > 1 and name not in pooling:
            return name
    raise UserError("found no convolutional layer with a spatial output for CAM methods; "
                    "name one with --set gradcam.layer=NAME")


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
