"""Explanation metrics with known answers: localisation, faithfulness, randomisation, stability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import LinearModel, TinyCNN, edge_detector
from saliencylab.methods.gradient import vanilla
from saliencylab.metrics.faithfulness import area, noisy_linear_fill, removal_curve
from saliencylab.metrics.localisation import (
    UndefinedMetric,
    border_mask,
    box_mask,
    mass_inside,
    otsu_iou,
    pointing_game,
)
from saliencylab.metrics.sanity import randomisation_check
from saliencylab.metrics.similarity import spearman, ssim
from saliencylab.metrics.stability import max_sensitivity, stability


class RegionReader(nn.Module):
    """Two logits that depend only on the top-left 8x8 quadrant of a 16x16 image."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 64).view(1, 1, 8, 8))

    def forward(self, x):
        s = (x[:, :, :8, :8] * self.w).sum((1, 2, 3))
        return torch.stack([-s, s], 1)


def test_region_reader_gives_full_mass_and_hits_on_its_region():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m = vanilla(RegionReader(), x, torch.tensor([1]))[0].numpy()
    tl, br = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    tl[:8, :8], br[8:, 8:] = True, True
    assert mass_inside(m, tl) == pytest.approx(1.0)
    assert mass_inside(m, br) == pytest.approx(0.0)
    assert pointing_game(m, tl, tolerance=0) == 1.0
    assert pointing_game(m, br, tolerance=0) == 0.0
    assert pointing_game(m, br, tolerance=15) == 1.0  # 15 pixels reach across a 16-pixel image
    assert otsu_iou(m, tl) > 0.3 and otsu_iou(m, br) == 0.0


def test_undefined_cases_are_nan_with_a_reason():
    m = np.random.default_rng(0).random((8, 8))
    empty = np.zeros((8, 8), bool)
    for fn in (mass_inside, pointing_game, otsu_iou):
        with pytest.warns(UndefinedMetric, match="empty"):
            assert math.isnan(fn(m, empty))
    with pytest.warns(UndefinedMetric, match="zero everywhere"):
        assert math.isnan(mass_inside(np.zeros((8, 8)), ~empty))
    with pytest.raises(ValueError, match="resize the mask"):
        mass_inside(m, np.ones((4, 4), bool))


def test_border_and_box_masks():
    b = border_mask((20, 20), 0.1)
    assert b.sum() == 20 * 20 - 16 * 16
    assert box_mask((10, 10), (2, 3, 5, 6)).sum() == 9 and box_mask((10, 10), (2, 3, 5, 6), pad=1).sum() == 25


def test_true_relevance_beats_a_random_map_on_deletion_and_insertion():
    g = torch.Generator().manual_seed(0)
    model = LinearModel(torch.randn(2, 1, 12, 12, generator=g) * 0.3)
    x = torch.rand(1, 12, 12, generator=g)
    t = torch.tensor(1)
    for fill in ("blur", "noisy_linear"):
        from saliencylab.ops import gaussian_blur

        ref = gaussian_blur(x[None], 0.05 * 12)[0] if fill == "blur" else torch.full_like(x, float(x.mean()))
        true = (model.w.detach()[1] * (x - ref))[0]  # each pixel's contribution against the fill
        rand = torch.rand(12, 12, generator=g)
        del_true = area(removal_curve(model, x, t, true, mode="deletion", fill=fill, steps=12))
        del_rand = area(removal_curve(model, x, t, rand, mode="deletion", fill=fill, steps=12))
        ins_true = area(removal_curve(model, x, t, true, mode="insertion", fill=fill, steps=12))
        ins_rand = area(removal_curve(model, x, t, rand, mode="insertion", fill=fill, steps=12))
        assert del_true < del_rand and ins_true > ins_rand, fill
        lerf = area(removal_curve(model, x, t, true, mode="deletion", fill=fill, order="lerf", steps=12))
        assert lerf > del_true  # removing the least relevant first hurts least


def test_noisy_linear_fill_interpolates():
    x = torch.linspace(0, 1, 10).view(1, 1, 10).repeat(1, 10, 1)  # a horizontal ramp
    removed = torch.zeros(10, 10, dtype=torch.bool)
    removed[3:7, 3:7] = True
    out = noisy_linear_fill(x, removed, noise=0.0)
    torch.testing.assert_close(out[0, 3:7, 3:7], x[0, 3:7, 3:7], atol=1e-6, rtol=0)  # harmonic = linear
    torch.testing.assert_close(out[:, ~removed], x[:, ~removed])


@pytest.fixture(scope="module")
def blobs():
    """Images with one bright blob each, at different places: structured, and unrelated to each other."""
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    centres = [(5, 5), (18, 6), (6, 17), (17, 18), (12, 12), (4, 12)]
    imgs = [torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12) for cy, cx in centres]
    return torch.stack(imgs)[:, None].repeat(1, 3, 1, 1) * 0.8 + 0.1


def test_randomisation_vanilla_passesedge_detector_fails(blobs):
    model = TinyCNN(seed=3).eval()
    t = torch.zeros(len(blobs), dtype=torch.long)
    edge = randomisation_check(model, blobs, t, edge_detector)
    assert edge["final"]["ssim"] == pytest.approx(1.0) and edge["passed"] is False
    van = randomisation_check(model, blobs, t, vanilla)
    assert van["passed"] is True and van["final"]["ssim"] < edge["final"]["ssim"]
    assert [s["layer"] for s in van["steps"]] == ["fc", "conv2", "conv1"]  # from the output down
    ind = randomisation_check(model, blobs, t, vanilla, mode="independent")
    assert ind["passed"] is None and len(ind["steps"]) == 3
    # the model itself is untouched: one copy was randomised
    torch.testing.assert_close(vanilla(model, blobs, t), vanilla(TinyCNN(seed=3).eval(), blobs, t))


def test_similarity_identities():
    a = np.random.default_rng(0).random((16, 16))
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, 3 * a + 1) == pytest.approx(1.0)  # rank-based
    assert ssim(a, a) == pytest.approx(1.0) and ssim(a, np.random.default_rng(1).random((16, 16))) < 0.3
    with pytest.warns(UndefinedMetric, match="constant"):
        assert math.isnan(spearman(np.ones(4), a.ravel()[:4]))


class HalfSquare(nn.Module):
    """logits = [-s, s] with s = sum(w * x^2) / 2: the input gradient is w * x, so the vanilla map moves with
    the input by a known amount (|w * (x + d)| under a perturbation d)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)  # (1, H, W), > 0

    def forward(self, x):
        s = 0.5 * (self.w * x**2).sum((1, 2, 3))
        return torch.stack([-s, s], 1)


def test_stability_follows_a_map_that_moves_with_the_input():
    """A quadratic model's vanilla map is w * x: every number has a closed form given the seeded draws."""
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    w = torch.rand(1, 16, 16, generator=g, dtype=torch.float64) + 0.5
    model = HalfSquare(w)
    x = torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64) * 0.5 + 0.25  # noise never hits the clamp
    t = torch.tensor([1, 1])
    base = (w * x)[:, 0].numpy()

    radius, n = 0.05, 5
    gen = torch.Generator().manual_seed(7)
    expected = np.zeros(2)
    for _ in range(n):  # the same draws as max_sensitivity: the map moves by w * d exactly
        d = ((torch.rand(x.shape, generator=gen) * 2 - 1) * radius).double()
        ratio = ((w * d)[:, 0].flatten(1).norm(dim=1) / (w * x)[:, 0].flatten(1).norm(dim=1)).numpy()
        expected = np.maximum(expected, ratio)
    got = max_sensitivity(model, x, t, vanilla, radius=radius, n_samples=n, seed=7)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert (got > 0.02).all()  # clearly not the 0 a map that ignores the input would give

    noise, shift = 0.05, 2
    rows = stability(model, x, t, vanilla, noise=noise, shift=shift, seed=3)
    gen = torch.Generator().manual_seed(3)
    noisy = (w * (x + noise * torch.randn(x.shape, generator=gen).double()).clamp(0, 1))[:, 0].numpy()
    moved = (torch.roll(w, (-shift, -shift), (-2, -1)) * x)[:, 0].numpy()  # map of the shifted image, shifted back
    crop = (slice(shift, -shift), slice(shift, -shift))
    for i, row in enumerate(rows):
        assert row["noise_spearman"] == pytest.approx(spearmanr(base[i].ravel(), noisy[i].ravel())[0], abs=1e-6)
        assert row["noise_ssim"] == pytest.approx(ssim(base[i], noisy[i]), abs=1e-6)  # maps kept in float32
        assert row["shift_spearman"] == pytest.approx(
            spearmanr(base[i][crop].ravel(), moved[i][crop].ravel())[0], abs=1e-6)
        assert row["noise_spearman"] < 0.99 and row["shift_spearman"] < 0.9  # the maps did move
