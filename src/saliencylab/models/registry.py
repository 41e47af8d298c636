"""Compatibility names: the model code now lives in `_registry`, `_classifier`, `_checkpoint`, `_builder`,
`_helpers`, `_preprocess`, `_factory` and `formats/`. Import from `saliencylab.models` in new code."""

from saliencylab.models._builder import build_named
from saliencylab.models._checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
    validate_checkpoint,
)
from saliencylab.models._classifier import CamLayout, Classifier, Normalized
from saliencylab.models._factory import load_model
from saliencylab.models._helpers import find_cam_layer, imagenet_classes, resolve_device
from saliencylab.models._registry import available_models, register_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CamLayout",
    "Classifier",
    "Normalized",
    "available_models",
    "build_named",
    "find_cam_layer",
    "imagenet_classes",
    "load_checkpoint",
    "load_model",
    "load_state_dict_file",
    "register_model",
    "resolve_device",
    "save_checkpoint",
    "validate_checkpoint",
]
