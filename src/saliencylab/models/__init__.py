"""Classifiers with their preprocessing metadata: a registry of names, and checkpoint round trips."""

from saliencylab.models.registry import (
    Classifier,
    Normalized,
    available_models,
    find_cam_layer,
    load_model,
    register_model,
)

__all__ = ["Classifier", "Normalized", "available_models", "find_cam_layer", "load_model", "register_model"]
