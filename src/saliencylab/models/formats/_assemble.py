"""The step every adapter ends with: preprocessing merged and checked, the module wrapped and probed."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from saliencylab.models._classifier import CamLayout, Classifier, Normalized, probe_outputs
from saliencylab.models._preprocess import Preprocessing, class_names, finalise, merge


def assemble(net: nn.Module, *, source: str, name: str, fmt: str, declared: Preprocessing, given: Preprocessing,
             weights: str, cam_layer: str | None = None, layout: CamLayout | None = None, score: str = "logit",
             gradients: bool = True, default_classes: Sequence[str] | None = None,
             no_cam: str | None = None) -> Classifier:
    """Wrap `net` (pixels normalised -> logits [B, K]) as a Classifier that takes pixels in [0, 1].

    Args:
        declared: what the file says; `given`: what the user says (flags, kwargs, model.json). A contradiction
            between them is a UserError.
        no_cam: why no layer of this model can be hooked (CAM methods then refuse with this reason).
    """
    p = merge(declared, given, source)
    size, channels, mean, std = finalise(p, source)
    given_layer = p.cam_layer
    if given_layer and not given_layer.startswith("net.") and f"net.{given_layer}" in dict(net.named_modules(
            prefix="net")):
        given_layer = f"net.{given_layer}"  # the user names layers of their own model
    module = Normalized(net, mean, std, cam_layer=given_layer or cam_layer, cam_layout=layout)
    if no_cam:
        module.cam_unavailable = no_cam
    k = probe_outputs(module, channels, size, source)
    names = class_names(p, k, source, default_classes)
    return Classifier(module, name, names, size, channels, mean, std, weights, num_outputs=k, score=score,
                      format=fmt, gradients=gradients)
