"""Hugging Face `transformers` image classifiers from a local `save_pretrained` folder (never downloaded).

Loaded with `attn_implementation="eager"` (the default sdpa kernels return no attention maps), preprocessing
from `preprocessor_config.json`, class names from `config.json`. Vision transformers declare their token
layout (patch grid, prefix tokens) and their last block's first LayerNorm as the CAM layer; their attention
maps feed `attention_rollout`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.models._classifier import CamLayout, Classifier
from saliencylab.models._helpers import attention_modules, suggest_token_layer
from saliencylab.models._preprocess import Preprocessing
from saliencylab.models.formats._assemble import assemble


class HFNet(nn.Module):
    """pixel_values[B, C, H, W] (normalised) -> logits [B, K]; `attention_maps` gives each layer's [B, h, T, T]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(pixel_values=x, output_attentions=True)
        if not getattr(out, "attentions", None):
            raise UserError(f"{type(self.model).__name__} returns no attention maps; attention_rollout needs a "
                            "vision transformer")
        return list(out.attentions)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"'{path}' is not valid JSON ({type(err).__name__}); save the model again with "
                        "save_pretrained") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not a JSON object; save the model again with save_pretrained")
    return data


def _size(value: Any) -> tuple[int, int] | None:
    """A preprocessor size: {'height', 'width'}, {'shortest_edge'} or an int -> (H, W)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    return None


def _declared(folder: Path, config: dict[str, Any]) -> Preprocessing:
    """What config.json and preprocessor_config.json say (sizes, channels, normalisation, class names)."""
    pre_path = folder / "preprocessor_config.json"
    pre = _read_json(pre_path) if pre_path.is_file() else {}
    size = _size(pre.get("crop_size")) if pre.get("do_center_crop") else None
    size = size or _size(pre.get("size")) or _size(config.get("image_size"))
    mean = std = None
    if pre:
        factor = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
        if abs(factor * 255 - 1) > 1e-6:
            raise UserError(f"'{pre_path}' rescales pixels by {factor}; only 1/255 (pixels in [0, 1]) is supported")
        if pre.get("do_normalize", True):
            mean, std = pre.get("image_mean"), pre.get("image_std")
        else:
            mean, std = [0.0], [1.0]
    labels = config.get("id2label") or {}
    try:
        classes = tuple(str(labels[k]) for k in sorted(labels, key=int)) if labels else None
    except ValueError:
        classes = None
    return Preprocessing(input_size=size, channels=config.get("num_channels"),
                         mean=tuple(float(m) for m in mean) if mean else None,
                         std=tuple(float(s) for s in std) if std else None,
                         classes=classes if classes and len(classes) >= 2 else None)


def _token_layout(hf: nn.Module, config: dict[str, Any], size: tuple[int, int], channels: int
                  ) -> tuple[str | None, CamLayout | None]:
    """For a vision transformer (patch_size in its config): the last block's LayerNorm and the token layout."""
    patch = config.get("patch_size")
    if not patch or not attention_modules(hf):
        return None, None
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    grid = (size[0] // ph, size[1] // pw)
    with torch.no_grad():
        out = hf.eval()(pixel_values=torch.zeros(1, channels, *size), output_hidden_states=True)
    tokens = out.hidden_states[-1].shape[1] if getattr(out, "hidden_states", None) else None
    if tokens is None or tokens < grid[0] * grid[1]:
        return None, None
    layer = suggest_token_layer(hf)
    return (f"net.model.{layer}" if layer else None), CamLayout("tokens", grid, tokens - grid[0] * grid[1])


def load_transformers(folder: Path, given: Preprocessing) -> Classifier:
    """A transformers image classifier from a local folder (config.json + weights), offline."""
    config = _read_json(folder / "config.json")
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, whatever the folder says
    try:
        from transformers import AutoModelForImageClassification
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise UserError("transformers models need the transformers extra: pip install 'saliencylab[transformers]'") \
            from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        hf = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True,
                                                             attn_implementation="eager")
    except Exception as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise UserError(f"'{folder}' could not be loaded as a transformers image classifier ({type(err).__name__}: "
                        f"{first}); save it with model.save_pretrained(FOLDER) and its image processor beside it") \
            from None
    from saliencylab.models._preprocess import merge

    declared = _declared(folder, config)
    p = merge(declared, given, f"transformers folder '{folder}'")
    cam_layer, layout = (None, None)
    if p.input_size is not None:
        cam_layer, layout = _token_layout(hf, config, p.input_size, p.channels or 3)
    return assemble(HFNet(hf), source=f"transformers folder '{folder}'", name=str(folder), fmt="transformers",
                    declared=declared, given=given, weights=f"transformers {folder}", cam_layer=cam_layer,
                    layout=layout)
