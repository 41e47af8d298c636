"""Agreement with Captum and pytorch-grad-cam on the same models and inputs (tolerances stated per test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saliencylab.methods import resolve_target
from saliencylab.methods.cam import gradcam, gradcam_pp
from saliencylab.methods.gradient import gradient_x_input, integrated_gradients, vanilla
from saliencylab.methods.perturbation import occlusion
from saliencylab.render import normalise

captum_attr = pytest.importorskip("captum.attr")


def _case(request, name):
    """Model, input and CAM layer; the input is channels-last, the layout our methods compute in."""
    if name == "tiny":
        model = request.getfixturevalue("tiny")
        x, layer = request.getfixturevalue("x_small"), model.act2
    else:
        model = request.getfixturevalue("resnet18")
        x, layer = request.getfixturevalue("x_resnet"), model.net.layer4
    return model, x.contiguous(memory_format=torch.channels_last), layer


MODELS = ["tiny", "resnet18"]


@pytest.mark.parametrize("case", MODELS)
def test_vanilla_matches_captum_saliency(request, case):
    model, x, _ = _case(request, case)
    t = resolve_target(model, x)
    ref = captum_attr.Saliency(model).attribute(x, target=t, abs=True).amax(dim=1)
    torch.testing.assert_close(vanilla(model, x, t), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", MODELS)
def test_gradient_x_input_matches_captum(request, case):
    model, x, _ = _case(request, case)
    t = resolve_target(model, x)
    ref = captum_attr.InputXGradient(model).attribute(x, target=t).sum(dim=1)
    torch.testing.assert_close(gradient_x_input(model, x, t), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("rule,captum_rule", [("gausslegendre", "gausslegendre"),
                                               ("riemann_trapezoid", "riemann_trapezoid"),
                                               ("riemann_middle", "riemann_middle")])
def test_integrated_gradients_matches_captum(request, case, rule, captum_rule):
    model, x, _ = _case(request, case)
    t = resolve_target(model, x)
    n = 16
    # a black image ties every max-pool window of ResNet-18, where the two layouts' kernels route the gradient
    # to different (equally valid) pixels; a faint noise baseline has no ties
    noise = 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    x0 = torch.zeros_like(x) if case == "tiny" else noise
    ref = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=x0, target=t, n_steps=n, method=captum_rule).sum(dim=1)
    if rule == "riemann_trapezoid":
        # Captum's trapezoid puts the n points on linspace(0, 1, n) but weighs them 1/n (ends halved), so its
        # weights sum to (n-1)/n; ours are the textbook 1/(n-1), which sum to 1.
        ref = ref * n / (n - 1)
    # Captum's trapezoid points come from a float32 linspace, ours from float64: one ulp apart, which moves a
    # few ReLU units of ResNet-18 (largest gap 2.4e-4 of the map's range, mean 3e-6)
    atol = 5e-4 * float(ref.abs().max()) if rule == "riemann_trapezoid" and case == "resnet18" else 1e-6
    ours = integrated_gradients(model, x, t, baseline=x0, n_steps=n, rule=rule, batch_size=8)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("case", MODELS)
def test_occlusion_matches_captum(request, case):
    model, x, _ = _case(request, case)
    t = resolve_target(model, x)
    w, s = (4, 2) if case == "tiny" else (16, 8)
    c = x.shape[1]
    ref = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=(c, w, w), strides=(c, s, s),
                                                  baselines=0.0, target=t, perturbations_per_eval=16)
    ours = occlusion(model, x, t, window=w, stride=s, baseline=0.0, batch_size=32)
    torch.testing.assert_close(ours, ref[:, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", MODELS)
def test_gradcam_matches_captum_layergradcam(request, case):
    model, x, layer = _case(request, case)
    t = resolve_target(model, x)
    lgc = captum_attr.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
    ref = captum_attr.LayerAttribution.interpolate(lgc, tuple(x.shape[2:]), "bilinear")[:, 0]
    torch.testing.assert_close(gradcam(model, x, t), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ours,theirs", [(gradcam, "GradCAM"), (gradcam_pp, "GradCAMPlusPlus")])
def test_cams_match_pytorch_grad_cam(resnet18, x_resnet, ours, theirs):
    """pytorch-grad-cam min-max scales each map, so compare min-max normalised maps (atol 0.02)."""
    gc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    t = resolve_target(resnet18, x_resnet)
    with getattr(gc, theirs)(model=resnet18, target_layers=[resnet18.net.layer4]) as cam:
        ref = cam(input_tensor=x_resnet, targets=[ClassifierOutputTarget(int(i)) for i in t])
    mine = ours(resnet18, x_resnet, t).numpy()
    for i in range(len(t)):
        np.testing.assert_allclose(normalise(mine[i], "minmax"), ref[i], atol=0.02)
