"""Faithfulness: does removing what the map calls important change the prediction more than removing
what it calls unimportant? Deletion and insertion curves (Petsiuk, Das & Saenko 2018,
https://arxiv.org/abs/1806.07421), with removed pixels filled by blur or by noisy linear imputation
(ROAD: Rong et al. 2022, https://arxiv.org/abs/2202.00449), most- or least-relevant first; and the
faithfulness correlation of Bhatt et al. 2020 (do random subsets' attribution sums predict their score drops?)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from saliencylab.methods._common import eval_mode, target_probability
from saliencylab.metrics._common import MetricOptionError, at_least, choice, non_finite, undefined
from saliencylab.ops import gaussian_blur

Mode = Literal["deletion", "insertion"]
Fill = Literal["blur", "noisy_linear"]
Order = Literal["morf", "lerf"]
MODES: tuple[str, ...] = ("deletion", "insertion")
FILLS: tuple[str, ...] = ("blur", "noisy_linear")
ORDERS: tuple[str, ...] = ("morf", "lerf")


# Rong et al. 2022's stencil: direct neighbours weigh 1/6, diagonal ones 1/12 (they sum to 1 inside the image).
ROAD_STENCIL: tuple[tuple[int, int, float], ...] = (
    (-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
    (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12),
)


def noisy_linear_fill(x: torch.Tensor, removed: torch.Tensor, *, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022, https://arxiv.org/abs/2202.00449).

    Every removed pixel becomes the weighted mean of its 8 neighbours that lie in the image (weight 1/6 for
    the direct neighbours, 1/12 for the diagonal ones), removed neighbours included: all removed pixels are
    solved jointly as one sparse linear system, the same for every channel; then Gaussian noise of std
    `noise` is added to them. Kept pixels are unchanged. When every pixel is removed there is nothing to
    interpolate from: each channel is filled with its mean (plus the noise).

    Args:
        x: (C, H, W) image in [0, 1].
        removed: (H, W) bool.

    Returns:
        (C, H, W), x's dtype and device.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    at_least("noisy_linear_fill", "noise", noise, 0.0)
    c, h, w = x.shape
    rem = removed.detach().cpu().numpy().astype(bool)
    if rem.shape != (h, w):
        raise ValueError(f"noisy_linear_fill: removed has shape {rem.shape}; the image is {h}x{w}")
    if not rem.any():
        return x.clone()
    img = x.detach().cpu().double().numpy()
    ys, xs = np.nonzero(rem)
    n = len(ys)
    rng = np.random.default_rng(seed)
    out = img.copy()
    if n == h * w:
        out[:, ys, xs] = img.reshape(c, -1).mean(1, keepdims=True) + rng.normal(0, noise, (n, c)).T
        return torch.from_numpy(out).to(x)
    idx = -np.ones((h, w), dtype=np.int64)
    idx[ys, xs] = np.arange(n)
    diag = np.zeros(n)
    rows, cols, vals = [], [], []
    rhs = np.zeros((n, c))
    for dy, dx, weight in ROAD_STENCIL:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        k, ny, nx = np.nonzero(inside)[0], ny[inside], nx[inside]
        diag[k] += weight  # the weights of the neighbours that exist: a weighted mean at the border too
        j = idx[ny, nx]
        unknown = j >= 0
        rows.append(k[unknown])
        cols.append(j[unknown])
        vals.append(np.full(int(unknown.sum()), -weight))
        np.add.at(rhs, k[~unknown], weight * img[:, ny[~unknown], nx[~unknown]].T)
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).tocsc()
    sol = np.asarray(spsolve(a, rhs)).reshape(n, c)
    out[:, ys, xs] = (sol + rng.normal(0, noise, sol.shape)).T
    return torch.from_numpy(out).to(x)


def removal_curve(model: nn.Module, x: torch.Tensor, target: torch.Tensor, saliency: torch.Tensor, *,
                  mode: Mode = "deletion", fill: Fill = "blur", order: Order = "morf", steps: int = 10,
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
        deletion and high for insertion means faithful. A constant map removes pixels in a seeded random
        order (a random map's curve). All NaN (with an `UndefinedMetric` warning) when the map holds NaN.
    """
    choice("removal_curve", "mode", mode, MODES)
    choice("removal_curve", "fill", fill, FILLS)
    choice("removal_curve", "order", order, ORDERS)
    at_least("removal_curve", "steps", steps, 1)
    at_least("removal_curve", "blur_sigma", blur_sigma, 0.0)
    c, h, w = x.shape
    if saliency.shape[-2:] != (h, w) or saliency.numel() != h * w:
        raise ValueError(f"removal_curve: saliency has shape {tuple(saliency.shape)}; the image is {h}x{w}")
    reason = non_finite(saliency.detach().cpu().double().numpy())
    if reason:
        undefined(f"removal_curve: {reason}", stacklevel=2)
        return np.full(steps + 1, np.nan, dtype=np.float32)
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
        else:
            img = noisy_linear_fill(x, removed, seed=seed + k)
        batch.append(img)
    with eval_mode(model), torch.inference_mode():
        probs = target_probability(model(torch.stack(batch)), target.reshape(1).repeat(steps + 1))
    return probs.float().cpu().numpy()


def area(curve: np.ndarray) -> float:
    """Normalised area under a curve sampled at equal steps on [0, 1]; NaN when the curve holds NaN."""
    curve = np.asarray(curve, dtype=np.float64).ravel()
    if curve.size == 0:
        raise ValueError("area: the curve is empty")
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1))) if len(curve) > 1 else float(curve[0])


Baseline = Literal["black", "mean", "blur"]
Score = Literal["logit", "probability"]
BASELINES: tuple[str, ...] = ("black", "mean", "blur")
SCORES: tuple[str, ...] = ("logit", "probability")


def faithfulness_correlation(model: nn.Module, x: torch.Tensor, target: torch.Tensor, saliency: torch.Tensor, *,
                             n_subsets: int = 100, subset_size: int | None = None, baseline: Baseline = "black",
                             score: Score = "logit", blur_sigma: float = 0.05, seed: int = 0,
                             batch_size: int = 64) -> np.ndarray:
    """Faithfulness correlation (Bhatt, Weller & Moura 2020, https://arxiv.org/abs/2005.00631): the Pearson
    correlation, over random pixel subsets S, between the map's sum over S and the drop of the target's
    score when the pixels of S (all channels) are replaced by a baseline.

    Args:
        x: (B, C, H, W) images in [0, 1]; target: (B,); saliency: (B, H, W) maps (signed maps are summed
            with their sign, as the paper does).
        n_subsets: subsets per image (at least 2).
        subset_size: pixels per subset; None is H W / 224 (224 pixels at 224 x 224, Quantus's default).
        baseline: 'black' (0), 'mean' (each channel's mean over the image) or 'blur' (a Gaussian of
            blur_sigma x the side).
        score: the target's 'logit' (for a single-logit model, the logit or its negation) or 'probability'.
        seed: the subsets come from a CPU generator seeded with it; every image gets the same subsets, so the
            result does not depend on the batch.

    Returns:
        (B,) float64 in [-1, 1]; 1 when every subset's attribution sum predicts its score drop linearly,
        about 0 for a map unrelated to the model (the chance level). NaN (with an `UndefinedMetric` warning)
        for an image whose subset sums or score drops do not vary (a constant map, a model that ignores the
        pixels) or whose map holds NaN.
    """
    from saliencylab.methods._common import target_score

    choice("faithfulness_correlation", "baseline", baseline, BASELINES)
    choice("faithfulness_correlation", "score", score, SCORES)
    at_least("faithfulness_correlation", "n_subsets", n_subsets, 2)
    at_least("faithfulness_correlation", "batch_size", batch_size, 1)
    b, c, h, w = x.shape
    if tuple(saliency.shape) != (b, h, w):
        raise ValueError(f"faithfulness_correlation: saliency has shape {tuple(saliency.shape)}; expected "
                         f"{(b, h, w)}")
    n = h * w
    size = max(1, round(n / 224)) if subset_size is None else int(subset_size)
    if not 1 <= size <= n:
        raise MetricOptionError(f"faithfulness_correlation: subset_size must be between 1 and {n}; got {size}")
    gen = torch.Generator().manual_seed(seed)
    subsets = torch.zeros(n_subsets, n, dtype=torch.bool)
    for k in range(n_subsets):
        subsets[k, torch.randperm(n, generator=gen)[:size]] = True
    sal = saliency.detach().double().cpu().reshape(b, n)
    sums = (sal[:, None, :] * subsets[None]).sum(-1)  # (B, n_subsets)
    if baseline == "black":
        fill = torch.zeros_like(x)
    elif baseline == "mean":
        fill = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        fill = gaussian_blur(x, blur_sigma * max(h, w))
    masks = subsets.view(n_subsets, 1, h, w).to(x.device)

    def scores(imgs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = model(imgs)
        return (target_score(logits, t) if score == "logit" else target_probability(logits, t)).double().cpu()

    drops = torch.zeros(b, n_subsets, dtype=torch.float64)
    with eval_mode(model), torch.inference_mode():
        full = scores(x, target)
        for i in range(b):
            for lo in range(0, n_subsets, batch_size):
                m = masks[lo:lo + batch_size]  # (k, 1, H, W)
                imgs = torch.where(m, fill[i], x[i])  # (k, C, H, W)
                drops[i, lo:lo + len(m)] = full[i] - scores(imgs, target[i].reshape(1).repeat(len(m)))
    out = np.full(b, np.nan)
    for i in range(b):
        s, d = sums[i].numpy(), drops[i].numpy()
        reason = non_finite(s)
        if reason:
            undefined(f"faithfulness_correlation: {reason}", stacklevel=2)
        elif np.ptp(s) == 0:
            undefined("faithfulness_correlation: the map's subset sums do not vary (a constant map?)", stacklevel=2)
        elif np.ptp(d) == 0:
            undefined("faithfulness_correlation: the score drops do not vary: the model ignores the removed pixels",
                      stacklevel=2)
        else:
            out[i] = float(np.corrcoef(s, d)[0, 1])
    return out
