"""Faithfulness: does removing what the map calls important change the prediction more than removing
what it calls unimportant? Deletion and insertion curves (Petsiuk, Das & Saenko 2018,
https://arxiv.org/abs/1806.07421), with removed pixels filled by blur or by noisy linear imputation
(ROAD: Rong et al. 2022, https://arxiv.org/abs/2202.00449), most- or least-relevant first."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from saliencylab.methods._common import eval_mode, target_probability
from saliencylab.ops import gaussian_blur


def noisy_linear_fill(x: torch.Tensor, removed: torch.Tensor, *, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """ROAD's noisy linear imputation: every removed pixel becomes the mean of its 4 neighbours (removed
    ones solved jointly, a sparse linear system), plus Gaussian noise of std `noise`.

    Args:
        x: (C, H, W) image.
        removed: (H, W) bool.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = x.shape
    rem = removed.cpu().numpy()
    if not rem.any():
        return x.clone()
    img = x.detach().cpu().double().numpy()
    idx = -np.ones((h, w), dtype=np.int64)
    ys, xs = np.nonzero(rem)
    idx[ys, xs] = np.arange(len(ys))
    rows, cols, vals = [], [], []
    rhs = np.zeros((len(ys), c))
    for k, (y, x_) in enumerate(zip(ys, xs, strict=True)):
        nbrs = [(y + dy, x_ + dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))
                if 0 <= y + dy < h and 0 <= x_ + dx < w]
        rows.append(k)
        cols.append(k)
        vals.append(float(len(nbrs)))
        for ny, nx in nbrs:
            j = idx[ny, nx]
            if j >= 0:
                rows.append(k)
                cols.append(j)
                vals.append(-1.0)
            else:
                rhs[k] += img[:, ny, nx]
    a = coo_matrix((vals, (rows, cols)), shape=(len(ys), len(ys))).tocsc()
    sol = spsolve(a, rhs)
    sol = sol.reshape(len(ys), c)
    rng = np.random.default_rng(seed)
    out = img.copy()
    out[:, ys, xs] = (sol + rng.normal(0, noise, sol.shape)).T
    return torch.from_numpy(out).to(x)


def removal_curve(model: nn.Module, x: torch.Tensor, target: torch.Tensor, saliency: torch.Tensor, *,
                  mode: str = "deletion", fill: str = "blur", order: str = "morf", steps: int = 10,
                  blur_sigma: float = 0.05, seed: int = 0) -> np.ndarray:
    """Target probability as pixels are deleted from (or inserted into) one image, in order of the map.

    Args:
        x: (C, H, W) image in [0, 1]; saliency: (H, W).
        mode: 'deletion' starts from the image and removes pixels; 'insertion' starts from the filled
            image and restores them.
        fill: 'blur' (a Gaussian of blur_sigma x the side) or 'noisy_linear' (ROAD).
        order: 'morf' (most relevant first) or 'lerf' (least relevant first).
        steps: points after the start; fraction k / steps of the pixels changed at point k.

    Returns:
        (steps + 1,) probabilities; the area under it (mean of the trapezoid) is the score: low for
        deletion and high for insertion means faithful.
    """
    c, h, w = x.shape
    flat = saliency.detach().reshape(-1).cpu().double()
    ranks = torch.argsort(flat, descending=(order == "morf"), stable=True)
    n = h * w
    gen = torch.Generator().manual_seed(seed)
    tie = torch.randperm(n, generator=gen)  # break exact ties (a constant map) at random, not by position
    if flat.unique().numel() < n:
        ranks = torch.argsort(flat[tie], descending=(order == "morf"), stable=True)
        ranks = tie[ranks]
    batch = []
    blurred = gaussian_blur(x[None], blur_sigma * max(h, w))[0] if fill == "blur" else None
    for k in range(steps + 1):
        changed = torch.zeros(n, dtype=torch.bool)
        changed[ranks[: round(n * k / steps)]] = True
        changed = changed.view(h, w)
        removed = changed if mode == "deletion" else ~changed
        if fill == "blur":
            img = torch.where(removed.to(x.device), blurred, x)
        elif fill == "noisy_linear":
            img = noisy_linear_fill(x, removed, seed=seed + k)
        else:
            raise ValueError(f"fill must be 'blur' or 'noisy_linear'; got {fill!r}")
        batch.append(img)
    with eval_mode(model), torch.inference_mode():
        probs = target_probability(model(torch.stack(batch)), target.reshape(1).repeat(steps + 1))
    return probs.float().cpu().numpy()


def area(curve: np.ndarray) -> float:
    """Normalised area under a curve sampled at equal steps on [0, 1]."""
    curve = np.asarray(curve, dtype=np.float64)
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1))) if len(curve) > 1 else float(curve[0])
