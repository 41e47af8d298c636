"""Samplers for SmoothGrad and RISE: unbiased, variance-reducing where the math says so, invariant to pass size.

The known answer: for the cubic score f(x) = sum_i w_i x_i^3 the gradient is 3 w_i x_i^2, so SmoothGrad's
expectation per pixel is E|3 w_i (x_i + s z)^2| = 3 |w_i| (x_i^2 + s^2), and the variance of one sample's
|gradient| is (3 w_i)^2 (4 x_i^2 s^2 + 2 s^4). Antithetic pairs average to 3 |w_i| (x_i^2 + s^2 z^2): the
linear term cancels, leaving (3 w_i)^2 2 s^4 per pair, i.e. a variance ratio to i.i.d. (same samples) of
2 s^2 / (2 x_i^2 + s^2).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from saliencylab.methods import get_method
from saliencylab.methods.gradient import smoothgrad_sums
from saliencylab.methods.options import OptionError
from saliencylab.methods.perturbation import rise_sums
from saliencylab.methods.sampling import SOBOL_MAX_DIM, noise_draws, sobol_uniforms, uniform_draws

SAMPLERS = ("iid", "antithetic", "sobol")


class Cubic(nn.Module):
    """f(x) = sum_i w_i x_i^3 as the only logit (K = 1; target 1 is the logit itself)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x ** 3).flatten(1).sum(1, keepdim=True)


class Linear(nn.Module):
    """One logit, linear in the pixels (RISE's probability is its sigmoid)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).flatten(1).sum(1, keepdim=True)


def _cubic_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # range 1: the noise std is noise_level
    w = torch.randn(1, 4, 4, generator=g, dtype=torch.float64)
    return Cubic(w), x, torch.ones(1, dtype=torch.long), 0.3


@functools.cache
def _seed_maps(sampler: str, seeds: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model, x, t, s = _cubic_case()
    fn = get_method("smoothgrad").fn
    maps = torch.stack([fn(model, x, t, n_samples=n, noise_level=s, seed=k, sampler=sampler)[0]
                        for k in range(seeds)])  # (seeds, 4, 4)
    return maps, x[0, 0], model.w[0]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_smoothgrad_sampler_is_unbiased_against_the_closed_form(sampler):
    maps, x, w = _seed_maps(sampler, 200, 4)
    s = 0.3
    expected = 3 * w.abs() * (x ** 2 + s ** 2)
    one_sample_sd = 3 * w.abs() * torch.sqrt(4 * x ** 2 * s ** 2 + 2 * s ** 4)
    se = one_sample_sd / (4 * 200) ** 0.5  # the i.i.d. standard error bounds the others' (they reduce variance)
    z = (maps.mean(0) - expected) / se
    assert z.abs().max() < 4.5, f"{sampler}: largest deviation {z.abs().max():.2f} standard errors"


def test_antithetic_and_sobol_reduce_smoothgrad_variance_as_predicted():
    s = 0.3
    iid, x, w = _seed_maps("iid", 200, 4)
    anti, _, _ = _seed_maps("antithetic", 200, 4)
    sobol, _, _ = _seed_maps("sobol", 200, 4)
    predicted_iid = (3 * w) ** 2 * (4 * x ** 2 * s ** 2 + 2 * s ** 4) / 4  # per pixel, 4 samples
    predicted_anti = (3 * w) ** 2 * 2 * s ** 4 / 2  # 2 pairs
    # pooled over the 16 pixels: measured / predicted variance within sampling error (200 seeds: about 10%)
    ratio_iid = (iid.var(0) / predicted_iid).mean()
    ratio_anti = (anti.var(0) / predicted_anti).mean()
    assert 0.8 < ratio_iid < 1.2 and 0.8 < ratio_anti < 1.2, (ratio_iid, ratio_anti)
    # the closed-form gain over i.i.d. noise, pooled over this image's pixels: 0.291; measured 0.296
    gain = predicted_anti.sum() / predicted_iid.sum()
    assert abs(gain - 0.291) < 0.001
    measured = anti.var(0).sum() / iid.var(0).sum()
    assert abs(measured / gain - 1) < 0.2, measured
    # scrambled Sobol stratifies each pixel's noise: below i.i.d. too (measured 0.23)
    assert sobol.var(0).sum() / iid.var(0).sum() < 0.4


@pytest.mark.parametrize("sampler", ("antithetic", "sobol"))
def test_rise_sampler_mean_matches_iid_mean(sampler):
    g = torch.Generator().manual_seed(1)
    model = Linear(torch.randn(1, 8, 8, generator=g, dtype=torch.float64) * 0.5)
    x = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.ones(1, dtype=torch.long)
    fn = get_method("rise").fn

    def maps(name: str) -> torch.Tensor:
        return torch.stack([fn(model, x, t, n_masks=8, grid=2, seed=k, sampler=name)[0] for k in range(120)])

    iid, other = maps("iid"), maps(sampler)
    se = torch.sqrt(iid.var(0) / 120 + other.var(0) / 120)
    z = (other.mean(0) - iid.mean(0)) / se
    assert z.abs().max() < 4.5, f"{sampler}: {z.abs().max():.2f} standard errors from the i.i.d. mean"
    # both reduce the spread of the map around its mean on this model (measured: antithetic 0.074 with
    # complementary pairs, 0.19 when the mirror also mirrored the shift; sobol 0.26)
    assert other.var(0).sum() / iid.var(0).sum() < (0.12 if sampler == "antithetic" else 0.4)


class Constant(nn.Module):
    """K equal logits whatever the input: RISE's probability is 1 / K under every mask."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.k)


@pytest.mark.parametrize("shape,grid", [((1, 1, 10, 13), 3), ((2, 2, 17), 4), ((1, 1, 5, 6, 7), 2)])
def test_antithetic_rise_pairs_are_complements_so_coverage_noise_cancels(shape, grid):
    # with p_keep 0.5 a mirror mask is 1 - its partner (cells 1 - u, same shift), so on a score that ignores
    # the input the map is exactly the probability / p_keep * 1/2 = 1/K at every pixel; i.i.d. masks are not
    x = torch.rand(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.zeros(shape[0], dtype=torch.long)
    fn = get_method("rise").fn
    anti = fn(Constant(4), x, t, n_masks=6, grid=grid, seed=3, sampler="antithetic")
    torch.testing.assert_close(anti, torch.full_like(anti, 0.25), rtol=0, atol=1e-12)
    iid = fn(Constant(4), x, t, n_masks=6, grid=grid, seed=3, sampler="iid")
    assert float(iid.std()) > 0.02, float(iid.std())  # coverage noise: how often each pixel was kept
    # antithetic is RISE's default (benchmarks/bench_samplers.py: at most half of i.i.d.'s masks for the same map)
    torch.testing.assert_close(fn(Constant(4), x, t, n_masks=6, grid=grid, seed=3), anti, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_do_not_depend_on_the_pass_size(sampler):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 8, 8, generator=g)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 3))
    t = torch.tensor([0, 2])
    sg, rise = get_method("smoothgrad").fn, get_method("rise").fn
    ref = sg(model, x, t, n_samples=6, sampler=sampler)
    for bs in (1, 4, 12):
        torch.testing.assert_close(sg(model, x, t, n_samples=6, sampler=sampler, batch_size=bs), ref)
    ref = rise(model, x, t, n_masks=6, grid=3, sampler=sampler)
    for bs in (1, 4, 12):
        torch.testing.assert_close(rise(model, x, t, n_masks=6, grid=3, sampler=sampler, batch_size=bs), ref)
    # the k-th sample does not depend on how many follow: 4 samples are the first share of 8
    first = smoothgrad_sums(model, x, t, n_samples=8, parts=2, sampler=sampler)[0]
    torch.testing.assert_close((first / 4).amax(1), sg(model, x, t, n_samples=4, sampler=sampler))
    if sampler != "iid":  # i.i.d. RISE draws every cell, then every shift (the maps of earlier versions)
        first = rise_sums(model, x, t, n_masks=8, grid=3, parts=2, sampler=sampler)[0]
        torch.testing.assert_close(first / (4 * 0.5), rise(model, x, t, n_masks=4, grid=3, sampler=sampler))


def test_antithetic_pairs_and_iid_default_are_what_they_say():
    iid = noise_draws("iid", 5, (2, 3))
    anti = noise_draws("antithetic", 5, (2, 3))
    a, b, c = next(iid), next(iid), next(anti)
    torch.testing.assert_close(c, a)
    torch.testing.assert_close(next(anti), -a)
    torch.testing.assert_close(next(anti), b)
    u = uniform_draws("antithetic", 2, 5)
    first = next(u)
    torch.testing.assert_close(next(u), 1 - first)


def test_sobol_beyond_torch_dimension_limit_is_stratified_in_every_coordinate():
    dim = SOBOL_MAX_DIM + 40
    draws = sobol_uniforms(7, dim)
    u = torch.stack([next(draws) for _ in range(8)])  # (8, dim)
    assert u.shape == (8, dim) and float(u.min()) > 0 and float(u.max()) < 1
    # a scrambled Sobol sequence puts its first 8 points one in each eighth of every coordinate, in both blocks
    cells = (u * 8).floor().sort(dim=0).values
    assert torch.equal(cells, torch.arange(8, dtype=cells.dtype).view(8, 1).expand(8, dim))
    # the two blocks are scrambled independently: no coordinate of the second repeats one of the first
    assert not torch.equal(u[:, :40], u[:, SOBOL_MAX_DIM:])
    z = next(noise_draws("sobol", 7, (2, 3, 5)))
    assert z.dtype == torch.float32 and z.shape == (2, 3, 5)


def test_sampler_option_is_checked():
    spec = get_method("smoothgrad")
    assert spec.parse_option("sampler", "sobol") == "sobol"
    assert spec.describe_options()["sampler"]["choices"] == ["iid", "antithetic", "sobol"]
    with pytest.raises(OptionError, match="sampler"):
        spec.parse_option("sampler", "halton")
    with pytest.raises(OptionError, match="sampler"):
        get_method("rise").fn(nn.Identity(), torch.rand(1, 1, 4, 4), torch.zeros(1, dtype=torch.long),
                              sampler="lhs")
