"""Stability of maps under perturbations the prediction should not care about: small Gaussian noise and
a few-pixel shift (the article's high-frequency-noise limit), and the max-sensitivity of Yeh et al. 2019
(https://arxiv.org/abs/1901.09392)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from saliencylab.metrics._common import MetricOptionError, at_least, undefined
from saliencylab.metrics.similarity import spearman, ssim

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def stability(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: MapFn, *, noise: float = 0.02,
              shift: int = 3, seed: int = 0, maps: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Per image: Spearman and SSIM between the map of x and of x + N(0, noise^2), and of x shifted by
    `shift` pixels right and down (the shifted map is shifted back; the wrapped border is left out).

    Args:
        x: (B, C, H, W) in [0, 1]; noise: std in pixel units; shift: pixels (>= 0).
        maps: (B, H, W) maps of x when already computed.

    Returns:
        One dict per image: noise_spearman, noise_ssim, shift_spearman, shift_ssim (in [-1, 1]; 1 is stable).
        Each is NaN (with an `UndefinedMetric` warning) when either map is constant, e.g. all zero.
    """
    at_least("stability", "noise", noise, 0.0)
    at_least("stability", "shift", shift, 0)
    if 2 * shift >= min(x.shape[-2:]):
        raise MetricOptionError(f"stability: shift must be below half the image side ({min(x.shape[-2:])} px); "
                                f"got {shift}")
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
    """Per image: max over uniform perturbations d in the L-infinity ball of `radius` of
    ||map(x + d) - map(x)|| / ||map(x)|| (Frobenius norms; Yeh et al. 2019). Lower is more stable; 0 when
    the map does not move.

    Args:
        x: (B, C, H, W) in [0, 1]; the perturbed images are clamped to [0, 1].
        maps: (B, H, W) maps of x when already computed.

    Returns:
        (B,) float64, >= 0. NaN (with an `UndefinedMetric` warning) for an image whose map is zero everywhere
        (the relative change divides by zero) or whose maps hold NaN/infinity.
    """
    at_least("max_sensitivity", "radius", radius, 0.0)
    at_least("max_sensitivity", "n_samples", n_samples, 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = (maps if maps is not None else method(model, x, target)).detach().double().cpu()
    norm = base.flatten(1).norm(dim=1)
    worst = torch.zeros(len(x), dtype=torch.float64)
    for _ in range(n_samples):
        d = (torch.rand(x.shape, generator=gen) * 2 - 1) * radius
        m = method(model, (x + d.to(x)).clamp(0, 1), target).detach().double().cpu()
        worst = torch.maximum(worst, (m - base).flatten(1).norm(dim=1) / norm.clamp(min=1e-300))
    out = worst.numpy().copy()
    zero = (norm == 0).numpy()
    bad = ~np.isfinite(out) | ~torch.isfinite(base.flatten(1)).all(1).numpy()
    if zero.any():
        undefined(f"max_sensitivity: the map is zero everywhere for image(s) {_which(zero)}: the relative change "
                  "is undefined", stacklevel=2)
    if (bad & ~zero).any():
        undefined(f"max_sensitivity: non-finite maps for image(s) {_which(bad & ~zero)}", stacklevel=2)
    out[zero | bad] = np.nan
    return out


def _which(flags: np.ndarray) -> str:
    idx = np.nonzero(flags)[0]
    return ", ".join(str(i) for i in idx[:10]) + (f" and {len(idx) - 10} more" if len(idx) > 10 else "")
