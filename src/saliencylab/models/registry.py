"""A registry of classifiers. Each entry builds an `nn.Module` that takes pixels in [0, 1] and returns logits.

The ImageNet normalisation (mean/std) lives inside the module (`Normalized`), so every saliency method
works in pixel units: a black baseline is 0, SmoothGrad noise is a fraction of [0, 1], and gradient x input
multiplies by the pixel values the user sees.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saliencylab.errors import UserError

CHECKPOINT_FORMAT = "saliencylab.checkpoint"
_BUILDERS: dict[str, Callable[..., Classifier]] = {}


class Normalized(nn.Module):
    """`net((x - mean) / std)`: a classifier that takes x[B, C, H, W] in [0, 1]."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 cam_layer: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.cam_layer = cam_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass
class Classifier:
    """A model and what it takes to feed it.

    Attributes:
        module: takes x[B, channels, *input_size] in [0, 1]; returns logits [B, K] (K = 1 for a binary
            single-logit head, whose logit is the positive class).
        name: the registry name it was loaded by.
        class_names: K names (two for a single-logit head: negative, positive).
        input_size: (H, W) the images are resized to.
        channels: 1 or 3.
        mean, std: the normalisation inside `module`, per channel.
        weights: where the weights came from, for the record.
    """

    module: Normalized
    name: str
    class_names: list[str]
    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def binary(self) -> bool:
        """True for a single-logit head (sigmoid output)."""
        return len(self.class_names) == 2 and self.num_outputs == 1

    @property
    def num_outputs(self) -> int:
        """Width of the logits (1 for a single-logit binary head); found once by a forward pass."""
        if "num_outputs" not in self.extra:
            x = torch.zeros(1, self.channels, *self.input_size, device=self.device)
            with torch.no_grad():
                self.extra["num_outputs"] = int(self.module.eval()(x).shape[1])
        return int(self.extra["num_outputs"])

    @property
    def cam_layer(self) -> str | None:
        return self.module.cam_layer

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: torch.device | str) -> Classifier:
        self.module.to(device)
        return self

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
        return {"name": self.name, "weights": self.weights, "input_size": list(self.input_size),
                "channels": self.channels, "mean": list(self.mean), "std": list(self.std),
                "num_classes": len(self.class_names), "binary": self.binary, "cam_layer": self.cam_layer}


def register_model(name: str) -> Callable[[Callable[..., Classifier]], Callable[..., Classifier]]:
    """Register a builder `(weights: str | None, **arch) -> Classifier` under `name`; names are unique."""

    def deco(fn: Callable[..., Classifier]) -> Callable[..., Classifier]:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = fn
        return fn

    return deco


def available_models() -> list[str]:
    """Registered names; `torchvision:<name>`, `timm:<name>` and checkpoint paths are accepted too."""
    _import_builtin_models()
    return sorted(_BUILDERS)


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error with a fix."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use auto, cpu or cuda") from None


def load_model(name: str, *, weights: str | None = None, device: str | torch.device = "cpu",
               **arch: Any) -> Classifier:
    """Build a classifier by registry name, `torchvision:<name>`, `timm:<name>` or checkpoint path.

    Args:
        weights: a weights file (state dict, .pth/.pt/.safetensors), `random` for an untrained model
            (initialised from seed 0, so the same every time), or None for the model's default source
            (embedded or cached).
        device: where to put it ('auto' picks CUDA when available).
        **arch: architecture options for builders that take them (e.g. num_outputs, channels).
    """
    _import_builtin_models()
    dev = resolve_device(device) if isinstance(device, str) else device
    if weights == "random":  # reproducible: the same untrained model every time
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _build(name, weights, arch).to(dev)
    return _build(name, weights, arch).to(dev)


def _build(name: str, weights: str | None, arch: dict[str, Any]) -> Classifier:
    if name in _BUILDERS:
        clf = _BUILDERS[name](weights, **arch)
    elif name.startswith("torchvision:"):
        from saliencylab.models.zoo import torchvision_classifier

        clf = torchvision_classifier(name.removeprefix("torchvision:"), weights, **arch)
    elif name.startswith("timm:"):
        from saliencylab.models.zoo import timm_classifier

        clf = timm_classifier(name.removeprefix("timm:"), weights, **arch)
    elif name.endswith((".pt", ".pth", ".ckpt")) or os.path.sep in name or Path(name).is_file():
        clf = load_checkpoint(name)
    else:
        close = difflib.get_close_matches(name, list(_BUILDERS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model '{name}'.{hint} Choose one of {', '.join(sorted(_BUILDERS))}, "
                        "torchvision:<name>, timm:<name>, or a checkpoint file")
    clf.module.eval()
    return clf


def load_state_dict_file(path: str | os.PathLike, module: nn.Module, model_name: str) -> None:
    """Load a weights file into `module`, strictly, with a one-line error when it does not fit."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file '{path}' does not exist; check the path given to --weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"'{path}' is not a PyTorch weights file ({type(err).__name__}); "
                        "pass a state dict saved with torch.save(model.state_dict(), FILE)") from None
    if isinstance(sd, dict) and sd.get("format") == CHECKPOINT_FORMAT:
        sd = sd["state_dict"]
    elif isinstance(sd, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"'{path}' holds no state dict of tensors; save one with torch.save(model.state_dict())")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise UserError(
            f"'{path}' does not fit {model_name}: {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(wrong)} mis-shaped tensors (first: {example}); is it a checkpoint of another model?"
        )
    module.load_state_dict(sd, strict=True)


def save_checkpoint(clf: Classifier, path: str | os.PathLike, *, arch: str, arch_kwargs: dict[str, Any],
                    config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write a checkpoint that `load_model(path)` rebuilds; it loads with `weights_only=True`."""
    from saliencylab.fsutil import atomic_path

    payload = {
        "format": CHECKPOINT_FORMAT, "version": 1, "arch": arch, "arch_kwargs": dict(arch_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in clf.module.net.state_dict().items()},
        "class_names": list(clf.class_names), "input_size": list(clf.input_size), "channels": clf.channels,
        "mean": list(clf.mean), "std": list(clf.std), "cam_layer": clf.cam_layer,
        "config": dict(config or {}), "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike) -> Classifier:
    """Rebuild a classifier from a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist; check the path (or pick a registered model)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"'{path}' is not a readable saliencylab checkpoint ({type(err).__name__}); "
                        "pass a file written by `saliencylab train`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"'{path}' is not a saliencylab checkpoint; for plain weights use "
                        "--model <architecture> --weights FILE")
    clf = load_model(ckpt["arch"], weights="random", **ckpt.get("arch_kwargs", {}))
    try:
        clf.module.net.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError:
        raise UserError(f"'{path}' does not fit its own architecture {ckpt['arch']}; the file is damaged "
                        "or was written by an incompatible version") from None
    clf.name = str(path)
    clf.class_names = list(ckpt["class_names"])
    clf.input_size = tuple(ckpt["input_size"])
    clf.channels = int(ckpt["channels"])
    clf.weights = f"checkpoint {path}"
    clf.module.cam_layer = ckpt.get("cam_layer") or clf.module.cam_layer
    clf.extra.update(ckpt.get("extra", {}))
    clf.extra["config"] = ckpt.get("config", {})
    return clf


def find_cam_layer(module: nn.Module, x: torch.Tensor) -> str:
    """The last module (in execution order) with a spatial output larger than 1, called exactly once,
    that is not a pooling layer.

    For a CNN this is the last convolutional stage before global pooling: `layer4` of a ResNet,
    `features` of a VGG, `bn2` of an EfficientNet.
    """
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

    was_training = module.training
    try:
        for name, sub in module.named_modules():
            if name:
                handles.append(sub.register_forward_hook(make_hook(name)))
        module.eval()
        with torch.no_grad():
            module(x[:1])
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    pooling = {name for name, sub in module.named_modules() if "pool" in type(sub).__name__.lower()}
    for name in reversed(finished):
        shape = shapes[name]
        if calls[name] == 1 and len(shape) == x.ndim and int(np.prod(shape[2:])) > 1 and name not in pooling:
            return name
    raise UserError("found no convolutional layer with a spatial output for CAM methods; "
                    "name one with --cam-layer")


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _import_builtin_models() -> None:
    from saliencylab.models import zoo  # noqa: F401  (registers the built-in builders)
