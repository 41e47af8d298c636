"""Checkpoint I/O and weight loading: every file read with `weights_only=True` and checked against its schema."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.models._classifier import Classifier

CHECKPOINT_FORMAT = "saliencylab.checkpoint"


def _is_str_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(s, str) for s in v)


def _is_floats(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(s, (int, float)) for s in v)


# field -> (check, what it must be); `cam_layer`, `config`, `extra` and `version` are optional
CHECKPOINT_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "arch": (lambda v: isinstance(v, str) and bool(v), "a model name"),
    "arch_kwargs": (lambda v: isinstance(v, dict), "a dict of architecture options"),
    "state_dict": (lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
                   "a state dict of tensors"),
    "class_names": (_is_str_list, "a list of class names"),
    "input_size": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(s, int) and s > 0
                                                                                   for s in v), "[height, width]"),
    "channels": (lambda v: isinstance(v, int) and v > 0, "a channel count"),
    "mean": (_is_floats, "a list of per-channel means"),
    "std": (_is_floats, "a list of per-channel standard deviations"),
}
_OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "cam_layer": (lambda v: v is None or isinstance(v, str), "a layer name or null"),
    "config": (lambda v: isinstance(v, dict), "a dict"),
    "extra": (lambda v: isinstance(v, dict), "a dict"),
}


def read_torch_file(path: Path, what: str, fix: str) -> Any:
    """torch.load(path, weights_only=True), with a one-line error that names the file and what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = "it holds pickled Python objects, which are never loaded" if "weights only" in str(err).lower() \
            else type(err).__name__
        raise UserError(f"'{path}' is not a {what} ({reason}); {fix}") from None


def validate_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """Every field of the schema present and of the right kind, else one UserError naming the file and field."""
    fix = "the file is damaged or was written by another version; retrain with `saliencylab train`, or pass " \
          "its weights as --model ARCH --weights FILE"
    for key, (ok, what) in CHECKPOINT_SCHEMA.items():
        if key not in ckpt:
            raise UserError(f"checkpoint '{path}' lacks the field '{key}' ({what}); {fix}")
        if not ok(ckpt[key]):
            raise UserError(f"checkpoint '{path}': field '{key}' is not {what}; {fix}")
    for key, (ok, what) in _OPTIONAL.items():
        if key in ckpt and not ok(ckpt[key]):
            raise UserError(f"checkpoint '{path}': field '{key}' is not {what}; {fix}")
    if len(ckpt["mean"]) != ckpt["channels"] or len(ckpt["std"]) != ckpt["channels"]:
        raise UserError(f"checkpoint '{path}': mean/std have {len(ckpt['mean'])}/{len(ckpt['std'])} values for "
                        f"{ckpt['channels']} channels; {fix}")


def load_state_dict_file(path: str | os.PathLike, module: nn.Module, model_name: str) -> None:
    """Load a weights file into `module`, strictly, with a one-line error when it does not fit."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file '{path}' does not exist; check the path given to --weights")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            sd = load_file(str(path))
        except Exception as err:
            raise UserError(f"'{path}' is not a safetensors file ({type(err).__name__}); check --weights") from None
    else:
        sd = read_torch_file(path, "PyTorch weights file",
                             "pass a state dict saved with torch.save(model.state_dict(), FILE)")
    if isinstance(sd, dict) and sd.get("format") == CHECKPOINT_FORMAT:
        sd = sd.get("state_dict")
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


def is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(path: str | os.PathLike) -> Classifier:
    """Rebuild a classifier from a checkpoint written by `save_checkpoint`, every field checked first."""
    from saliencylab.models._builder import build_named

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist; check the path (or pick a registered model)")
    ckpt = read_torch_file(path, "readable saliencylab checkpoint", "pass a file written by `saliencylab train`")
    if not is_checkpoint(ckpt):
        raise UserError(f"'{path}' is not a saliencylab checkpoint; for plain weights use "
                        "--model <architecture> --weights FILE")
    validate_checkpoint(ckpt, path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clf = build_named(ckpt["arch"], "random", dict(ckpt["arch_kwargs"]))
    try:
        clf.module.net.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError:
        raise UserError(f"'{path}' does not fit its own architecture {ckpt['arch']}; the file is damaged "
                        "or was written by an incompatible version") from None
    if ckpt.get("cam_layer"):
        clf.module.cam_layer = ckpt["cam_layer"]
    clf.module.eval()  # ready for inference, as from load_model: a train-mode BatchNorm would move its statistics
    extra = {**clf.extra, **ckpt.get("extra", {}), "config": ckpt.get("config", {})}
    num_outputs = int(extra.get("num_outputs", clf.num_outputs))
    return clf.replace(name=str(path), class_names=list(ckpt["class_names"]), input_size=tuple(ckpt["input_size"]),
                       channels=int(ckpt["channels"]), weights=f"checkpoint {path}", format="checkpoint",
                       num_outputs=num_outputs, extra=extra)
