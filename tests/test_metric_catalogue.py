"""The metrics a chest X-ray audit needs from Quantus's catalogue, written here, each against known answers:
relevance rank accuracy and the mask AUROC, faithfulness correlation, sparseness and complexity, Random
Logit, sMPRT and eMPRT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import LinearModel, TinyCNN, edge_detector
from saliencylab.methods.gradient import gradient_x_input, smoothgrad, vanilla
from saliencylab.metrics.complexity import complexity, histogram_entropy, sparseness
from saliencylab.metrics.faithfulness import faithfulness_correlation
from saliencylab.metrics.localisation import UndefinedMetric, mask_auroc, relevance_rank_accuracy
from saliencylab.metrics.sanity import (
    efficient_mprt,
    random_logit,
    randomisation_check,
    smooth_mprt,
    smoothed,
)
from saliencylab.metrics.similarity import ssim

# ---- threshold-free localisation --------------------------------------------------------------------------


def test_rank_accuracy_and_auroc_hand_computed():
    m = np.array([[4.0, 3.0], [2.0, 1.0]])
    mask = np.array([[True, False], [True, False]])
    assert relevance_rank_accuracy(m, mask) == pytest.approx(0.5)  # top 2 = {4, 3}; only 4 inside
    assert mask_auroc(m, mask) == pytest.approx(3 / 4)  # pairs (in, out): 4>3, 4>1, 2<3, 2>1
    tied = np.array([[1.0, 1.0], [0.0, 0.0]])
    one = np.array([[True, False], [False, False]])
    assert relevance_rank_accuracy(tied, one) == pytest.approx(0.5)  # the tie at the top is a coin toss
    assert mask_auroc(tied, one) == pytest.approx((1 + 1 + 0.5) / 3)  # ties count half


def test_a_map_equal_to_the_mask_scores_1_and_its_negation_0():
    mask = np.zeros((16, 16), bool)
    mask[3:9, 4:12] = True
    m = mask.astype(float) + 0.01 * np.random.default_rng(0).random((16, 16))
    assert relevance_rank_accuracy(m, mask) == 1.0 and mask_auroc(m, mask) == 1.0
    assert relevance_rank_accuracy(-m, mask, sign="signed") == 0.0 and mask_auroc(-m, mask, sign="signed") == 0.0
    assert mask_auroc(-m, mask) == 1.0  # 'abs' ranks by magnitude


def test_random_maps_score_the_chance_levels_and_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    mask = np.zeros((24, 24), bool)
    mask[2:10, 5:20] = True  # share 120 / 576
    ranks, aucs = [], []
    for _ in range(300):
        m = rng.random((24, 24))
        ranks.append(relevance_rank_accuracy(m, mask))
        aucs.append(mask_auroc(m, mask))
    assert np.mean(ranks) == pytest.approx(mask.mean(), abs=0.01)
    assert np.mean(aucs) == pytest.approx(0.5, abs=0.01)
    m = np.round(rng.random((24, 24)), 1)  # with ties
    assert mask_auroc(m, mask) == pytest.approx(roc_auc_score(mask.ravel(), m.ravel()), abs=1e-12)


def test_rank_accuracy_and_auroc_undefined_cases():
    mask = np.zeros((8, 8), bool)
    mask[:2] = True
    for fn in (relevance_rank_accuracy, mask_auroc):
        with pytest.warns(UndefinedMetric, match="constant"):
            assert math.isnan(fn(np.ones((8, 8)), mask))
        with pytest.warns(UndefinedMetric, match="empty"):
            assert math.isnan(fn(np.random.default_rng(0).random((8, 8)), np.zeros((8, 8), bool)))
    with pytest.warns(UndefinedMetric, match="whole image"):
        assert math.isnan(mask_auroc(np.random.default_rng(0).random((8, 8)), np.ones((8, 8), bool)))
    assert relevance_rank_accuracy(np.random.default_rng(0).random((8, 8)), np.ones((8, 8), bool)) == 1.0
    with pytest.raises(ValueError, match="sign must be one of 'abs', 'positive', 'signed'"):
        mask_auroc(np.ones((8, 8)), mask, sign="raw")


# ---- faithfulness correlation -----------------------------------------------------------------------------


def _linear(k: int = 2, size: int = 10, seed: int = 0) -> tuple[LinearModel, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = LinearModel(torch.randn(k, 2, size, size, generator=g, dtype=torch.float64))
    model.b.data = model.b.data.double()
    x = torch.rand(3, 2, size, size, generator=g, dtype=torch.float64)
    return model, x


def test_faithfulness_correlation_is_1_when_attributions_sum_to_the_drop():
    """Linear logit, black baseline: removing S drops the logit by sum_S w x = the gradient x input sum."""
    model, x = _linear()
    t = torch.tensor([0, 1, 1])
    gxi = gradient_x_input(model, x, t)
    fc = faithfulness_correlation(model, x, t, gxi, n_subsets=40, subset_size=12)
    np.testing.assert_allclose(fc, 1.0, atol=1e-9)
    np.testing.assert_allclose(faithfulness_correlation(model, x, t, -gxi, n_subsets=40, subset_size=12), -1.0,
                               atol=1e-9)
    rand = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fr = faithfulness_correlation(model, x, t, rand, n_subsets=200, subset_size=12)
    assert (np.abs(fr) < 0.35).all()  # unrelated map: about 0
    # one logit: the negative class's score is the negated logit; its gradient x input is the negation too
    one = LinearModel(model.w.data[:1].clone())
    t0 = torch.tensor([0, 0, 1])
    np.testing.assert_allclose(faithfulness_correlation(one, x, t0, gradient_x_input(one, x, t0), n_subsets=30,
                                                        subset_size=12), 1.0, atol=1e-9)


def test_faithfulness_correlation_is_seeded_and_batch_invariant():
    model, x = _linear(k=3)
    t = torch.tensor([2, 0, 1])
    sal = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opts = {"n_subsets": 30, "subset_size": 20, "score": "probability", "baseline": "mean", "seed": 4}
    a = faithfulness_correlation(model, x, t, sal, **opts)
    b = faithfulness_correlation(model, x[1:], t[1:], sal[1:], **opts, batch_size=7)
    np.testing.assert_allclose(a[1:], b, rtol=1e-12)
    assert not np.allclose(a, faithfulness_correlation(model, x, t, sal, **(opts | {"seed": 5})))


def test_faithfulness_correlation_undefined_cases():
    model, x = _linear()
    t = torch.tensor([0, 1, 1])
    with pytest.warns(UndefinedMetric, match="subset sums do not vary"):
        assert np.isnan(faithfulness_correlation(model, x, t, torch.ones(3, 10, 10), n_subsets=10)).all()
    blind = LinearModel(torch.zeros(2, 2, 10, 10, dtype=torch.float64))
    blind.b.data = blind.b.data.double()
    with pytest.warns(UndefinedMetric, match="ignores the removed pixels"):
        out = faithfulness_correlation(blind, x, t, torch.rand(3, 10, 10, dtype=torch.float64), n_subsets=10)
    assert np.isnan(out).all()
    with pytest.raises(ValueError, match="baseline must be one of 'black', 'mean', 'blur'"):
        faithfulness_correlation(model, x, t, torch.ones(3, 10, 10), baseline="zero")


# ---- sparseness and complexity ----------------------------------------------------------------------------


def test_sparseness_known_values():
    one_hot = np.zeros((8, 8))
    one_hot[3, 4] = -2.0
    assert sparseness(one_hot) == pytest.approx(63 / 64)
    assert sparseness(np.full((8, 8), 0.3)) == pytest.approx(0.0, abs=1e-12)
    assert sparseness(np.array([4.0, 1.0, 3.0, 2.0])) == pytest.approx(10 / 40)  # (-3*1 - 2 + 3 + 3*4) / (4*10)
    with pytest.warns(UndefinedMetric, match="zero everywhere"):
        assert math.isnan(sparseness(np.zeros((4, 4))))


def test_complexity_known_values():
    one_hot = np.zeros((8, 8))
    one_hot[0, 0] = 5.0
    assert complexity(one_hot) == pytest.approx(0.0)
    assert complexity(np.ones((8, 8))) == pytest.approx(math.log(64))
    assert complexity(np.ones((8, 8)), normalised=True) == pytest.approx(1.0)
    assert complexity(np.array([1.0, -1.0, 2.0])) == pytest.approx(1.5 * math.log(2))  # p = 1/4, 1/4, 1/2
    with pytest.warns(UndefinedMetric, match="NaN everywhere"):
        assert math.isnan(complexity(np.full(4, np.nan)))
    assert histogram_entropy(np.ones((4, 4))) == 0.0
    assert histogram_entropy(np.array([0.0, 1.0, 2.0, 3.0]), n_bins=4) == pytest.approx(math.log(4))
    assert histogram_entropy(np.array([0.0, 0.0, 0.0, 3.0]), n_bins=4) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


# ---- Random Logit -----------------------------------------------------------------------------------------


def test_random_logit_detects_identical_maps_of_a_single_logit_model():
    g = torch.Generator().manual_seed(0)
    model = LinearModel(torch.randn(1, 1, 12, 12, generator=g))
    x = torch.rand(2, 1, 12, 12, generator=g)
    t = torch.tensor([1, 0])
    for method in (vanilla, smoothgrad):
        rows = random_logit(model, x, t, method)
        assert all(r["identical"] and r["single_logit"] and r["similarity"] == pytest.approx(1.0) for r in rows)
        assert [r["other"] for r in rows] == [0, 1] and "one logit" in rows[0]["reason"]
    rows = random_logit(model, x, t, gradient_x_input)
    assert all(r["negated"] and not r["identical"] and "negation" in r["reason"] for r in rows)


def test_random_logit_on_a_multiclass_model():
    g = torch.Generator().manual_seed(1)
    model = LinearModel(torch.randn(4, 1, 12, 12, generator=g))
    x = torch.rand(5, 1, 12, 12, generator=g) + 0.5
    t = torch.tensor([0, 1, 2, 3, 0])
    rows = random_logit(model, x, t, gradient_x_input, seed=3)
    others = [r["other"] for r in rows]
    assert all(o != int(ti) and 0 <= o < 4 for o, ti in zip(others, t, strict=True))
    assert others == [r["other"] for r in random_logit(model, x, t, gradient_x_input, seed=3)]  # seeded
    w = model.w.detach()[:, 0]
    for i, r in enumerate(rows):  # the map of class k is w_k * x: the similarity has a closed form
        expect = ssim((w[int(t[i])] * x[i, 0]).numpy(), (w[r["other"]] * x[i, 0]).numpy())
        assert r["similarity"] == pytest.approx(expect, abs=1e-6) and not r["identical"] and r["reason"] is None
    rows = random_logit(model, x, t, gradient_x_input, other=torch.tensor([1, 0, 3, 2, 2]), similarity="spearman")
    assert [r["other"] for r in rows] == [1, 0, 3, 2, 2]
    with pytest.raises(ValueError, match="other must differ"):
        random_logit(model, x, t, gradient_x_input, other=t)


# ---- sMPRT and eMPRT --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs():
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    centres = [(5, 5), (18, 6), (6, 17), (17, 18), (12, 12)]
    imgs = [torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12) for cy, cx in centres]
    return torch.stack(imgs)[:, None].repeat(1, 3, 1, 1) * 0.8 + 0.1


class BumpReader(nn.Module):
    """A 'trained' reader: positive 3x3 filters, ReLU, then a smooth spatial weight (a Gaussian bump). Its
    gradient is a smooth bump; once its weights are random, the gradient is noise."""

    def __init__(self, size: int = 24) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
        bump = torch.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 8) ** 2))
        self.w = nn.Parameter(bump.expand(4, size, size).clone())
        with torch.no_grad():
            self.conv.weight.fill_(0.1)
            self.conv.bias.zero_()

    def forward(self, x):
        s = (torch.relu(self.conv(x)) * self.w).sum((1, 2, 3))
        return torch.stack([-s, s], 1)


def test_smoothed_map_is_the_mean_over_the_seeded_noise():
    model, x = _linear()
    t = torch.tensor([0, 1, 1])
    got = smoothed(gradient_x_input, n_noisy=4, noise=0.1, seed=2)(model, x, t)
    gen = torch.Generator().manual_seed(2)
    eps = torch.stack([torch.randn(x.shape, generator=gen).double() * 0.1 for _ in range(4)]).mean(0)
    w = model.w.detach()[t]  # (B, C, H, W): the map of class t is sum_c w_t (x + eps)
    torch.testing.assert_close(got, (w * (x + eps)).sum(1))


def test_smooth_mprt_degenerates_to_mprt_and_separatesedge_detector_from_gradient(blobs):
    model = TinyCNN(seed=3).eval()
    t = torch.zeros(len(blobs), dtype=torch.long)
    plain = randomisation_check(model, blobs, t, vanilla, order="bottom_up")
    same = smooth_mprt(model, blobs, t, vanilla, n_noisy=1, noise=0.0)
    assert same["steps"] == plain["steps"] and same["passed"] == plain["passed"]
    edge = smooth_mprt(model, blobs, t, edge_detector, n_noisy=4, noise=0.05)
    assert edge["final"]["ssim"] == pytest.approx(1.0) and edge["passed"] is False
    van = smooth_mprt(model, blobs, t, vanilla, n_noisy=4, noise=0.05)
    assert van["passed"] is True and van["final"]["ssim"] < 0.5 and van["order"] == "bottom_up"
    torch.testing.assert_close(vanilla(model, blobs, t), vanilla(TinyCNN(seed=3).eval(), blobs, t))  # untouched


def test_efficient_mprtedge_detector_rises_0_gradient_rises(blobs):
    model = BumpReader().train()  # a mode to keep
    t = torch.ones(len(blobs), dtype=torch.long)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edge = efficient_mprt(model, blobs, t, edge_detector)
    assert edge["rise"] == [0.0] * len(blobs) and edge["mean_rise"] == 0.0
    van = efficient_mprt(model, blobs, t, vanilla)
    assert all(r > 0.3 for r in van["rise"]), van["rise"]  # the bump turned to noise
    ent = efficient_mprt(model, blobs, t, vanilla, complexity="entropy")
    assert all(r > 0 for r in ent["rise"])
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UndefinedMetric, match="complexity is 0"):
        flat = efficient_mprt(model, blobs, t, lambda _m, xx, _t: torch.ones(len(xx), 24, 24))
    assert all(math.isnan(r) for r in flat["rise"]) and math.isnan(flat["mean_rise"])
