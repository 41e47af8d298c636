"""Perturbation methods: occlusion and RISE. Forward passes only, run in chunks under inference mode."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Annotated

import torch
from torch import nn

from saliencylab.methods._common import eval_mode, fast_layout, passes, target_probability, target_score
from saliencylab.methods.gradient import Baseline, _bounds, make_baseline
from saliencylab.methods.options import Count, OptionError, PassSize, Range
from saliencylab.methods.registry import register_method
from saliencylab.methods.sampling import Sampler, uniform_draws
from saliencylab.ops import resize


def _per_axis(value: int | tuple[int, ...], n: int, what: str) -> tuple[int, ...]:
    out = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != n or min(out) < 1:
        raise OptionError(f"occlusion {what}={value!r}: give one integer >= 1, or one per spatial axis ({n})")
    return out


@register_method("occlusion", family="perturbation",
                 paper="Zeiler & Fergus 2014, https://arxiv.org/abs/1311.2901")
def occlusion(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, window: Count | tuple[Count, ...] = 32,
              stride: Count | tuple[Count, ...] = 16, baseline: Baseline = 0.0,
              batch_size: PassSize = None) -> torch.Tensor:
    """Drop in the target score when a window (all channels) is replaced by the baseline, averaged per pixel.

    Windows slide over every spatial axis; a pixel's value is the mean drop over the windows that cover it
    (0 where none does).

    Args:
        window: window size in pixels, one or per axis.
        stride: step between windows, one or per axis.
        baseline: the fill, see `make_baseline` (default 0, black).
        batch_size: most perturbed images per forward pass (None: chosen, see `_common.passes`: on a CPU one
            window position for the whole batch per pass, measured 1.7x faster than passes of 64 images).

    Returns:
        [B, *spatial], signed (positive: hiding it lowers the score).
    """
    b, _c, *spatial = x.shape
    win = _per_axis(window, len(spatial), "window")
    step = _per_axis(stride, len(spatial), "stride")
    if any(w > s for w, s in zip(win, spatial, strict=True)):
        raise OptionError(f"occlusion window={window!r} is larger than the input {tuple(spatial)}; "
                          f"pass a smaller window (e.g. --set occlusion.window={max(1, min(spatial) // 4)})")
    starts = [range(0, s - w + 1, st) for s, w, st in zip(spatial, win, step, strict=True)]
    positions = list(itertools.product(*starts))
    fill = make_baseline(x, baseline)
    total = torch.zeros((b, *spatial), dtype=x.dtype, device=x.device)
    counts = torch.zeros(tuple(spatial), dtype=x.dtype, device=x.device)
    with eval_mode(model), torch.inference_mode():
        base = target_score(model(x), target)
        for lo, hi in passes(len(positions), batch_size, b, x.device,
                                 key=(id(model), "occlusion", tuple(x.shape), x.dtype)):
            batch = x.unsqueeze(0).repeat(hi - lo, *([1] * x.ndim))  # (P, B, C, *spatial)
            for i, pos in enumerate(positions[lo:hi]):
                sl = (i, slice(None), slice(None)) + tuple(slice(p, p + w) for p, w in zip(pos, win, strict=True))
                batch[sl] = fill[(slice(None), slice(None)) + sl[3:]]
            scores = target_score(model(fast_layout(batch.flatten(0, 1))), target.repeat(hi - lo))
            drop = base.unsqueeze(0) - scores.view(hi - lo, b)
            for i, pos in enumerate(positions[lo:hi]):
                region = tuple(slice(p, p + w) for p, w in zip(pos, win, strict=True))
                total[(slice(None),) + region] += drop[i].view((b,) + (1,) * len(spatial))
                counts[region] += 1
    return (total / counts.clamp(min=1)).clone()


@register_method("rise", family="perturbation", paper="Petsiuk, Das & Saenko 2018, https://arxiv.org/abs/1806.07421",
                 display="minmax")
def rise(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, n_masks: Count = 1000, grid: Count = 7,
         p_keep: Annotated[float, Range(0, 1, min_open=True)] = 0.5, batch_size: PassSize = None,
         seed: int = 0, sampler: Sampler = "antithetic") -> torch.Tensor:
    """Randomised input sampling: the mask-weighted mean of the target probability over random soft masks.

    Masks are binary `grid`^d cells kept with probability `p_keep`, upsampled linearly and shifted by a
    random sub-cell offset on each axis (the paper's construction); the same masks serve every image.

    Args:
        n_masks: number of masks (the paper uses 4,000-8,000 for ResNet-50; fewer is noisier).
        grid: cells per axis of the low-resolution mask.
        p_keep: probability that a cell is kept.
        batch_size: most masked images per forward pass (None: chosen, see `_common.passes`).
        seed: fixes the masks. All cells and shifts are drawn up front from a CPU generator seeded with it,
            so the map does not depend on `batch_size`, on the other images of the batch or on the device.
        sampler: 'antithetic' (the default: each mask followed by its mirror, the cells' uniforms u replaced by
            1 - u, the same shift; with p_keep = 0.5 the pair's masks sum to 1, so the part of the map that
            only counts how often a pixel was kept cancels pair by pair; it needed at most half of i.i.d.'s
            masks for the same map in benchmarks/bench_samplers.py, see the README), 'iid' or 'sobol' (each
            mask from one scrambled Sobol point of grid^d + d uniforms: cells kept where u < p_keep, shifts
            floor(u cell)).

    Returns:
        [B, *spatial], >= 0, in units of probability / p_keep.
    """
    (total,) = rise_sums(model, x, target, n_masks=n_masks, grid=grid, p_keep=p_keep, batch_size=batch_size,
                         seed=seed, sampler=sampler)
    return (total / (n_masks * p_keep)).clone()


def rise_cells(n_masks: int, grid: int, d: int, cell: list[int], *, p_keep: float = 0.5, seed: int = 0,
               sampler: Sampler = "iid") -> tuple[torch.Tensor, list[list[int]]]:
    """RISE's random cells and shifts, drawn on the CPU: keep [N, 1, grid, ...] (bool), shifts N x d.

    'iid' draws all cells, then all shifts, from one generator (the maps of earlier versions); the other
    samplers draw mask by mask, so mask k is the same whatever `n_masks`. An antithetic mirror (odd k) takes
    1 - u for its cells and its partner's shift.
    """
    if sampler == "iid":
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        keep = torch.rand((n_masks, 1) + (grid,) * d, generator=gen) < p_keep  # (N, 1, grid, ..)
        shifts = (torch.rand((n_masks, d), generator=gen, dtype=torch.float64) * torch.tensor(cell)).long()
    else:
        draws = uniform_draws(sampler, seed, grid ** d + d)
        u = torch.stack([next(draws) for _ in range(n_masks)])  # (N, grid^d + d)
        if sampler == "antithetic":  # a mirror keeps its partner's shift: with p_keep 0.5 it is the complement
            u[1::2, grid ** d:] = u[0::2, grid ** d:][: n_masks // 2]
        keep = (u[:, : grid ** d] < p_keep).view((n_masks, 1) + (grid,) * d)
        shifts = (u[:, grid ** d:] * torch.tensor(cell)).long()
    shifts = torch.minimum(shifts, torch.tensor(cell) - 1).tolist()  # (N, d), shift i in [0, cell_i)
    return keep, shifts


def rise_sums(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, n_masks: int = 1000, grid: int = 7,
              p_keep: float = 0.5, batch_size: int | None = None, seed: int = 0, sampler: Sampler = "antithetic",
              parts: int | Sequence[int] = 1) -> list[torch.Tensor]:
    """RISE's sums of probability x mask over consecutive shares of the masks (before dividing by N p_keep).

    Args:
        parts: how many consecutive shares (2: first and second half, for a half-split check), or the mask
            counts where shares end (see `smoothgrad_sums`).

    Returns:
        `parts` tensors [B, *spatial]; their sum divided by `n_masks * p_keep` is `rise`'s map.
    """
    b, _c, *spatial = x.shape
    d = len(spatial)
    cell = [-(-s // grid) for s in spatial]  # ceil(s / grid)
    up = tuple((grid + 1) * c for c in cell)
    # every mask's cells and shift are drawn up front on the CPU: the masks depend on the seed only
    keep, shifts = rise_cells(n_masks, grid, d, cell, p_keep=p_keep, seed=seed, sampler=sampler)
    bounds = _bounds(n_masks, parts)
    sums = []
    with eval_mode(model), torch.inference_mode():
        for first, last in zip(bounds[:-1], bounds[1:], strict=True):
            total = torch.zeros((b, *spatial), dtype=x.dtype, device=x.device)
            for lo, hi in ((first + a, first + z) for a, z in passes(last - first, batch_size, b, x.device,
                                                                     key=(id(model), "rise", tuple(x.shape),
                                                                          x.dtype))):
                n = hi - lo
                big = resize(keep[lo:hi].to(x.device, x.dtype), up)  # (n, 1, *up)
                masks = torch.stack([
                    big[(i, 0) + tuple(slice(o, o + s) for o, s in zip(shifts[lo + i], spatial, strict=True))]
                    for i in range(n)
                ])  # (n, *spatial)
                masked = (x.unsqueeze(0) * masks.view(n, 1, 1, *spatial)).flatten(0, 1)
                prob = target_probability(model(fast_layout(masked)), target.repeat(n)).view(n, b)
                with torch.autocast(x.device.type, enabled=False):  # accumulate in x's dtype, also under bf16
                    total += torch.einsum("nb,n...->b...", prob.to(x.dtype), masks)
            sums.append(total.clone())
    return sums
