"""Issue 9's metric defects, each with a known answer that failed before the fix: NaN with a reason where a
metric is undefined, the pointing game's chance level and scaled tolerance, ROAD's 8-neighbour stencil,
relevance mass named for what it is, and string options that are checked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import LinearModel, TinyCNN
from saliencylab.methods.gradient import vanilla
from saliencylab.metrics.faithfulness import area, noisy_linear_fill, removal_curve
from saliencylab.metrics.localisation import (
    UndefinedMetric,
    absolute_mass,
    default_tolerance,
    mass_inside,
    mass_scores,
    otsu_iou,
    pointing_chance,
    pointing_game,
    pointing_scores,
    relevance_mass_positive,
)
from saliencylab.metrics.sanity import randomisation_check
from saliencylab.metrics.similarity import spearman, ssim
from saliencylab.metrics.stability import max_sensitivity, stability

# ---- undefined cases: NaN with a reason -------------------------------------------------------------------


def test_max_sensitivity_of_an_all_zero_map_is_nan_with_a_reason():
    model = LinearModel(torch.ones(2, 1, 8, 8))
    x = torch.full((2, 1, 8, 8), 0.5)
    t = torch.tensor([0, 1])

    def zeros(_m, xx, _t):
        return torch.zeros(xx.shape[0], 8, 8)

    with pytest.warns(UndefinedMetric, match="zero everywhere"):
        out = max_sensitivity(model, x, t, zeros)
    assert np.isnan(out).all()  # was 0.0

    def moving(_m, xx, _t):  # zero at x, not zero nearby: was ~3e13 (divided by a clamped zero norm)
        return (xx[:, 0] - 0.5).abs()

    with pytest.warns(UndefinedMetric, match="image\\(s\\) 0, 1"):
        out = max_sensitivity(model, x, t, moving, maps=torch.zeros(2, 8, 8))
    assert np.isnan(out).all()
    ok = max_sensitivity(model, x, t, lambda _m, xx, _t: xx[:, 0] + 1.0)  # a defined case stays finite
    assert np.isfinite(ok).all() and (ok > 0).all()


def test_ssim_and_spearman_of_constant_maps_are_nan_with_a_reason():
    a = np.random.default_rng(0).random((8, 8))
    with pytest.warns(UndefinedMetric, match="both maps are constant"):
        assert math.isnan(ssim(np.zeros((8, 8)), np.ones((8, 8))))  # was 1.0
    with pytest.warns(UndefinedMetric, match="the second map is constant"):
        assert math.isnan(ssim(a, np.zeros((8, 8))))
    with pytest.warns(UndefinedMetric, match="first map is constant"):
        assert math.isnan(spearman(np.zeros((8, 8)), a))
    with pytest.warns(UndefinedMetric, match="NaN everywhere"):
        assert math.isnan(spearman(a, np.full((8, 8), np.nan)))
    assert ssim(a, a) == pytest.approx(1.0)  # defined cases unchanged


def test_stability_of_all_zero_maps_is_nan_not_perfect():
    model = LinearModel(torch.ones(2, 1, 8, 8))
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UndefinedMetric):
        (row,) = stability(model, x, torch.tensor([1]), lambda _m, xx, _t: torch.zeros(len(xx), 8, 8))
    assert all(math.isnan(v) for v in row.values())


def test_localisation_undefined_cases():
    rng = np.random.default_rng(0)
    m = rng.random((8, 8))
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    with pytest.warns(UndefinedMetric, match="constant: it has no peak"):
        assert math.isnan(pointing_game(np.ones((8, 8)), mask))  # was 1.0: every pixel was a 'peak'
    for fn in (mass_inside, pointing_game, otsu_iou):
        nan_map = m.copy()
        nan_map[0, 0] = np.nan
        with pytest.warns(UndefinedMetric, match="1 non-finite"):
            assert math.isnan(fn(nan_map, mask))  # was scored as if the NaN were 0
        with pytest.warns(UndefinedMetric, match="NaN everywhere"):
            assert math.isnan(fn(np.full((8, 8), np.nan), mask))  # was 'zero everywhere'
    with pytest.warns(UndefinedMetric, match="no positive relevance"):
        assert math.isnan(relevance_mass_positive(-m, mask))
    assert mass_inside(np.ones((8, 8)), np.ones((8, 8), bool)) == 1.0  # a full mask is defined (chance 1)


def test_removal_curve_of_a_nan_map_is_nan():
    model = LinearModel(torch.ones(2, 1, 6, 6))
    x = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UndefinedMetric, match="NaN everywhere"):
        curve = removal_curve(model, x, torch.tensor(1), torch.full((6, 6), float("nan")), steps=3)
    assert curve.shape == (4,) and np.isnan(curve).all() and math.isnan(area(curve))


def test_sanity_with_constant_randomised_maps_has_nan_ssim_and_a_reasoned_verdict():
    """A method whose maps vanish once the model is random (dead ReLUs, as Grad-CAM's often do): SSIM is
    undefined (was reported as a number), the verdict says why it still passes."""
    model = TinyCNN(seed=3).eval()
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    t = torch.zeros(3, dtype=torch.long)
    reference = TinyCNN(seed=3).eval()

    def vanishing(m, xx, tt):
        same = all(torch.equal(p, q) for p, q in zip(m.parameters(), reference.parameters(), strict=True))
        return vanilla(m, xx, tt) if same else torch.zeros(len(xx), 12, 12)

    with pytest.warns(UndefinedMetric, match="second map is constant"):
        res = randomisation_check(model, x, t, vanishing)
    assert math.isnan(res["final"]["ssim"]) and res["final"]["constant_share"] == 1.0
    assert res["passed"] is True and "constant" in res["reason"]
    with pytest.warns(UndefinedMetric):  # maps constant from the start: no baseline, no verdict
        flat = randomisation_check(model, x, t, lambda _m, xx, _t: torch.zeros(len(xx), 12, 12))
    assert flat["passed"] is None and "baseline" in flat["reason"]
    ok = randomisation_check(model, x, t, vanilla)
    assert isinstance(ok["passed"], bool) and ok["reason"] is None  # a defined SSIM gives a verdict


# ---- pointing game: chance level and tolerance scaled with the image ---------------------------------------


def test_pointing_chance_known_values():
    mask = np.zeros((11, 11), bool)
    mask[5, 5] = True
    assert pointing_chance(mask, tolerance=0) == pytest.approx(1 / 121)
    assert pointing_chance(mask, tolerance=1) == pytest.approx(5 / 121)  # the pixel and its 4 direct neighbours
    assert pointing_chance(mask, tolerance=1.5) == pytest.approx(9 / 121)  # and the diagonals (sqrt 2)
    lungs = np.zeros((128, 128), bool)
    lungs[32:96, 32:96] = True  # a quarter of the image, as the phantoms' lungs
    # the case, 15 px at 128 px: the square, four 64 x 15 bands, four rounded corners (counted)
    corner = sum(1 for dx in range(1, 16) for dy in range(1, 16) if dx * dx + dy * dy <= 225)
    assert pointing_chance(lungs, tolerance=15) == pytest.approx((64 * 64 + 4 * 64 * 15 + 4 * corner) / 128**2)
    assert pointing_chance(lungs, tolerance=15) > 0.5  # why a hit alone says little


def test_pointing_tolerance_scales_with_the_image():
    assert default_tolerance((224, 224)) == pytest.approx(15.0)
    assert default_tolerance((64, 64)) == pytest.approx(15 * 64 / 224)
    assert default_tolerance((448, 448)) == pytest.approx(30.0)
    mask = np.zeros((64, 64), bool)
    mask[:, :20] = True
    m = np.zeros((64, 64))
    m[30, 24] = 1.0  # 5 px right of the mask (last column 19): beyond 4.3 px, within the old fixed 15 px
    assert pointing_game(m, mask) == 0.0
    assert pointing_game(m, mask, tolerance=15) == 1.0  # the explicit override is kept
    m2 = np.zeros((64, 64))
    m2[30, 23] = 1.0  # 4 px away: a hit
    s = pointing_scores(m2, mask)
    assert s == {"hit": 1.0, "chance": pytest.approx(24 / 64), "tolerance": pytest.approx(15 * 64 / 224)}


def test_pointing_ties_count_as_the_expected_hit():
    mask = np.zeros((10, 10), bool)
    mask[0, 0] = True
    m = np.zeros((10, 10))
    m[0, 0] = m[9, 9] = 1.0  # two equal peaks, one on the mask
    assert pointing_game(m, mask, tolerance=0) == 0.5


# ---- ROAD: Rong et al.'s 8-neighbour stencil --------------------------------------------------------------


def test_noisy_linear_fill_uses_the_8_neighbour_stencil_for_one_pixel():
    x = torch.arange(9, dtype=torch.float64).view(1, 3, 3) ** 2  # not harmonic: the stencil matters
    removed = torch.zeros(3, 3, dtype=torch.bool)
    removed[1, 1] = True
    v = x[0]
    direct = v[0, 1] + v[2, 1] + v[1, 0] + v[1, 2]
    diagonal = v[0, 0] + v[0, 2] + v[2, 0] + v[2, 2]
    out = noisy_linear_fill(x, removed, noise=0.0)
    assert float(out[0, 1, 1]) == pytest.approx(float(direct / 6 + diagonal / 12))  # 4-neighbour mean: 16.0
    corner = torch.zeros(3, 3, dtype=torch.bool)
    corner[0, 0] = True  # at the border: a weighted mean of the 3 neighbours that exist
    out = noisy_linear_fill(x, corner, noise=0.0)
    assert float(out[0, 0, 0]) == pytest.approx(float((v[0, 1] / 6 + v[1, 0] / 6 + v[1, 1] / 12) / (5 / 12)))


def test_noisy_linear_fill_solves_the_joint_system_by_hand():
    """Two adjacent removed pixels a = (1,1), b = (1,2) in a 3x4 image; each is the weighted mean of its 8
    neighbours, the other one included: a = (Ka + b/6), b = (Kb + a/6), solved by hand."""
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0], [3.0, 0.0, 0.0, 5.0], [7.0, 6.0, 9.0, 1.0]], dtype=torch.float64)[None]
    removed = torch.zeros(3, 4, dtype=torch.bool)
    removed[1, 1] = removed[1, 2] = True
    ka = (2 + 3 + 6) / 6 + (1 + 4 + 7 + 9) / 12  # a's known direct: up, left, down; diagonals
    kb = (4 + 5 + 9) / 6 + (2 + 8 + 6 + 1) / 12
    a = (ka + kb / 6) / (1 - 1 / 36)
    b = kb + a / 6
    out = noisy_linear_fill(x, removed, noise=0.0)
    assert float(out[0, 1, 1]) == pytest.approx(a, rel=1e-12) and float(out[0, 1, 2]) == pytest.approx(b, rel=1e-12)
    torch.testing.assert_close(out[:, ~removed], x[:, ~removed])
    noisy = noisy_linear_fill(x, removed, noise=0.5, seed=3)
    rng = np.random.default_rng(3)  # the noise is seeded and lands on the removed pixels only
    np.testing.assert_allclose(noisy[0, 1, 1:3].numpy() - [a, b], rng.normal(0, 0.5, (2, 1))[:, 0], rtol=1e-9)
    torch.testing.assert_close(noisy, noisy_linear_fill(x, removed, noise=0.5, seed=3))


def test_noisy_linear_fill_of_everything_is_the_mean():
    x = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = noisy_linear_fill(x, torch.ones(5, 5, dtype=torch.bool), noise=0.0)
    torch.testing.assert_close(out, x.mean((1, 2), keepdim=True).expand_as(x))


# ---- relevance mass: each variant named for what it is ----------------------------------------------------


def test_relevance_mass_variants_on_a_signed_map():
    m = np.array([[2.0, -1.0], [-3.0, 1.0]])
    top = np.array([[True, True], [False, False]])
    assert relevance_mass_positive(m, top) == pytest.approx(2 / 3)  # Arras et al.: positive in / positive
    assert absolute_mass(m, top) == pytest.approx(3 / 7)
    assert mass_inside(m, top) == absolute_mass(m, top)  # the old default, unchanged
    s = mass_scores(m, top)
    assert s == {"positive": pytest.approx(2 / 3), "absolute": pytest.approx(3 / 7), "chance": 0.5, "signed": True}
    u = np.abs(m)
    su = mass_scores(u, top)
    assert su["positive"] == su["absolute"] and su["signed"] is False


# ---- string options are checked ---------------------------------------------------------------------------


def test_string_options_are_validated():
    model = LinearModel(torch.ones(2, 1, 6, 6))
    x = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(0))
    sal = torch.rand(6, 6, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(1)
    with pytest.raises(ValueError, match="mode must be one of 'deletion', 'insertion'; got 'delete'"):
        removal_curve(model, x, t, sal, mode="delete")  # was silently an insertion curve
    with pytest.raises(ValueError, match="fill must be one of 'blur', 'noisy_linear'"):
        removal_curve(model, x, t, sal, fill="zeros")
    with pytest.raises(ValueError, match="order must be one of 'morf', 'lerf'"):
        removal_curve(model, x, t, sal, order="MoRF")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        removal_curve(model, x, t, sal, steps=0)
    mask = np.ones((6, 6), bool)
    for fn in (mass_inside, pointing_game, otsu_iou):
        with pytest.raises(ValueError, match="sign must be one of 'abs', 'positive'; got 'absolute'"):
            fn(sal.numpy(), mask, sign="absolute")
    tiny = TinyCNN().eval()
    xs = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mode must be one of 'cascading', 'independent'"):
        randomisation_check(tiny, xs, torch.tensor([0, 1]), vanilla, mode="cascade")
    with pytest.raises(ValueError, match="order must be one of 'top_down', 'bottom_up'"):
        randomisation_check(tiny, xs, torch.tensor([0, 1]), vanilla, order="down")


def test_option_errors_are_user_errors_for_the_cli():
    from saliencylab.errors import UserError

    with pytest.raises(UserError):
        mass_inside(np.ones((2, 2)), np.ones((2, 2), bool), sign="signed")


def test_bottom_up_randomises_from_the_input_layer():
    model = TinyCNN(seed=3).eval()
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    res = randomisation_check(model, x, torch.zeros(3, dtype=torch.long), vanilla, order="bottom_up")
    assert [s["layer"] for s in res["steps"]] == ["conv1", "conv2", "fc"]


def test_stability_shift_larger_than_the_image_is_refused():
    model = LinearModel(torch.ones(2, 1, 6, 6))
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shift must be below half the image side"):
        stability(model, x, torch.tensor([1]), vanilla, shift=3)  # nothing left to compare


def test_randomisation_leaves_integer_parameters_alone_and_skips_their_layers():
    """A layer whose only parameter is an integer state (Keras keeps a dropout seed that way) is not a
    weight: it is not listed as a layer to randomise and randomising its neighbours does not touch it."""
    from saliencylab.metrics.sanity import parameter_layers, randomise

    class Seeded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.state = torch.nn.Parameter(torch.tensor([7, 11], dtype=torch.int64), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = torch.nn.Sequential(TinyCNN(), Seeded()).eval()
    assert "1" not in parameter_layers(model) and "0.conv1" in parameter_layers(model)
    randomise(model[1], 0)  # no reset_parameters: the scaled-normal path, which used to call std() on ints
    assert model[1].state.tolist() == [7, 11]
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    res = randomisation_check(model, x, torch.tensor([0, 1]), vanilla)
    assert [s["layer"] for s in res["steps"]][0] != "1" and res["passed"] is not None
