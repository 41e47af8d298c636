"""Samplers for the sampling methods: i.i.d., antithetic and scrambled-Sobol draws, one sample per `next`.

Every sampler keeps the invariants of `normal_draws`: draws come from the CPU, seeded, in sample order, so
the k-th sample is the same however a caller groups the draws into passes and on every device.

- `iid`: independent draws (the default).
- `antithetic`: draw 2j is an independent draw z_j, draw 2j+1 its mirror (-z_j for normal noise, 1 - u for
  uniforms); each draw on its own has the i.i.d. distribution, so the mean is unbiased
  (Hammersley & Morton 1956).
- `sobol`: scrambled Sobol points (`torch.quasirandom.SobolEngine`, `scramble=True`, seeded; Owen 1995,
  Joe & Kuo 2008 direction numbers), through the inverse normal CDF for noise. torch's engine has at most
  21,201 dimensions, so a larger sample (3 x 224 x 224 = 150,528 numbers) is cut into blocks of at most
  21,201 coordinates, each its own scrambled engine with its own seed. Each point of a scrambled net is
  uniform on its cube and the blocks' scrambles are independent, so every single draw has exactly the
  i.i.d. distribution (the mean stays unbiased for any model); what the blocks give up is the joint
  structure between coordinates of different blocks, not the per-coordinate stratification. Scrambling
  costs about 80 us per coordinate once per call (about 12 s for a 224 px RGB image on a loaded 2-core
  machine, measured). A low-resolution
  Sobol grid upsampled to the image was rejected: it changes the noise's distribution (smoother, lower
  per-pixel variance), so its mean map is not the i.i.d. map.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch

from saliencylab.methods._common import normal_draws

Sampler = Literal["iid", "antithetic", "sobol"]
SAMPLERS: tuple[str, ...] = ("iid", "antithetic", "sobol")
SOBOL_MAX_DIM = 21201  # torch.quasirandom.SobolEngine.MAXDIM
_EPS = 2.0 ** -31  # keeps Sobol uniforms inside (0, 1) before the inverse normal CDF


def _block_seed(seed: int, block: int) -> int:
    """A distinct, reproducible seed per block of Sobol coordinates."""
    return (int(seed) * 1_000_003 + block * 7919) % (2 ** 63 - 1)


def sobol_uniforms(seed: int, dim: int) -> Iterator[torch.Tensor]:
    """Scrambled Sobol points in (0, 1)^dim, float64 [dim], one per `next`, in sequence order.

    Dimensions beyond torch's 21,201 come from further independently scrambled engines (see the module).
    """
    from torch.quasirandom import SobolEngine

    sizes = [min(SOBOL_MAX_DIM, dim - lo) for lo in range(0, dim, SOBOL_MAX_DIM)]
    engines = [SobolEngine(n, scramble=True, seed=_block_seed(seed, i)) for i, n in enumerate(sizes)]
    while True:
        u = torch.cat([e.draw(1, dtype=torch.float64)[0] for e in engines])
        yield u.clamp(_EPS, 1.0 - _EPS)


def noise_draws(sampler: Sampler, seed: int, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """Standard normal float32 tensors of `shape`, one per `next`, by the named sampler (see the module).

    'iid' is exactly `normal_draws(seed, shape)`; 'antithetic' pairs each of its draws with the negation;
    'sobol' maps scrambled Sobol points through the inverse normal CDF (`torch.special.ndtri`).
    """
    if sampler == "iid":
        yield from normal_draws(seed, shape)
    elif sampler == "antithetic":
        for z in normal_draws(seed, shape):
            yield z
            yield -z
    elif sampler == "sobol":
        for u in sobol_uniforms(seed, math.prod(shape)):
            yield torch.special.ndtri(u).to(torch.float32).view(shape)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")


def uniform_draws(sampler: Sampler, seed: int, dim: int) -> Iterator[torch.Tensor]:
    """Uniform float64 tensors [dim] in [0, 1), one per `next` (RISE's cells and shifts).

    'iid': a CPU generator seeded with `seed`; 'antithetic': u then 1 - u; 'sobol': scrambled Sobol points.
    """
    if sampler == "sobol":
        yield from sobol_uniforms(seed, dim)
        return
    if sampler not in ("iid", "antithetic"):
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    while True:
        u = torch.rand(dim, generator=gen, dtype=torch.float64)
        yield u
        if sampler == "antithetic":
            yield (1.0 - u).clamp(max=1.0 - _EPS)
