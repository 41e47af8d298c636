"""Identities, closed forms, the no-side-effects contract, and a smoke test over every registered method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import LinearModel, TinyCNN
from saliencylab.errors import UserError
from saliencylab.methods import METHODS, completeness_error, get_method, parse_methods, resolve_target
from saliencylab.methods.gradient import ig_alphas, integrated_gradients, smoothgrad, vanilla
from saliencylab.methods.perturbation import occlusion, rise
from saliencylab.methods.spectral import spectral_residual

# methods that need a vision transformer are tested on one in test_model_transformers.py
ON_CNN = [n for n, s in METHODS.items() if s.family != "attention"]
# options that keep sampling methods fast in tests
FAST = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"n_steps": 4},
        "occlusion": {"window": 4, "stride": 4}, "rise": {"n_masks": 16, "grid": 4}}


def test_registry_order_and_names():
    assert list(METHODS) == ["vanilla", "gradient_x_input", "smoothgrad", "integrated_gradients", "gradcam",
                             "gradcam_pp", "attention_rollout", "occlusion", "rise", "spectral_residual"]
    with pytest.raises(UserError, match="Did you mean smoothgrad"):
        get_method("smoothgrd")
    assert [m.name for m in parse_methods("all")] == list(METHODS)


def test_duplicate_registration_raises():
    from saliencylab.methods import register_method

    with pytest.raises(ValueError, match="registered twice"):
        register_method("vanilla", family="gradient", paper="-")(lambda m, x, t: x)


@pytest.mark.parametrize("name", ON_CNN)
def test_smoke_every_method(name, tiny, x_small):
    t = resolve_target(tiny, x_small)
    out = METHODS[name].fn(tiny, x_small, t, **FAST.get(name, {}))
    assert out.shape == (2, 16, 16)
    assert out.dtype == torch.float32 and out.device == x_small.device
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0  # a map of zeros would pass every other check


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("name", ON_CNN)
def test_no_side_effects(name, x_small):
    model = TinyCNN().train()
    model.conv2.eval()  # a mixed state must come back exactly
    x = x_small.clone()
    t = torch.tensor([0, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    METHODS[name].fn(model, x, t, **FAST.get(name, {}))
    assert torch.equal(x, x_small) and x.grad is None and not x.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model.conv2.training and model.conv1.training
    assert _hooks(model) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", [n for n in ON_CNN if METHODS[n].uses_model])
def test_no_hooks_or_mode_change_after_error(name, x_small):
    model = TinyCNN().train()
    bad_target = torch.tensor([7, 7])  # out of range: fails after the forward pass, inside the method
    with pytest.raises((RuntimeError, IndexError)):
        METHODS[name].fn(model, x_small, bad_target, **FAST.get(name, {}))
    assert _hooks(model) == 0
    assert model.training and all(m.training for m in model.modules())


def test_smoothgrad_one_sample_no_noise_equals_vanilla(resnet18, x_resnet):
    t = resolve_target(resnet18, x_resnet)
    sg = smoothgrad(resnet18, x_resnet, t, n_samples=1, noise_level=0.0)
    torch.testing.assert_close(sg, vanilla(resnet18, x_resnet, t), rtol=0, atol=0)


def test_smoothgrad_is_seeded_and_chunking_invariant(tiny, x_small):
    t = resolve_target(tiny, x_small)
    x = x_small[:, :, :15, :13]  # not a multiple of 16 values: torch's normal sampler then splits differently
    a = smoothgrad(tiny, x, t, n_samples=6, seed=3)
    torch.testing.assert_close(smoothgrad(tiny, x, t, n_samples=6, seed=3), a, rtol=0, atol=0)
    for batch_size in (2, 8, 64):  # 1, 4 and all 6 noisy copies of the two images per pass
        b = smoothgrad(tiny, x, t, n_samples=6, seed=3, batch_size=batch_size)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    c = smoothgrad(tiny, x, t, n_samples=6, seed=4)
    assert not torch.allclose(a, c)


def test_predicted_equals_argmax(resnet18, x_resnet):
    t = resolve_target(resnet18, x_resnet, "predicted")
    with torch.no_grad():
        assert torch.equal(t, resnet18(x_resnet).argmax(1))


def test_predicted_resolved_in_eval_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Dropout(0.99)).train()
    x = torch.rand(4, 3, 2, 2)
    t = resolve_target(model, x)
    with torch.no_grad():
        assert torch.equal(t, model.eval()(x).argmax(1))


def test_binary_targets_single_logit():
    w = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = LinearModel(w)
    x = torch.rand(3, 1, 4, 4)
    pos = resolve_target(model, x, "positive", ["normal", "covid"])
    neg = resolve_target(model, x, "negative", ["normal", "covid"])
    assert pos.tolist() == [1, 1, 1] and neg.tolist() == [0, 0, 0]
    # the gradient of the positive class is w, of the negative class -w
    from saliencylab.methods.gradient import gradient_x_input

    torch.testing.assert_close(gradient_x_input(model, x, pos), (w * x).sum(1))
    torch.testing.assert_close(gradient_x_input(model, x, neg), -(w * x).sum(1))
    logits = model(x).detach()[:, 0]
    assert resolve_target(model, x).tolist() == (logits > 0).long().tolist()


def test_class_name_targets():
    names = ["tabby", "tiger cat", "Egyptian cat"]
    model = LinearModel(torch.randn(3, 3, 2, 2))
    x = torch.rand(2, 3, 2, 2)
    assert resolve_target(model, x, "egyptian cat", names).tolist() == [2, 2]
    assert resolve_target(model, x, "1", names).tolist() == [1, 1]
    with pytest.raises(UserError, match="Did you mean 'tiger cat'"):
        resolve_target(model, x, "tigger cat", names)
    with pytest.raises(UserError, match="out of range"):
        resolve_target(model, x, 5, names)
    with pytest.raises(UserError, match="needs a binary model"):
        resolve_target(model, x, "positive", names)


# -- closed forms on a linear model: gradient = w, IG = w * (x - x0), occlusion = mean window sum of w * x --

@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(5)
    return LinearModel(torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0.3, -0.2]))


def test_vanilla_on_linear_model_is_max_abs_weight(linear):
    x = torch.rand(2, 3, 8, 8)
    t = torch.tensor([0, 1])
    expected = linear.w.detach()[t].abs().amax(1)
    torch.testing.assert_close(vanilla(linear, x, t), expected)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                                  "riemann_trapezoid"])
def test_ig_on_linear_model_is_exact_for_any_rule(linear, rule):
    x = torch.rand(2, 3, 8, 8)
    t = torch.tensor([1, 0])
    ig = integrated_gradients(linear, x, t, n_steps=3, rule=rule)
    torch.testing.assert_close(ig, (linear.w.detach()[t] * x).sum(1))
    assert completeness_error(linear, x, t, ig).abs().max() < 1e-4


def test_ig_on_quadratic_is_exact_with_gauss_legendre():
    """f(x) = sum(a * x^2): IG_i = a_i x_i^2 from a black baseline; one Gauss-Legendre point is exact."""

    class Quadratic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.linspace(-1, 1, 16).view(1, 1, 4, 4))

        def forward(self, x):
            return (self.a * x**2).flatten(1).sum(1, keepdim=True).repeat(1, 2)

    model = Quadratic()
    x = torch.rand(1, 1, 4, 4)
    ig = integrated_gradients(model, x, torch.tensor([0]), n_steps=1, rule="gausslegendre")
    torch.testing.assert_close(ig, (model.a * x**2).detach()[:, 0])
    left = integrated_gradients(model, x, torch.tensor([0]), n_steps=1, rule="riemann_left")
    assert left.abs().max() == 0  # the left rule samples only the baseline, where the gradient is 0


def test_ig_completeness_on_smooth_cnn(tiny_smooth, x_small):
    """In float64, relative to each map's scale (sum |IG|): one image's gap f(x) - f(x0) is only 0.0016, so a
    tolerance relative to the gap, in float32, failed on another CPU's kernels."""
    model, x = tiny_smooth.double(), x_small.double()
    t = resolve_target(model, x)
    ig = integrated_gradients(model, x, t, n_steps=16)
    scale = ig.abs().flatten(1).sum(1)
    with torch.no_grad():
        gap = model(x).gather(1, t[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    err = completeness_error(model, x, t, ig)
    torch.testing.assert_close(err + gap, ig.flatten(1).sum(1))  # the definition, independently
    assert (err.abs() <= 1e-10 * scale).all(), (err, scale)  # 16 Gauss-Legendre points on a smooth path
    coarse = completeness_error(model, x, t, integrated_gradients(model, x, t, n_steps=4))
    assert (coarse.abs() > 1e-7 * scale).all()  # 4 points are visibly inexact: the check above can fail


def test_ig_chunking_does_not_change_result(tiny, x_small):
    t = resolve_target(tiny, x_small)
    a = integrated_gradients(tiny, x_small, t, n_steps=8)
    b = integrated_gradients(tiny, x_small, t, n_steps=8, batch_size=16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ig_alphas_weights_sum_to_one():
    for rule in ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]:
        a, w = ig_alphas(7, rule)
        assert abs(float(w.sum()) - 1.0) < 1e-12 and a.min() >= 0 and a.max() <= 1


def test_occlusion_on_linear_model(linear):
    x = torch.rand(1, 3, 8, 8)
    t = torch.tensor([0])
    # non-overlapping 4x4 windows: each pixel's value is the contribution of its own window
    out = occlusion(linear, x, t, window=4, stride=4, baseline=0.0)
    contrib = (linear.w.detach()[0] * x[0]).sum(0)  # (8, 8)
    expected = contrib.view(2, 4, 2, 4).sum((1, 3)).repeat_interleave(4, 0).repeat_interleave(4, 1)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_occlusion_works_on_1d_signals():
    """Methods are written for x[B, C, *spatial]: a 1D signal needs no rewrite."""
    w = torch.randn(2, 1, 12)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        model[1].weight.copy_(w.view(2, 12))
    x = torch.rand(1, 1, 12)
    out = occlusion(model, x, torch.tensor([1]), window=1, stride=1)
    torch.testing.assert_close(out[0], w[1, 0] * x[0, 0])
    torch.testing.assert_close(vanilla(model, x, torch.tensor([1]))[0], w[1, 0].abs())


def test_rise_finds_the_region_a_model_reads():
    """A model whose positive probability rises with the mean of the top-left quadrant only."""

    class Reader(nn.Module):
        def forward(self, x):
            s = 8 * (x[:, :, :8, :8].mean((1, 2, 3)) - 0.5)
            return torch.stack([-s, s], 1)

    x = torch.ones(1, 3, 16, 16)
    m = rise(Reader(), x, torch.tensor([1]), n_masks=400, grid=4, seed=0)[0]
    assert m[:8, :8].mean() > 1.3 * m[8:, 8:].mean()  # uniform would give 1.0
    assert m[:8, :8].mean() > 1.15 * m[:8, 8:].mean()


def test_spectral_residual_ignores_model_and_finds_the_odd_patch():
    x = 0.1 * torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # sensor noise
    x[:, :, ::4, :] += 0.8  # a regular texture...
    x[:, :, 40:48, 40:48] = 0.5  # ...and one odd patch
    m = spectral_residual(None, x, None)[0]
    assert m.shape == (64, 64)
    assert m[40:48, 40:48].mean() > 5 * m.mean()
    assert int(m.argmax()) // 64 in range(38, 50) and int(m.argmax()) % 64 in range(38, 50)


def test_gradcam_layer_default_and_unknown_layer(tiny, x_small):
    from saliencylab.methods.cam import gradcam

    t = resolve_target(tiny, x_small)
    a = gradcam(tiny, x_small, t)
    b = gradcam(tiny, x_small, t, layer="act2")
    torch.testing.assert_close(a, b)
    with pytest.raises(UserError, match="no layer 'act9'"):
        gradcam(tiny, x_small, t, layer="act9")


def test_gradcam_without_relu_keeps_negative_evidence(tiny, x_small):
    from saliencylab.methods.cam import gradcam

    t = torch.tensor([0, 1])
    raw = gradcam(tiny, x_small, t, relu=False)
    torch.testing.assert_close(gradcam(tiny, x_small, t), raw.clamp(min=0))
