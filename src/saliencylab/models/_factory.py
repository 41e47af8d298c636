"""`load_model`: one entry point for every kind of model, dispatching to the registry or a format adapter."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.models._builder import build_named, is_named
from saliencylab.models._checkpoint import load_checkpoint
from saliencylab.models._classifier import Classifier
from saliencylab.models._helpers import resolve_device
from saliencylab.models._preprocess import Preprocessing, make_preprocessing, merge, read_sidecar

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def load_model(model: str | os.PathLike | nn.Module, *, weights: str | None = None,
               device: str | torch.device = "cpu", input_size: int | Sequence[int] | None = None,
               channels: int | None = None, mean: float | Sequence[float] | None = None,
               std: float | Sequence[float] | None = None, classes: Sequence[str] | None = None,
               cam_layer: str | None = None, **arch: Any) -> Classifier:
    """Load a classifier from a name, a file, a folder, `package.module:factory`, or an `nn.Module`.

    Args:
        model: a registry name (`available_models()`), `torchvision:<name>`, `timm:<name>`, a saliencylab
            checkpoint (.pt/.pth/.ckpt), a TorchScript file (.pt), a `torch.export` program (.pt2), an ONNX
            file (.onnx), a Keras 3 file (.keras, .h5), a transformers `save_pretrained` folder,
            `package.module:factory`, or an `nn.Module` (mapping normalised images to logits [B, K]).
        weights: a state-dict file, `random` (seed 0), or None for the model's own or default source; only
            for registry names, factories and modules (files carry their weights).
        device: where to put it ('auto' picks CUDA when available).
        input_size, channels, mean, std, classes: preprocessing the file does not carry (a `model.json`
            beside the file may give them too); a value that contradicts the file is a UserError.
        cam_layer: the layer CAM methods use by default.
        **arch: architecture options for registry builders (e.g. num_outputs, channels).

    Returns:
        A Classifier whose module takes x[B, channels, *input_size] in [0, 1] and returns logits.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    given = make_preprocessing(input_size, channels, mean, std, classes, cam_layer)
    if weights == "random":  # reproducible: the same untrained model every time
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clf = _load(model, weights, given, arch)
    else:
        clf = _load(model, weights, given, arch)
    clf.module.eval()
    return clf.to(dev)


def _load(model: str | os.PathLike | nn.Module, weights: str | None, given: Preprocessing,
          arch: dict[str, Any]) -> Classifier:
    from saliencylab.models.formats import module as module_format

    if isinstance(model, nn.Module):
        _no_arch(arch, "an nn.Module")
        return module_format.from_module(model, given, weights=weights)
    name = os.fspath(model)
    if is_named(name):
        return _named(name, weights, given, arch)
    path = Path(name)
    if not path.exists() and module_format.FACTORY.match(name):
        _no_arch(arch, name)
        return module_format.from_factory(name, given, weights)
    if not path.exists() and not name.endswith((".pt", ".pth", ".ckpt", ".pt2", ".onnx", *KERAS_SUFFIXES)) \
            and os.path.sep not in name:
        return build_named(name, weights, arch)  # unknown name: the error lists what exists
    if not path.exists():
        raise UserError(f"model file '{path}' does not exist; check the path")
    _no_arch(arch, name)
    return _from_file(path, weights, given.over(read_sidecar(path)))


def _from_file(path: Path, weights: str | None, given: Preprocessing) -> Classifier:
    if weights is not None:
        raise UserError(f"--weights {weights}: '{path}' carries its own weights; drop --weights")
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            raise UserError(f"'{path}' is a TensorFlow SavedModel, which needs TensorFlow; re-save it as Keras 3 "
                            "with TensorFlow installed: keras.models.load_model(...).save('model.keras') (or, for a "
                            "tf.keras 2 model, model.save('model.h5')), then pass that file")
        if (path / "config.json").is_file():
            from saliencylab.models.formats.hf import load_transformers

            return load_transformers(path, given)
        raise UserError(f"'{path}' is a folder but neither a transformers save_pretrained folder (config.json) nor a "
                        "TensorFlow SavedModel; pass a model file")
    if suffix in KERAS_SUFFIXES:
        from saliencylab.models.formats.keras import load_keras

        return load_keras(path, given)
    if suffix == ".onnx":
        from saliencylab.models.formats.onnx import load_onnx

        return load_onnx(path, given)
    if suffix == ".pt2":
        from saliencylab.models.formats.torchscript import load_export

        return load_export(path, given)
    from saliencylab.models.formats.torchscript import is_torchscript, load_torchscript

    if is_torchscript(path):
        return load_torchscript(path, given)
    clf = load_checkpoint(path)
    return _override(clf, given, f"checkpoint '{path}'")


def _named(name: str, weights: str | None, given: Preprocessing, arch: dict[str, Any]) -> Classifier:
    return _override(build_named(name, weights, arch), given, name)


def _override(clf: Classifier, given: Preprocessing, source: str) -> Classifier:
    """A built model with the user's input size, class names and CAM layer; other values must agree with it."""
    from saliencylab.models._preprocess import class_names

    declared = Preprocessing(None, clf.channels, tuple(clf.mean), tuple(clf.std), None, None)
    p = merge(declared, given, source)
    changes: dict[str, Any] = {}
    if p.input_size is not None:
        changes["input_size"] = tuple(p.input_size)
    if p.classes is not None:
        changes["class_names"] = class_names(p, clf.num_outputs, source)
    if p.cam_layer is not None:
        layer = p.cam_layer if p.cam_layer in dict(clf.module.named_modules()) else f"net.{p.cam_layer}"
        clf.module.cam_layer = layer
    return clf.replace(**changes) if changes else clf


def _no_arch(arch: dict[str, Any], what: str) -> None:
    if arch:
        raise UserError(f"{what} takes no architecture options ({', '.join(sorted(arch))}); they are for registry "
                        "models")
