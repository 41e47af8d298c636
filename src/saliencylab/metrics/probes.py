"""Shortcut probes: does the model still work without the region it should read, and does it change its
mind when a spurious cue is added or removed?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from saliencylab.methods._common import eval_mode


def positive_probability(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Sigmoid of a single-logit model's output per image, in eval mode (x moved to the model's device). (B,)."""
    from saliencylab.devices import module_device

    device = module_device(model)
    out = []
    with eval_mode(model), torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            out.append(torch.sigmoid(model(x[lo:lo + batch_size].to(device))[:, 0]).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def blacked_out(x: torch.Tensor, masks: Sequence[np.ndarray], value: float = 0.0) -> torch.Tensor:
    """Copies of x[B, C, H, W] with each image's mask region set to `value` (the lungs blacked out, as
    Maguolo & Nanni 2021 did, https://doi.org/10.1016/j.inffus.2021.04.008). x is not modified."""
    out = x.clone()
    for i, m in enumerate(masks):
        out[i, :, torch.from_numpy(np.asarray(m, dtype=bool)).to(out.device)] = value
    return out


def flips(p_a: np.ndarray, p_b: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """How many thresholded predictions differ between two versions of the same images (e.g. with and
    without a laterality marker)."""
    a, b = np.asarray(p_a) >= threshold, np.asarray(p_b) >= threshold
    return {"images": int(len(a)), "flips": int((a != b).sum()), "flip_rate": float((a != b).mean()) if len(a) else
            float("nan"), "positive_rate_a": float(a.mean()) if len(a) else float("nan"),
            "positive_rate_b": float(b.mean()) if len(b) else float("nan")}
