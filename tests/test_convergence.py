"""Convergence checks: IG's step adaptation against a closed form, half-split checks for SmoothGrad and RISE.

The closed form: f(x) = sum_i (x_i + x_i^2) with a black baseline. Along the path a x, the gradient is
1 + 2 a x_i; the left Riemann rule with n steps integrates the linear part exactly and the quadratic part
to (1 - 1/n) sum x_i^2, so the completeness error is -sum x^2 / n and its share of the logit gap
sum x + sum x^2 is sum x^2 / (n (sum x + sum x^2)). For an image with every pixel at v: v / (n (1 + v)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from saliencylab.methods import get_method
from saliencylab.methods.convergence import Checked, ConvergenceRule, checked_map, samples_for, spearman_brown


class LinearPlusSquare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + x ** 2).flatten(1).sum(1, keepdim=True)


@dataclass(frozen=True)
class IgCase:
    """IG of `LinearPlusSquare` on two images with the left Riemann rule from 2 steps: image 'bright' at v = 1
    (share 1 / (2 n)), image 'dim' at v = 0.1 (share 1 / (11 n)); target class index 1 (the single output)."""

    x: torch.Tensor
    target: torch.Tensor
    options: dict
    names: tuple[str, ...] = ("bright", "dim")

    def checked(self, convergence: ConvergenceRule = ConvergenceRule(), **options) -> Checked:
        """`checked_map` of IG on the case under the `convergence` rule, with `options` over the case's."""
        return checked_map(get_method("integrated_gradients"), LinearPlusSquare(), self.x, self.target,
                           {**self.options, **options}, convergence, names=list(self.names))

    def plain(self, rows: slice = slice(None), **options) -> torch.Tensor:
        """The plain IG map of the images in `rows`, with `options` over the case's."""
        return get_method("integrated_gradients").fn(LinearPlusSquare(), self.x[rows], self.target[rows],
                                                     **{**self.options, **options})


@pytest.fixture
def ig_case() -> IgCase:
    x = torch.stack([torch.full((1, 3, 3), 1.0), torch.full((1, 3, 3), 0.1)]).double()
    return IgCase(x, torch.ones(2, dtype=torch.long), {"n_steps": 2, "rule": "riemann_left"})


def test_ig_steps_adapt_per_image_as_the_closed_form_says(ig_case):
    out = ig_case.checked(ConvergenceRule(tolerance=0.05, cap=256))
    # v = 1: 1/(2n) <= 5% first at n = 16 (2 -> 4 -> 8 -> 16); v = 0.1: 1/(11 n) = 4.5% already at n = 2
    assert [r["n_steps"] for r in out.per_image] == [16, 2]
    assert [r["adapted"] for r in out.per_image] == [True, False]
    assert out.per_image[0]["completeness_share"] == pytest.approx(1 / 32, rel=1e-6)
    assert out.per_image[1]["completeness_share"] == pytest.approx(1 / 22, rel=1e-6)
    assert out.per_image[0]["logit_gap"] == pytest.approx(18.0) and out.per_image[1]["logit_gap"] == pytest.approx(0.99)
    assert out.per_image[0]["completeness_error"] == pytest.approx(-9 / 16)
    assert out.warnings == []
    # each image's map is the plain IG map at the steps it used
    torch.testing.assert_close(out.map[:1], ig_case.plain(slice(0, 1), n_steps=16))
    torch.testing.assert_close(out.map[1:], ig_case.plain(slice(1, 2)))


def test_ig_cap_and_adaptation_off_warn_with_the_fix(ig_case):
    capped = ig_case.checked(ConvergenceRule(tolerance=0.05, cap=8))
    assert [r["n_steps"] for r in capped.per_image] == [8, 2]
    assert capped.per_image[0]["completeness_share"] == pytest.approx(1 / 16)
    assert capped.warnings == ["bright: integrated_gradients completeness error is 6% of the logit gap after 8 "
                               "steps (tolerance 5%); try --set integrated_gradients.n_steps=16"]
    off = ig_case.checked(ConvergenceRule(adapt=False))
    assert [r["n_steps"] for r in off.per_image] == [2, 2]
    assert off.per_image[0]["completeness_share"] == pytest.approx(1 / 4)
    assert len(off.warnings) == 1 and off.warnings[0].startswith("bright: integrated_gradients completeness error "
                                                                 "is 25% of the logit gap after 2 steps")
    assert "--set integrated_gradients.n_steps=8 (or leave step adaptation on)" in off.warnings[0]
    torch.testing.assert_close(off.map, ig_case.plain())


def test_gauss_legendre_is_exact_on_the_quadratic_and_never_adapts(ig_case):
    out = ig_case.checked(n_steps=1, rule="gausslegendre")
    assert [r["n_steps"] for r in out.per_image] == [1, 1]
    assert max(r["completeness_share"] for r in out.per_image) < 1e-12


@pytest.mark.parametrize(("name", "opts"), [("smoothgrad", {"n_samples": 6, "noise_level": 0.3}),
                                            ("rise", {"n_masks": 10, "grid": 3})])
def test_split_half_map_is_the_method_map(name, opts):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 64, 2))
    x, t = torch.rand(2, 1, 8, 8, generator=g), torch.tensor([0, 1])
    out = checked_map(get_method(name), model, x, t, opts)
    torch.testing.assert_close(out.map, get_method(name).fn(model, x, t, **opts))
    count = "n_samples" if name == "smoothgrad" else "n_masks"
    assert [r[count] for r in out.per_image] == [opts[count]] * 2
    for r in out.per_image:  # every image's record, and the warning of each image that has one
        assert r["agreement_estimate"] == pytest.approx(spearman_brown(r["split_half_spearman"]))
        assert r["converged"] == (r["agreement_estimate"] >= 0.95) == ("warning" not in r)
    assert out.warnings == [r["warning"] for r in out.per_image if "warning" in r]
    assert all(f"try --set {name}.{count}=" in w for w in out.warnings)


def test_smoothgrad_warns_until_enough_samples():
    """On a quadratic score the map converges: few samples with much noise warn, many do not."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1, 6, 6, generator=g)

    class Quad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (w * x ** 2).flatten(1).sum(1, keepdim=True)

    x = torch.rand(1, 1, 6, 6, generator=g)
    sg = get_method("smoothgrad")
    few = checked_map(sg, Quad(), x, torch.ones(1, dtype=torch.long), {"n_samples": 4, "noise_level": 0.5},
                      names=["img.png"])
    assert len(few.warnings) == 1 and few.warnings[0].startswith("img.png: smoothgrad map still moves between the two "
                                                                 "halves of its 4 samples")
    many = checked_map(sg, Quad(), x, torch.ones(1, dtype=torch.long), {"n_samples": 512, "noise_level": 0.5})
    assert many.warnings == [] and many.per_image[0]["agreement_estimate"] > 0.95


def test_split_half_compares_the_maps_as_drawn():
    """|gradient| = 2 w |x + noise| on a smooth bump w: the per-pixel noise that a raw comparison counts is what the
    display's smoothing averages away. The record is the Spearman of the two halves after exactly that smoothing."""
    from scipy.stats import spearmanr

    from saliencylab.methods.gradient import smoothgrad_sums
    from saliencylab.render.maps import smooth

    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    w = 0.5 + torch.exp(-((yy - 12) ** 2 + (xx - 20) ** 2) / (2 * 6.0 ** 2))[None]  # a bump on a floor

    class Quad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (w * x ** 2).flatten(1).sum(1, keepdim=True)

    x = torch.full((1, 1, 32, 32), 0.5).double()
    x[0, 0, 0, 0] = 0.51  # a value range of 0.01: noise_level 100 draws noise of std 1
    t, opts = torch.zeros(1, dtype=torch.long), {"n_samples": 8, "noise_level": 100.0}
    a, b = (s.amax(1)[0].numpy() / 4 for s in smoothgrad_sums(Quad(), x, t, parts=2, **opts))  # the halves (32, 32)
    got = {}
    for frac in (0.0, 0.1):
        out = checked_map(get_method("smoothgrad"), Quad(), x, t, opts, ConvergenceRule(smooth=frac), names=["b"])
        sa, sb = (smooth(h, frac * 32) for h in (a, b)) if frac else (a, b)
        assert out.per_image[0]["split_half_spearman"] == pytest.approx(spearmanr(sa.ravel(), sb.ravel())[0],
                                                                        rel=1e-6)
        got[frac] = out
    raw, drawn = got[0.0], got[0.1]
    assert raw.per_image[0]["split_half_spearman"] < 0.6 and not raw.per_image[0]["converged"]
    assert "raw pixels" in raw.warnings[0]
    assert drawn.per_image[0]["agreement_estimate"] > 0.95 and drawn.warnings == []
    with pytest.raises(ValueError, match="smooth"):
        ConvergenceRule(smooth=-0.1)


def test_spearman_brown_and_suggested_samples():
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    assert math.isnan(spearman_brown(float("nan")))
    # 16 samples agreeing at 0.8 need 0.95 * 0.2 / (0.8 * 0.05) = 4.75 times more: 76 -> 128
    assert samples_for(16, 0.8, 0.95) == 128
    assert samples_for(16, 0.96, 0.95) == 16
    assert samples_for(16, -0.2, 0.95) == 128


def test_rule_is_checked():
    with pytest.raises(ValueError, match="tolerance"):
        ConvergenceRule(tolerance=0)
    with pytest.raises(ValueError, match="cap"):
        ConvergenceRule(cap=0)


def test_explain_records_convergence_warns_on_stderr_and_in_the_report(tmp_path):
    import json

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from saliencylab.cli import app
    from saliencylab.report.writer import write_report

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    common = ["explain", str(tmp_path / "a.png"), "--model", "torchvision:resnet18", "--weights", "random",
              "--input-size", "32", "--methods", "integrated_gradients,smoothgrad,vanilla", "--set",
              "integrated_gradients.n_steps=2", "--set", "integrated_gradients.rule=riemann_left", "--set",
              "smoothgrad.n_samples=2", "--set", "smoothgrad.noise_level=0.5"]
    out = tmp_path / "off"
    res = CliRunner().invoke(app, [*common, "--no-adapt", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "results.json").read_text())
    ig = rec["images"][0]["convergence"]["integrated_gradients"]
    assert ig["n_steps"] == 2 and not ig["adapted"]
    assert ig["completeness_share"] == pytest.approx(abs(ig["completeness_error"] / ig["logit_gap"]))
    assert rec["images"][0]["ig_completeness_error"] == ig["completeness_error"]
    assert set(rec["images"][0]["convergence"]) == {"integrated_gradients", "smoothgrad"}
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert warned and warned == [f"warning: {w}" for w in rec["convergence"]["warnings"]]
    assert all(str(tmp_path / "a.png") in w for w in warned)
    assert rec["convergence"]["rule"] == {"tolerance": 0.05, "cap": 256, "adapt": False, "smooth": 0.01}
    html = write_report(out).read_text()
    assert "Not converged" in html and rec["convergence"]["warnings"][0].split(":")[-1].strip() in html


def test_antithetic_split_half_cuts_between_pairs():
    """With 6 antithetic masks the halves are 4 + 2 masks (whole pairs), not 3 + 3: on a score that ignores
    the input each half is then exactly flat (a pair's masks sum to 1), so the halves share no noise."""
    from saliencylab.methods.convergence import _rise_halves

    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(x.shape[0], 4)

    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    opts = {"n_masks": 6, "grid": 3, "p_keep": 0.5, "batch_size": None, "seed": 1, "sampler": "antithetic"}
    for m in _rise_halves(Flat(), x, torch.zeros(1, dtype=torch.long), opts):
        torch.testing.assert_close(m, torch.full_like(m, 0.25), rtol=0, atol=1e-12)
