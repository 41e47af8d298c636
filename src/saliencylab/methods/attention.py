"""Attention rollout for vision transformers (Abnar & Zuidema 2020, https://arxiv.org/abs/2005.00928)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.methods._common import eval_mode
from saliencylab.methods.registry import register_method
from saliencylab.ops import resize

NO_ATTENTION = ("attention_rollout needs a vision transformer with attention maps (a timm vit_*/deit_* model or a "
                "transformers ViT folder); this model has none. Use gradcam or the gradient methods")


@contextlib.contextmanager
def _timm_attention_probes(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record timm's attention probabilities [B, heads, T, T] at each block's `attn_drop` (fused kernels off)."""
    store: list[torch.Tensor] = []
    attns = [m for m in model.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None),
                                                                                    nn.Module)]
    fused = [m.fused_attn for m in attns]
    handles = []
    try:
        for m in attns:
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(lambda _m, _i, out: store.append(out)))
        yield store
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(attns, fused, strict=True):
            m.fused_attn = f


def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities [B, heads, T, T], first layer first, for x[B, C, H, W] in [0, 1].

    Raises:
        UserError: when the model exposes no attention maps.
    """
    net = getattr(model, "net", None)
    if net is not None and hasattr(net, "attention_maps") and hasattr(model, "mean"):
        return net.attention_maps((x - model.mean) / model.std)  # a transformers model: it returns them
    with _timm_attention_probes(model) as store:
        model(x)
    if not store:
        raise UserError(NO_ATTENTION)
    return list(store)


def rollout(attentions: list[torch.Tensor], *, head_fusion: str = "mean", residual: float = 0.5) -> torch.Tensor:
    """Rolled-out attention R = A_L ... A_1 with A_l = residual * I + (1 - residual) * fused heads, rows summing
    to one: [B, T, T], where R[b, i, j] is how much of token i's last representation flows from input token j."""
    joint = None
    for att in attentions:  # (B, heads, T, T)
        fused = {"mean": att.mean(1), "max": att.amax(1), "min": att.amin(1)}[head_fusion]  # (B, T, T)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        a = residual * eye + (1 - residual) * fused
        a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else a @ joint
    if joint is None:
        raise UserError(NO_ATTENTION)
    return joint


@register_method("attention_rollout", family="attention",
                 paper="Abnar & Zuidema 2020, https://arxiv.org/abs/2005.00928")
def attention_rollout(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                      head_fusion: Literal["mean", "max", "min"] = "mean", residual: float = 0.5) -> torch.Tensor:
    """How much each patch flows into the class token through the attention layers, upsampled to the input.

    Class-agnostic: the same map for every target (the paper's method; `target` is only checked).

    Args:
        head_fusion: how the heads of a layer are combined ('mean' as in the paper).
        residual: weight of the identity for the skip connections (0.5 in the paper).

    Returns:
        [B, *spatial] of x, bilinearly interpolated from the patch grid.
    """
    if head_fusion not in ("mean", "max", "min"):
        raise UserError(f"attention_rollout.head_fusion={head_fusion!r}: use mean, max or min")
    if not 0.0 <= residual < 1.0:
        raise UserError(f"attention_rollout.residual={residual}: use a value in [0, 1)")
    layout: Any = getattr(model, "cam_layout", None)
    if layout is None or layout.kind != "tokens":
        raise UserError(NO_ATTENTION)
    with eval_mode(model), torch.no_grad():
        logits = model(x[:1])
        if target.min() < 0 or target.max() >= max(2, logits.shape[1]):
            raise IndexError(f"target {target.tolist()} out of range for {logits.shape[1]} outputs")
        joint = rollout(attention_maps(model, x), head_fusion=head_fusion, residual=residual)  # (B, T, T)
    gh, gw = layout.grid
    cls = joint[:, 0, layout.prefix_tokens:]  # (B, gh*gw): the class token's row, prefix tokens dropped
    grid = cls.reshape(-1, 1, gh, gw).to(x.dtype)
    return resize(grid, tuple(x.shape[2:]))[:, 0]
