"""The audit's verdicts and flags: a bootstrap interval of per-image differences to a random map (or the area's
chance level) decides "beats random", "at chance", "worse than random" or "too few images"; images are flagged
against the chance level. Fixture: a model that reads a bright patch, a map that points at it, its negation
(worse than random) and a map that ignores it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from saliencylab.data.datasets import Record
from saliencylab.studies import verdicts
from saliencylab.studies.audit import CHECKS, AuditConfig, Batch, aggregate


class PatchEnergy(nn.Module):
    """Two logits [0, 60 * (mean(x^2) - 0.02)]: the score falls when the bright patch is blurred away."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 60 * ((x ** 2).mean(dim=(1, 2, 3)) - 0.02)
        return torch.stack([torch.zeros_like(s), s], 1)


def _images(n: int = 10, side: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[np.ndarray]]:
    """n images [n, 1, side, side]: faint noise and one bright 6x6 patch at a seeded place; the patch masks."""
    gen = np.random.default_rng(seed)
    x = 0.1 * gen.random((n, 1, side, side))
    masks = []
    for i in range(n):
        r, c = gen.integers(2, side - 8, size=2)
        x[i, 0, r:r + 6, c:c + 6] = 1.0
        m = np.zeros((side, side), bool)
        m[r:r + 6, c:c + 6] = True
        masks.append(m)
    return torch.from_numpy(x).float(), masks


def _batch(maps: dict[str, torch.Tensor], x: torch.Tensor, lungs: list[np.ndarray] | None = None,
           markers: list[np.ndarray] | None = None) -> Batch:
    model = PatchEnergy().eval()
    n = len(x)
    recs = tuple(Record(f"img{i}.png", 1, "yes") for i in range(n))
    probs = torch.softmax(model(x).double(), 1).numpy()
    return Batch(0, recs, x, torch.ones(n, dtype=torch.long), np.ones(n, int), probs,
                 tuple(lungs or [None] * n), tuple([None] * n), tuple(markers or [None] * n), maps,
                 {k: (lambda m, xx, t, v=v: v) for k, v in maps.items()}, {k: True for k in maps}, model)


def _summary(check: str, b: Batch, method: str, cfg: AuditConfig) -> dict:
    rows = CHECKS[check].run(b, cfg)
    return CHECKS[check].summarise([r for r in rows if r.method == method], cfg)


def test_judge_decides_by_the_interval_and_the_minimum_effect():
    rng = np.random.default_rng(0)
    assert verdicts.judge(0.1 + 0.01 * rng.standard_normal(20), "lungs").verdict == verdicts.BEATS
    assert verdicts.judge(-0.1 + 0.01 * rng.standard_normal(20), "lungs").verdict == verdicts.WORSE
    assert verdicts.judge(0.01 * rng.standard_normal(20), "lungs").verdict == verdicts.CHANCE
    # a sure but tiny effect is below the minimum effect (0.05 for lungs): at chance
    assert verdicts.judge(np.full(20, 0.03), "lungs").verdict == verdicts.CHANCE
    few = verdicts.judge([0.5] * (verdicts.MIN_IMAGES - 1), "lungs")
    assert few.verdict == verdicts.FEW and few.images == verdicts.MIN_IMAGES - 1
    v = verdicts.judge([0.2, 0.3, 0.25, 0.22, 0.28, 0.3, 0.21, float("nan")], "marker", seed=3)
    assert v.verdict == verdicts.ABOVE and v.images == 7 and v.better == "neither"
    assert v.difference == pytest.approx(np.mean([0.2, 0.3, 0.25, 0.22, 0.28, 0.3, 0.21]))
    assert v.low <= v.difference <= v.high
    assert verdicts.judge([0.2, 0.3, 0.25, 0.22, 0.28, 0.3, 0.21], "marker", seed=3) == v  # seeded


def test_bootstrap_interval_matches_a_closed_form_for_many_images():
    """For n = 400 draws the percentile interval of the mean is close to mean +- 1.96 s / sqrt(n)."""
    v = np.random.default_rng(1).standard_normal(400)
    mean, low, high = verdicts.bootstrap_interval(v, n_boot=4000, seed=0)
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size)
    assert mean == pytest.approx(v.mean(), abs=1e-12)
    assert low == pytest.approx(mean - half, abs=0.15 * half) and high == pytest.approx(mean + half, abs=0.15 * half)


def test_faithfulness_verdicts_on_a_map_a_negated_map_and_a_blind_one():
    x, patches = _images()
    good = x[:, 0].clone()  # the patch is what the model reads: brightest first
    maps = {"good": good, "negated": -good, "blind": torch.from_numpy(np.random.default_rng(5).random(good.shape))
            .float()}
    cfg = AuditConfig(faithfulness_images=10, seed=0)
    b = _batch(maps, x)
    got = {name: _summary("faithfulness", b, name, cfg) for name in maps}
    f = got["good"]["faithfulness"]["blur"]
    assert f["deletion"]["map"] < f["deletion"]["random"] and f["insertion"]["map"] > f["insertion"]["random"]
    assert got["good"]["faithfulness_verdict"]["verdict"] == verdicts.BEATS
    assert got["good"]["deletion_verdict"]["better"] == "lower"
    assert got["good"]["insertion_verdict"]["better"] == "higher"
    assert got["negated"]["faithfulness_verdict"]["verdict"] == verdicts.WORSE
    assert got["negated"]["deletion_verdict"]["verdict"] == verdicts.WORSE
    assert got["blind"]["faithfulness_verdict"]["verdict"] == verdicts.CHANCE
    # the difference is the per-image gain over the random map, oriented so that positive is better
    g = got["good"]
    d = g["faithfulness"]["blur"]["deletion"]
    assert g["deletion_verdict"]["difference"] == pytest.approx(d["random"] - d["map"], abs=1e-9)
    lo, hi = g["faithfulness_verdict"]["low"], g["faithfulness_verdict"]["high"]
    assert 0 < lo <= g["faithfulness_verdict"]["difference"] <= hi
    few = AuditConfig(faithfulness_images=3, seed=0)
    assert _summary("faithfulness", b, "good", few)["faithfulness_verdict"]["verdict"] == verdicts.FEW


def test_localisation_and_stability_verdicts_and_the_plain_words():
    x, patches = _images()
    good = x[:, 0].clone()
    lungs = np.zeros((32, 32), bool)
    lungs[4:28, 4:16] = True  # the "lungs": 28% of the image, where the model's patch often is not
    inside = torch.from_numpy(lungs + 0.1 * np.random.default_rng(0).random((10, 32, 32))).float()
    maps = {"good": inside * (1 + good), "away": torch.from_numpy(np.broadcast_to(~lungs, (10, 32, 32)).copy()).float()}
    b = _batch(maps, x, lungs=[lungs] * 10)
    cfg = AuditConfig(faithfulness_images=10, sanity_images=2)
    assert _summary("lungs", b, "good", cfg)["lungs_verdict"]["verdict"] == verdicts.BEATS
    away = _summary("lungs", b, "away", cfg)
    assert away["lung_mass"] == 0 and away["lungs_verdict"]["verdict"] == verdicts.WORSE
    assert away["lungs_verdict"]["difference"] == pytest.approx(-lungs.mean())
    # the whole audit result of this batch: verdicts gathered per method, and the summary names the failure
    from saliencylab.studies.audit import summary_lines

    class Subj:
        kind, origin, classes, scope = "model", {}, ("no", "yes"), "all"

    active = [CHECKS[c] for c in ("lungs", "faithfulness", "flags")]
    rows = {c.name: c.run(b, cfg) for c in active}
    result = aggregate(Subj(), [type("S", (), {"name": n}) for n in maps], cfg, active, [], rows, 10, [], {})
    for name in maps:
        assert set(result["methods"][name]["verdicts"]) >= {"lungs", "faithfulness", "deletion", "insertion"}
    assert result["methods"]["away"]["verdicts"]["faithfulness"]["verdict"] == verdicts.WORSE
    fails = verdicts.failing(result["methods"])
    assert any(t.startswith("away is worse than random on faithfulness") for t in fails)
    assert any(t.startswith("away is worse than random on localisation") for t in fails)
    assert not any(t.startswith("good") and ("localisation" in t or "worse" in t) for t in fails)
    assert any(ln.startswith("warning: away is worse than random") for ln in summary_lines(result | {
        "probes": {}, "unreadable": 0, "checks": ["lungs", "faithfulness", "flags"]}))


def test_stability_beats_the_map_of_another_image():
    """A map that follows the image is stable beyond the unrelated-image level; one fixed map for every
    image is exactly as similar to another image's map as to its noisy copy's: at chance."""
    from saliencylab.metrics.stability import stability  # noqa: F401  (the check calls it)

    x, _ = _images(8)
    fixed = torch.from_numpy(np.random.default_rng(2).random((32, 32))).float()
    fns = {"follows": lambda m, xx, t: xx[:, 0] ** 2, "fixed": lambda m, xx, t: fixed.expand(len(xx), 32, 32)}
    b = _batch({k: f(None, x, None) for k, f in fns.items()}, x)
    b = Batch(**{**b.__dict__, "fns": fns})
    cfg = AuditConfig()
    follows = _summary("stability", b, "follows", cfg)
    assert follows["stability_verdict"]["verdict"] == verdicts.BEATS and follows["noise_spearman"] > 0.5
    fixed_s = _summary("stability", b, "fixed", cfg)
    assert fixed_s["noise_spearman"] == pytest.approx(1.0) and fixed_s["unrelated_spearman"] == pytest.approx(1.0)
    assert fixed_s["stability_verdict"]["verdict"] == verdicts.CHANCE


def test_flags_against_the_chance_level():
    side = 32
    marker = np.zeros((side, side), bool)
    marker[2:6, 24:30] = True
    lungs = np.zeros((side, side), bool)
    lungs[8:28, 4:28] = True
    flat = np.ones((side, side))
    on_marker = flat.copy()
    on_marker[marker] = 6.0  # 6x the density on the marker: ~13% of the mass on 2.3% of the image
    off_lungs = np.where(lungs, 0.2, 1.0)
    assert verdicts.flag_image(flat, lungs, marker).reasons == ()  # a uniform map is exactly at chance
    f = verdicts.flag_image(on_marker, lungs, marker)
    assert f.reasons == ("marker",)
    assert f.marker_excess == pytest.approx(6 * 24 / (side * side - 24 + 6 * 24) - 24 / side ** 2)
    assert f.marker_null < f.marker_excess + marker.mean()
    g = verdicts.flag_image(off_lungs, lungs, marker)
    assert g.reasons == ("outside lungs",)
    share = lungs.mean()
    assert g.lung_deficit == pytest.approx(share - 0.2 * lungs.sum() / (0.2 * lungs.sum() + (~lungs).sum()))
    # a map whose brightest box is elsewhere: the marker's box does not beat the random boxes
    elsewhere = flat.copy()
    elsewhere[marker] = 2.0
    elsewhere[20:26, 10:20] = 8.0
    assert "marker" not in verdicts.flag_image(elsewhere, None, marker).reasons
    # the outside-lung rule is conservative: a coarse random map (4x4 cells) that misses the lungs by its cells'
    # luck is not flagged, nor is a compact blob between the lungs (moved at random it lands off them as often)
    two = np.zeros((side, side), bool)
    two[6:28, 3:13] = two[6:28, 19:29] = True
    yy, xx = np.mgrid[:side, :side]
    between = np.exp(-((yy - 17) ** 2 + (xx - 16) ** 2) / 8.0)
    got = verdicts.flag_image(between, two, None)
    assert got.reasons == () and got.lung_deficit > 0.25 and got.lung_null < 0.01
    coarse = np.kron(np.random.default_rng(4).random((4, 4)), np.ones((8, 8)))
    assert verdicts.flag_image(coarse, two, None).reasons == ()
    null = verdicts.box_null(on_marker, marker, n=50, seed=1)
    assert null.shape == (50,) and np.all((null > 0) & (null < 1))
