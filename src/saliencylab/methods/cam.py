"""Class activation maps from a convolutional layer's activations and gradients: Grad-CAM and Grad-CAM++."""

from __future__ import annotations

import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.methods._common import capture_output, eval_mode, fast_layout, layer_by_name, target_score
from saliencylab.methods.registry import register_method
from saliencylab.models import CamLayout, find_cam_layer
from saliencylab.ops import resize
from saliencylab.precision import full_precision


def layer_activation_and_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                                  layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations A[B, K, *s] of `layer` and d target_score / dA, with the hook removed afterwards.

    The layer defaults to `model.cam_layer` when the model names one, else to `find_cam_layer`. Both come back
    as [B, C, *s] whatever the model's `cam_layout` (Keras NHWC, transformer tokens).
    """
    if getattr(model, "cam_unavailable", None):
        raise UserError(model.cam_unavailable)
    with eval_mode(model):  # the layer search runs a forward pass too: every submodule's mode comes back
        name = layer or getattr(model, "cam_layer", None) or find_cam_layer(model, x)
        module = layer_by_name(model, name)
        with capture_output(module, cut=True, name=name) as store, torch.enable_grad():
            score = target_score(model(fast_layout(x.detach())), target).sum()
            if "out" not in store:
                raise UserError(f"the CAM layer '{name}' does not run in the forward pass; name another layer")
            (grads,) = torch.autograd.grad(score, store["out"], allow_unused=True)
    layout = getattr(model, "cam_layout", None) or CamLayout()
    acts = full_precision(layout.to_nchw(store["out"].detach()))  # float32 under bf16 autocast too
    if acts.ndim != x.ndim:
        raise UserError(f"the CAM layer '{name}' outputs shape {tuple(acts.shape)}, not [B, C, *spatial] like the "
                        f"input {tuple(x.shape)}; name a convolutional layer")
    grads = torch.zeros_like(acts) if grads is None else full_precision(layout.to_nchw(grads))  # None: unused
    return acts, grads


@register_method("gradcam", family="cam", paper="Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391")
def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer: str | None = None,
            relu: bool = True) -> torch.Tensor:
    """ReLU of the activations weighted by their spatially averaged gradients, upsampled to the input.

    Args:
        layer: the convolutional layer's name (default: the model's CAM layer).
        relu: the paper's ReLU; False keeps negative evidence.

    Returns:
        [B, *spatial] of x, linearly interpolated from the layer's grid.
    """
    acts, grads = layer_activation_and_gradient(model, x, target, layer)
    weights = grads.mean(dim=tuple(range(2, grads.ndim)), keepdim=True)  # (B, K, 1, ..)
    cam = (weights * acts).sum(dim=1, keepdim=True)  # (B, 1, *s)
    if relu:
        cam = cam.clamp(min=0)
    return resize(cam, tuple(x.shape[2:]))[:, 0]


@register_method("gradcam_pp", family="cam", paper="Chattopadhay et al. 2018, https://arxiv.org/abs/1710.11063")
def gradcam_pp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer: str | None = None,
               relu: bool = True) -> torch.Tensor:
    """Grad-CAM++: pixel-wise weights alpha on the positive gradients (the paper's eq. 19, exponential score).

    Returns:
        [B, *spatial] of x.
    """
    acts, grads = layer_activation_and_gradient(model, x, target, layer)
    dims = tuple(range(2, grads.ndim))
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum(dim=dims, keepdim=True) * g3
    alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(g2))
    weights = (alpha * grads.clamp(min=0)).sum(dim=dims, keepdim=True)  # (B, K, 1, ..)
    cam = (weights * acts).sum(dim=1, keepdim=True)
    if relu:
        cam = cam.clamp(min=0)
    return resize(cam, tuple(x.shape[2:]))[:, 0]
