"""The `Classifier` record every loader returns, the `Normalized` wrapper, and the layout of a CAM layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.ops import eval_mode


@dataclass(frozen=True)
class CamLayout:
    """How a CAM layer's activations are laid out, so CAM methods can average the right axes.

    Attributes:
        kind: 'nchw' (PyTorch convolutions: [B, C, H, W]), 'nhwc' (Keras: [B, H, W, C]) or 'tokens'
            (vision transformers: [B, prefix + gh * gw, D]).
        grid: (gh, gw) patch grid of a 'tokens' layer.
        prefix_tokens: class/distillation/register tokens before the patch tokens (dropped for CAM).
    """

    kind: Literal["nchw", "nhwc", "tokens"] = "nchw"
    grid: tuple[int, int] | None = None
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("nchw", "nhwc", "tokens"):
            raise ValueError(f"unknown CAM layout {self.kind!r}; use nchw, nhwc or tokens")
        if self.kind == "tokens" and self.grid is None:
            raise ValueError("a 'tokens' layout needs its patch grid (gh, gw)")

    def to_nchw(self, t: torch.Tensor) -> torch.Tensor:
        """The layer's activations (or their gradients) as [B, C, *spatial]."""
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            if t.ndim < 3:
                raise UserError(f"the CAM layer's output has shape {tuple(t.shape)}, not [B, H, W, C]; pick "
                                "a convolutional layer with --set gradcam.layer=NAME")
            return t.movedim(-1, 1)
        gh, gw = self.grid or (0, 0)
        if t.ndim != 3 or t.shape[1] != self.prefix_tokens + gh * gw:
            raise UserError(f"the CAM layer's output has shape {tuple(t.shape)}, not [B, {self.prefix_tokens} + "
                            f"{gh}x{gw} tokens, D]; pick a transformer block's norm with --set gradcam.layer=NAME")
        patches = t[:, self.prefix_tokens:]  # (B, gh*gw, D): prefix tokens dropped
        return patches.reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)  # (B, D, gh, gw)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "grid": list(self.grid) if self.grid else None,
                "prefix_tokens": self.prefix_tokens}


class Normalized(nn.Module):
    """`net((x - mean) / std)`: a classifier that takes x[B, C, H, W] in [0, 1].

    Attributes:
        cam_layer: the layer CAM methods use by default (a name in `named_modules()`), or None.
        cam_layout: how that layer's activations are laid out.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 cam_layer: str | None = None, cam_layout: CamLayout | None = None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.cam_layer = cam_layer
        self.cam_layout = cam_layout or CamLayout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass(frozen=True)
class Classifier:
    """A model and what it takes to feed it (frozen: make a changed copy with `dataclasses.replace`).

    Attributes:
        module: takes x[B, channels, *input_size] in [0, 1]; returns logits [B, num_outputs].
        name: what it was loaded from (registry name or path).
        class_names: the class names (two for a single-logit head: negative, positive).
        input_size: (H, W) the images are resized to.
        channels: 1 or 3.
        mean, std: the normalisation inside `module`, per channel.
        weights: where the weights came from, for the record.
        num_outputs: width of the logits (1 for a single-logit binary head, whose logit is the positive class).
        score: what the module returns and the methods explain, e.g. 'logit', or 'pre-sigmoid logit (sigmoid
            split off the last layer)' for a model saved with its activation.
        format: how it was loaded: registry, checkpoint, keras, torchscript, export, onnx, onnxruntime,
            transformers, module.
        gradients: False for forward-only models (onnxruntime); gradient and CAM methods then refuse.
        extra: anything else (the training config of a checkpoint).
    """

    module: nn.Module
    name: str
    class_names: list[str]
    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str
    num_outputs: int
    score: str = "logit"
    format: str = "registry"
    gradients: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def binary(self) -> bool:
        """True for a single-logit head (sigmoid output)."""
        return len(self.class_names) == 2 and self.num_outputs == 1

    @property
    def cam_layer(self) -> str | None:
        return getattr(self.module, "cam_layer", None)

    @property
    def layout(self) -> CamLayout:
        """The layout of the CAM layer's activations (kept on the module, where the methods read it)."""
        return getattr(self.module, "cam_layout", None) or CamLayout()

    @property
    def device(self) -> torch.device:
        for t in (*self.module.parameters(), *self.module.buffers()):
            return t.device
        return torch.device("cpu")

    def supports(self, family: str) -> bool:
        """Whether methods of a family ('gradient', 'cam', 'attention', 'perturbation', 'model-free') apply."""
        if family in ("gradient", "cam") and not self.gradients:
            return False
        if family == "cam" and getattr(self.module, "cam_unavailable", None):
            return False
        if family == "attention":
            return self.layout.kind == "tokens"
        return True

    def to(self, device: torch.device | str) -> Classifier:
        self.module.to(device)
        return self

    def replace(self, **changes: Any) -> Classifier:
        """A copy with some fields changed (the module is shared)."""
        return dataclasses.replace(self, **changes)

    def preprocess(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W) or (H, W, 3) float pixels in [0, 1] -> x[channels, *input_size], resized with antialiasing.

        The whole image is resized (no crop), as the article's Keras pipeline does, so that a saliency
        map can be resized back onto every pixel of the original.
        """
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
        if x.shape[0] == 1 and self.channels == 3:
            x = x.expand(3, -1, -1)
        elif x.shape[0] == 3 and self.channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        x = torch.nn.functional.interpolate(x.unsqueeze(0), size=self.input_size, mode="bilinear",
                                            align_corners=False, antialias=True)
        return x[0].clamp_(0.0, 1.0)

    def describe(self) -> dict[str, Any]:
        """Metadata for results files."""
        return {"name": self.name, "weights": self.weights, "format": self.format,
                "input_size": list(self.input_size), "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std), "num_classes": len(self.class_names), "num_outputs": self.num_outputs,
                "binary": self.binary, "score": self.score, "gradients": self.gradients,
                "cam_layer": self.cam_layer, "cam_layout": self.layout.describe()}


def probe_outputs(module: nn.Module, channels: int, input_size: tuple[int, int], source: str) -> int:
    """Width K of the logits [1, K] on a zero input, in eval mode, every submodule's mode restored afterwards.

    Raises:
        UserError: naming `source`, when the module fails on that input or returns anything but [1, K].
    """
    device = next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
    x = torch.zeros(1, channels, *input_size, device=device)
    try:
        with eval_mode(module), torch.no_grad():
            out = module(x)
    except UserError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UserError(f"{source} fails on an input of {channels}x{input_size[0]}x{input_size[1]} pixels "
                        f"({type(err).__name__}: {first}); pass --channels and --input-size that match it") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{source} returns {what}, not logits [batch, classes]; wrap it so that it returns "
                        "one row of class scores per image")
    return int(out.shape[1])


def default_class_names(k: int) -> list[str]:
    """class_0, class_1, ... or, for one logit, negative/positive."""
    return ["negative", "positive"] if k == 1 else [f"class_{i}" for i in range(k)]
