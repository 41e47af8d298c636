"""Model-free saliency: the spectral residual of Hou & Zhang (2007)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from saliencylab.methods.options import Count, NonNegative, Odd, Range
from saliencylab.methods.registry import register_method
from saliencylab.ops import gaussian_blur, resize

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register_method("spectral_residual", family="model-free",
                 paper="Hou & Zhang 2007, https://doi.org/10.1109/CVPR.2007.383267", uses_model=False)
def spectral_residual(model: nn.Module | None, x: torch.Tensor, target: torch.Tensor | None = None, *,
                      scale: Count = 64, avg_size: Annotated[int, Range(min=1), Odd()] = 3,
                      sigma: NonNegative = 3.0) -> torch.Tensor:
    """Visual saliency from the log-amplitude spectrum minus its local average; ignores model and target.

    The image (channel mean) is resized so its larger side is `scale` pixels (the paper's 64), then
    S = G_sigma * |IFFT(exp(R + i P))|^2 with R the spectral residual and P the phase, and S is resized
    back to the input.

    Args:
        scale: working resolution of the larger side.
        avg_size: side of the local-average filter on the log spectrum (the paper's 3), odd.
        sigma: Gaussian smoothing of the saliency at working resolution, in pixels.

    Returns:
        [B, *spatial], >= 0, in x's dtype (computed in float64 for float64 input, else in float32).
    """
    _b, _c, *spatial = x.shape
    factor = scale / max(spatial)
    small_size = tuple(max(4, round(s * factor)) for s in spatial)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # keep float64; lift half precision
    img = resize(x.detach().mean(dim=1, keepdim=True).to(work), small_size)
    dims = tuple(range(2, img.ndim))
    spectrum = torch.fft.fftn(img, dim=dims)
    log_amp = torch.log(spectrum.abs().clamp(min=1e-8))
    phase = torch.angle(spectrum)
    pad = avg_size // 2
    padded = F.pad(log_amp, (pad, pad) * len(dims), mode="replicate" if len(dims) <= 3 else "constant")
    residual = log_amp - _AVG_POOL[len(dims)](padded, kernel_size=avg_size, stride=1)
    sal = torch.fft.ifftn(torch.exp(torch.complex(residual, phase)), dim=dims).abs().pow(2)
    sal = gaussian_blur(sal, sigma)
    return resize(sal, tuple(spatial))[:, 0].to(x.dtype)
