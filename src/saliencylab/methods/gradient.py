"""Gradient methods: vanilla gradient, gradient x input, SmoothGrad, Integrated Gradients.

All work on x[B, C, *spatial] in pixel units and return [B, *spatial]; the channel axis is reduced as each
method's paper does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from saliencylab.methods._common import (
    eval_mode,
    input_gradient,
    passes,
    target_score,
)
from saliencylab.methods.options import Count, NonNegative, PassSize
from saliencylab.methods.registry import register_method
from saliencylab.methods.sampling import Sampler, noise_draws
from saliencylab.ops import gaussian_blur

Rule = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
Baseline = Literal["black", "blur"] | float | torch.Tensor
"""'black' (zeros), 'blur', a constant, or a tensor broadcastable to x: see `make_baseline`."""


@register_method("vanilla", family="gradient",
                 paper="Simonyan, Vedaldi & Zisserman 2013, https://arxiv.org/abs/1312.6034")
def vanilla(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Saliency as the largest absolute input gradient over colour channels (Simonyan et al., eq. 2-3).

    Returns:
        [B, *spatial], >= 0.
    """
    with eval_mode(model):
        return input_gradient(model, x, target).abs().amax(dim=1)


@register_method("gradient_x_input", family="gradient",
                 paper="Shrikumar et al. 2016, https://arxiv.org/abs/1605.01713")
def gradient_x_input(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Input times gradient, summed over channels; signed.

    Returns:
        [B, *spatial].
    """
    with eval_mode(model):
        return (input_gradient(model, x, target) * x.detach()).sum(dim=1)


@register_method("smoothgrad", family="gradient",
                 paper="Smilkov et al. 2017, https://arxiv.org/abs/1706.03825")
def smoothgrad(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, n_samples: Count = 32,
               noise_level: NonNegative = 0.15, batch_size: PassSize = None, seed: int = 0,
               sampler: Sampler = "iid") -> torch.Tensor:
    """Mean absolute gradient over noisy copies, then the channel maximum, as for the vanilla gradient.

    Args:
        n_samples: noisy copies per image (32: converged as drawn on the bundled photos, see `methods.convergence`).
        noise_level: noise std as a fraction of each image's value range (max - min); the paper's 10-20%.
        batch_size: most samples per forward pass (None: chosen, see `_common.passes`: one noisy copy of the
            batch per pass on a CPU, as many as fit half the free memory on CUDA).
        seed: fixes the noise. Noise sample s is the s-th draw of a CPU generator seeded with it (the same
            for every image, scaled by each image's range), moved to x's device: the map does not depend on
            `batch_size`, on the other images of the batch, on x's dtype (draws are float32) or on the device.
        sampler: 'iid' normal noise, 'antithetic' (each draw followed by its negation) or 'sobol'
            (scrambled Sobol points through the inverse normal CDF); see `saliencylab.methods.sampling`.

    Returns:
        [B, *spatial], >= 0. With one sample and zero noise it equals `vanilla`.
    """
    (total,) = smoothgrad_sums(model, x, target, n_samples=n_samples, noise_level=noise_level,
                               batch_size=batch_size, seed=seed, sampler=sampler)
    return (total / n_samples).amax(dim=1)


def smoothgrad_sums(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, n_samples: int = 32,
                    noise_level: float = 0.15, batch_size: int | None = None, seed: int = 0,
                    sampler: Sampler = "iid", parts: int | Sequence[int] = 1) -> list[torch.Tensor]:
    """SmoothGrad's sums of |gradient| over consecutive shares of the samples, before the mean and channel max.

    Args:
        parts: how many consecutive shares (2: the first and the second half of the samples, for a
            half-split convergence check); share i holds samples [i n / parts, (i + 1) n / parts). Or the
            sample counts where shares end, e.g. (4, 8, 16): shares [0, 4), [4, 8), [8, 16).

    Returns:
        `parts` tensors [B, C, *spatial]; their sum over `n_samples`, channel max, is `smoothgrad`'s map.
    """
    b = x.shape[0]
    dims = tuple(range(1, x.ndim))
    sigma = noise_level * (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True))
    draws = noise_draws(sampler, seed, tuple(x.shape[1:]))
    bounds = _bounds(n_samples, parts)
    sums = []
    with eval_mode(model):
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            total = torch.zeros_like(x)
            for start, stop in passes(hi - lo, batch_size, b, x.device,
                                      key=(id(model), "smoothgrad", tuple(x.shape), x.dtype)):
                n = stop - start
                noise = torch.stack([next(draws) for _ in range(n)]).to(x.device, x.dtype)  # (n, C, *spatial)
                noisy = (x.detach().unsqueeze(0) + sigma.unsqueeze(0) * noise.unsqueeze(1)).reshape(
                    n * b, *x.shape[1:])  # (n B, C, *spatial)
                grad = input_gradient(model, noisy, target.repeat(n))
                total += grad.abs().reshape(n, *x.shape).sum(0)
            sums.append(total)
    return sums


def _bounds(n: int, parts: int | Sequence[int]) -> list[int]:
    """Share boundaries [0, ..., n]: `parts` equal shares, or ending at the given counts."""
    if isinstance(parts, int):
        return [round(i * n / parts) for i in range(parts + 1)]
    ends = [int(e) for e in parts]
    if ends[-1] != n or any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
        raise ValueError(f"share ends {ends} must increase to the sample count {n}")
    return [0, *ends]


def ig_alphas(n_steps: int, rule: Rule = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Points in [0, 1] and weights of the path integral's quadrature rule (weights sum to 1)."""
    if n_steps < 1:
        raise ValueError("n_steps must be at least 1")
    n = n_steps
    if rule == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(n)
        alphas, weights = 0.5 * (t + 1.0), 0.5 * w
    elif rule == "riemann_left":
        alphas, weights = np.arange(n) / n, np.full(n, 1.0 / n)
    elif rule == "riemann_right":
        alphas, weights = np.arange(1, n + 1) / n, np.full(n, 1.0 / n)
    elif rule == "riemann_middle":
        alphas, weights = (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
    elif rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("the trapezoid rule needs n_steps >= 2")
        alphas = np.linspace(0.0, 1.0, n)
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] *= 0.5
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return torch.as_tensor(alphas, dtype=torch.float64), torch.as_tensor(weights, dtype=torch.float64)


def make_baseline(x: torch.Tensor, baseline: Baseline = "black", *,
                  blur_sigma: float = 0.05) -> torch.Tensor:
    """An IG / occlusion reference image shaped like x.

    Args:
        baseline: 'black' (zeros), 'blur' (x blurred with a Gaussian of `blur_sigma` times the larger
            spatial size; Sturmfels et al. 2020, https://distill.pub/2020/attribution-baselines/), a number
            (a constant image), or a tensor broadcastable to x.
    """
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.detach().to(x).expand_as(x)
        except RuntimeError:
            from saliencylab.methods.options import OptionError

            raise OptionError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to the input's "
                              f"{tuple(x.shape)}; pass a tensor of the input's shape") from None
    if baseline == "black":
        return torch.zeros_like(x)
    if baseline == "blur":
        return gaussian_blur(x.detach(), blur_sigma * max(x.shape[2:]))
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, float(baseline))
    raise ValueError(f"unknown baseline {baseline!r}; use black, blur, a number or a tensor")


def _ig_consistency(options: Mapping[str, Any]) -> str | None:
    if options["rule"] == "riemann_trapezoid" and options["n_steps"] < 2:
        return f"rule=riemann_trapezoid needs n_steps >= 2 (got {options['n_steps']})"
    return None


@register_method("integrated_gradients", family="gradient",
                 paper="Sundararajan, Taly & Yan 2017, https://arxiv.org/abs/1703.01365", consistency=_ig_consistency)
def integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                         baseline: Baseline = "black", n_steps: Count = 32,
                         rule: Rule = "gausslegendre", batch_size: PassSize = None) -> torch.Tensor:
    """(x - x0) times the path integral of the gradient from baseline x0 to x, summed over channels.

    Args:
        baseline: see `make_baseline` ('black', 'blur', a number, a tensor).
        n_steps: quadrature points on the path.
        rule: 'gausslegendre' (exact for polynomial paths of degree < 2 n_steps) or a Riemann rule.
        batch_size: most samples per forward pass (None: chosen, see `_common.passes`).

    Returns:
        [B, *spatial], signed; its sum over pixels approximates f(x) - f(x0) (see `completeness_error`).
    """
    b = x.shape[0]
    x0 = make_baseline(x, baseline)
    delta = (x - x0).detach()
    alphas, weights = ig_alphas(n_steps, rule)
    shape = (-1,) + (1,) * x.ndim
    alphas, weights = alphas.to(x.device, x.dtype).view(shape), weights.to(x.device, x.dtype).view(shape)
    total = torch.zeros_like(x)
    with eval_mode(model):
        for start, stop in passes(n_steps, batch_size, b, x.device,
                                      key=(id(model), "integrated_gradients", tuple(x.shape), x.dtype)):
            n = stop - start
            points = (x0.unsqueeze(0) + alphas[start:stop] * delta.unsqueeze(0)).reshape(n * b, *x.shape[1:])
            grad = input_gradient(model, points, target.repeat(n)).reshape(n, *x.shape)
            total += (grad * weights[start:stop]).sum(0)
    return (total * delta).sum(dim=1)


def completeness_error(model: nn.Module, x: torch.Tensor, target: torch.Tensor, attribution: torch.Tensor,
                       baseline: Baseline = "black") -> torch.Tensor:
    """IG's completeness gap per image: sum(attribution) - (f(x) - f(x0)), in logit units. Shape [B]."""
    x0 = make_baseline(x, baseline)
    with eval_mode(model), torch.no_grad():
        gap = target_score(model(x), target) - target_score(model(x0), target)
    return attribution.flatten(1).sum(dim=1) - gap
