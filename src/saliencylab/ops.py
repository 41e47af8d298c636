"""Small tensor operations shared by models, methods, metrics and rendering, written for x[B, C, *spatial]."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Linear (bi-, tri-) resize of x[B, C, *spatial] to `size`, half-pixel centres (align_corners=False)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode=_INTERP[len(size)], align_corners=False)


def gaussian_kernel1d(sigma: float, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised 1D Gaussian, truncated at 3 sigma (odd length)."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float | tuple[float, ...]) -> torch.Tensor:
    """Separable Gaussian blur of x[B, C, *spatial] with reflect padding; sigma in pixels, per axis or one.

    sigma 0 on an axis leaves that axis alone.
    """
    b, c, *spatial = x.shape
    sigmas = (sigma,) * len(spatial) if isinstance(sigma, (int, float)) else tuple(sigma)
    out = x.reshape(b * c, 1, *spatial)
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        k = gaussian_kernel1d(float(s), dtype=x.dtype, device=x.device)
        r = k.numel() // 2
        # move this axis last, blur along it as a 1D convolution, move it back
        moved = out.movedim(2 + axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        mode = "reflect" if shape[-1] > r else "replicate"
        flat = F.conv1d(F.pad(flat, (r, r), mode=mode), k.view(1, 1, -1))
        out = flat.reshape(shape).movedim(-1, 2 + axis)
    return out.reshape(b, c, *spatial)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode for the block; restore each submodule's own mode afterwards, also on error
    (a root `.train(flag)` would overwrite them all, e.g. a frozen BatchNorm in a training model)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
