"""Stability of maps under perturbations the prediction should not care about: small Gaussian noise and
a few-pixel shift (the article's high-frequency-noise limit), and the max-sensitivity of Yeh et al. 2019
(https://arxiv.org/abs/1901.09392)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from saliencylab.metrics.similarity import spearman, ssim

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def stability(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: MapFn, *, noise: float = 0.02,
              shift: int = 3, seed: int = 0, maps: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Per image: Spearman and SSIM between the map of x and of x + N(0, noise^2), and of x shifted by
    `shift` pixels right and down (the shifted map is shifted back; the wrapped border is left out)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = (maps if maps is not None else method(model, x, target)).detach().float().cpu().numpy()
    noisy_x = (x + noise * torch.randn(x.shape, generator=gen).to(x)).clamp(0, 1)
    noisy = method(model, noisy_x, target).detach().float().cpu().numpy()
    shifted_x = torch.roll(x, shifts=(shift, shift), dims=(-2, -1))
    moved = method(model, shifted_x, target).detach().float().cpu().numpy()
    moved = np.roll(moved, shift=(-shift, -shift), axis=(-2, -1))
    crop = (slice(None), slice(shift, -shift or None), slice(shift, -shift or None))
    out = []
    for i in range(len(base)):
        out.append({"noise_spearman": spearman(base[i], noisy[i]), "noise_ssim": ssim(base[i], noisy[i]),
                    "shift_spearman": spearman(base[crop][i], moved[crop][i]),
                    "shift_ssim": ssim(base[crop][i], moved[crop][i])})
    return out


def max_sensitivity(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: MapFn, *,
                    radius: float = 0.02, n_samples: int = 8, seed: int = 0,
                    maps: torch.Tensor | None = None) -> np.ndarray:
    """Per image: max over uniform perturbations in the L-infinity ball of `radius` of
    ||map(x + d) - map(x)|| / ||map(x)|| (Frobenius norms). Shape (B,)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = (maps if maps is not None else method(model, x, target)).detach().float()
    norm = base.flatten(1).norm(dim=1).clamp(min=1e-12)
    worst = torch.zeros(len(x))
    for _ in range(n_samples):
        d = (torch.rand(x.shape, generator=gen) * 2 - 1) * radius
        m = method(model, (x + d.to(x)).clamp(0, 1), target).detach().float()
        worst = torch.maximum(worst, ((m - base).flatten(1).norm(dim=1) / norm).cpu())
    return worst.numpy()
