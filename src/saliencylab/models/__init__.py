"""Classifiers with their preprocessing metadata: a registry of names, checkpoints, and adapters for external
formats (Keras, TorchScript, torch.export, ONNX, transformers, any nn.Module), all loaded by `load_model`."""

from saliencylab.models import zoo  # noqa: F401  (registers the built-in builders)
from saliencylab.models._checkpoint import load_checkpoint, save_checkpoint
from saliencylab.models._classifier import CamLayout, Classifier, Normalized
from saliencylab.models._factory import load_model
from saliencylab.models._helpers import find_cam_layer, resolve_device
from saliencylab.models._preprocess import Preprocessing, preprocessing_kwargs
from saliencylab.models._registry import available_models, register_model

__all__ = [
    "CamLayout",
    "Classifier",
    "Normalized",
    "Preprocessing",
    "available_models",
    "find_cam_layer",
    "load_checkpoint",
    "load_model",
    "preprocessing_kwargs",
    "register_model",
    "resolve_device",
    "save_checkpoint",
]
