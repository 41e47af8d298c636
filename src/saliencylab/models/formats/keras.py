"""Keras 3 `.keras` and legacy `.h5` files, run by Keras 3's torch backend (no TensorFlow needed).

The Keras model becomes a `torch.nn.Module`: torch autograd gives its input gradient, and its top-level layers
are registered on the wrapper (`net.layers.<name>`) so hooks and the CAM-layer search see them. Keras works
channels-last, so the wrapper takes x[B, C, H, W], feeds [B, H, W, C], and declares its CAM layout 'nhwc'.

A last layer that applies a sigmoid or softmax is split: the activation is removed from our loaded copy, so
methods explain the pre-activation logit (a saturated sigmoid leaves almost no gradient). A `Rescaling`
layer at the input is honoured: the wrapper feeds pixels in the range it expects (0..255), never rescaled twice.
Files load with Keras' safe mode (no Python code in Lambda layers is executed).
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.models._classifier import CamLayout, Classifier
from saliencylab.models._preprocess import Preprocessing
from saliencylab.models.formats._assemble import assemble

SPLIT = {"sigmoid": "pre-sigmoid logit (sigmoid split off the last layer)",
         "softmax": "pre-softmax logits (softmax split off the last layer)"}


def import_keras() -> Any:
    """Keras on the torch backend; an error that says so when Keras was imported with another backend."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError:
        raise UserError("Keras models need Keras 3: pip install 'saliencylab[keras]' (no TensorFlow needed)") from None
    backend = keras.backend.backend()
    if backend != "torch":
        raise UserError(f"Keras was already imported with the {backend} backend in this process; set "
                        "KERAS_BACKEND=torch before Keras is first imported (or start a new Python)")
    return keras


class KerasNet(nn.Module):
    """x[B, C, H, W] -> the Keras model on [B, H, W, C] -> its outputs [B, K]; its layers under `layers`."""

    def __init__(self, model: Any, keras: Any) -> None:
        super().__init__()
        self.model = model
        self._device_scope = keras.device
        self.layers = nn.ModuleDict({_key(layer.name): layer for layer in model.layers
                                     if isinstance(layer, nn.Module)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Keras moves every tensor to its own default device (CUDA when there is one): keep it on x's
        with self._device_scope(str(x.device)):
            out = self.model(x.permute(0, 2, 3, 1), training=False)  # (B, H, W, C)
        return out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out


def _key(name: str) -> str:
    return name.replace(".", "_")


def _check_file(path: Path) -> None:
    """A .keras must be a zip with config.json; an .h5 must hold a model config (not weights only)."""
    if path.suffix.lower() == ".keras":
        try:
            with zipfile.ZipFile(path) as z:
                if "config.json" not in z.namelist():
                    raise UserError(f"'{path}' is a zip archive without config.json, not a Keras model; "
                                    "save it with model.save('model.keras')")
        except (zipfile.BadZipFile, OSError):
            raise UserError(f"'{path}' is not a readable .keras file (not a zip archive: damaged or another "
                            "format); save it again with model.save('model.keras')") from None
        return
    try:
        import h5py

        with h5py.File(path, "r") as f:
            has_config = "model_config" in f.attrs
    except (OSError, ImportError) as err:
        raise UserError(f"'{path}' is not a readable HDF5 file ({type(err).__name__}); save the model with "
                        "model.save('model.keras')") from None
    if not has_config:
        raise UserError(f"'{path}' holds weights only (no model_config): it was written by save_weights; save the "
                        "whole model with model.save('model.keras'), or build it in Python and load the weights")


def _split_activation(model: Any, keras: Any) -> str:
    """Remove a sigmoid/softmax from the last layer of our loaded copy; the score that is then explained."""
    last = model.layers[-1] if model.layers else None
    act = getattr(last, "activation", None)
    name = getattr(act, "__name__", "")
    if name in SPLIT:
        last.activation = keras.activations.linear
        return SPLIT[name]
    if type(last).__name__ == "Softmax":
        return "softmax probabilities (a separate Softmax layer; not split)"
    return "logit" if name in ("", "linear") else f"output of the last layer's {name}"


def _input_range(model: Any) -> float:
    """255 when the model rescales 0..255 pixels itself (a leading Rescaling of 1/255 or 1/127.5), else 1."""
    for layer in model.layers[:3]:
        if type(layer).__name__ == "Rescaling":
            scale = float(torch.as_tensor(layer.scale).reshape(-1)[0])
            if abs(scale * 255 - 1) < 1e-3 or abs(scale * 127.5 - 1) < 1e-3:
                return 255.0
    return 1.0


def _cam_layer(model: Any) -> str | None:
    """The last top-level layer with a [B, H, W, C] output that is not pooling, flattening or dropout."""
    for layer in reversed(model.layers):
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):
            continue
        kind = type(layer).__name__
        if len(shape) == 4 and "Pool" not in kind and kind not in ("Dropout", "SpatialDropout2D"):
            return f"net.layers.{_key(layer.name)}"
    return None


def load_keras(path: Path, given: Preprocessing) -> Classifier:
    """A Keras 3 model file (.keras, or a full-model .h5) as a Classifier on pixels in [0, 1]."""
    _check_file(path)
    keras = import_keras()
    try:
        with keras.device("cpu"):  # like every loader: built on the CPU, then moved by load_model
            model = keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise UserError(f"'{path}' could not be loaded by Keras {keras.__version__} ({type(err).__name__}: "
                        f"{first}); save it again with model.save('model.keras')") from None
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1 or len(tuple(inputs[0].shape)) != 4:
        shape = [tuple(i.shape) for i in inputs]
        raise UserError(f"'{path}' takes inputs {shape}; a classifier takes one image batch [B, H, W, C]")
    _, h, w, c = tuple(inputs[0].shape)
    declared = Preprocessing(input_size=(h, w) if h and w else None, channels=c)
    score = _split_activation(model, keras)
    scale = _input_range(model)
    if scale != 1.0 and (given.mean is not None or given.std is not None):
        raise UserError(f"'{path}' rescales its input itself (a Rescaling layer); drop --mean/--std")
    if scale != 1.0:
        given = Preprocessing(given.input_size, given.channels, (0.0,), (1.0 / scale,), given.classes,
                              given.cam_layer)
    net = KerasNet(model, keras)
    return assemble(net, source=f"Keras model '{path}'", name=str(path), fmt="keras", declared=declared,
                    given=given, weights=f"keras {path}", cam_layer=_cam_layer(model), layout=CamLayout("nhwc"),
                    score=score)
