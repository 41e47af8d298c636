"""Agreement with Captum and pytorch-grad-cam on the same models and inputs.

Every comparison runs in float64 (model and input) with tolerances relative to each map's scale: float32
gradients of a random ResNet-18 are ill-conditioned (in Captum's as in ours), so a float32 comparison at a
fixed absolute tolerance passes or fails with the CPU's kernels. Measured gaps in float64, with the native
and with ATEN_CPU_CAPABILITY=default kernels: 0 (vanilla, gradient x input, Grad-CAM), 5e-16 (IG, Riemann
rules), 5.5e-9 (IG, Gauss-Legendre), 4e-8 (occlusion) of the map's largest value.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from saliencylab.methods import resolve_target
from saliencylab.methods.cam import gradcam, gradcam_pp
from saliencylab.methods.gradient import gradient_x_input, integrated_gradients, vanilla
from saliencylab.methods.perturbation import occlusion
from saliencylab.render import normalise

captum_attr = pytest.importorskip("captum.attr")


RTOL = 1e-6  # of the reference map's largest absolute value; a wrong map is off by O(1)


@pytest.fixture(scope="module")
def resnet18_64(resnet18):
    return copy.deepcopy(resnet18).double()


def _case(request, name):
    """Float64 model, input and CAM layer; the input is channels-last, the layout our methods compute in."""
    if name == "tiny":
        model = request.getfixturevalue("tiny").double()
        x, layer = request.getfixturevalue("x_small"), model.act2
    else:
        model = request.getfixturevalue("resnet18_64")
        x, layer = request.getfixturevalue("x_resnet"), model.net.layer4
    return model, x.double().contiguous(memory_format=torch.channels_last), layer


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    ref = ref.detach()
    assert ours.dtype == torch.float64 and float(ref.abs().max()) > 0
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=rtol, atol=rtol * float(ref.abs().max()))


MODELS = ["tiny", "resnet18"]


@pytest.mark.parametrize("case", MODELS)
def test_vanilla_matches_captum_saliency(request, case):
    model, x, _ = _case(request, case)
    t = resolve_target(model, x)
    ref = captum_attr.Saliency(model).attribute(x, target=t, abs=True).amax(dim=1)
    _close(vanilla(model, x, t), ref)


@pytest.mark.parametrize("case", MODELS)
def test_gradient_x_input_matches_captum(request, case):
    model, x, _ = _case(request, case)
    t = resolve_target(model, x)
    ref = captum_attr.InputXGradient(model).attribute(x, target=t).sum(dim=1)
    _close(gradient_x_input(model, x, t), ref)


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("rule,captum_rule", [("gausslegendre", "gausslegendre"),
                                               ("riemann_trapezoid", "riemann_trapezoid"),
                                               ("riemann_middle", "riemann_middle")])
def test_integrated_gradients_matches_captum(request, case, rule, captum_rule):
    model, x, _ = _case(request, case)
    t = resolve_target(model, x)
    n = 8
    # a black image ties every max-pool window of ResNet-18, where the two layouts' kernels route the gradient
    # to different (equally valid) pixels; a faint noise baseline has no ties
    noise = 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x0 = torch.zeros_like(x) if case == "tiny" else noise
    ref = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=x0, target=t, n_steps=n, method=captum_rule).sum(dim=1)
    if rule == "riemann_trapezoid":
        # Captum's trapezoid puts the n points on linspace(0, 1, n) but weighs them 1/n (ends halved), so its
        # weights sum to (n-1)/n; ours are the textbook 1/(n-1), which sum to 1.
        ref = ref * n / (n - 1)
    _close(integrated_gradients(model, x, t, baseline=x0, n_steps=n, rule=rule, batch_size=8), ref)


@pytest.mark.parametrize("case", MODELS)
def test_occlusion_matches_captum(request, case):
    model, x, _ = _case(request, case)
    t = resolve_target(model, x)
    w, s = (4, 2) if case == "tiny" else (16, 12)  # overlapping windows
    c = x.shape[1]
    ref = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=(c, w, w), strides=(c, s, s),
                                                  baselines=0.0, target=t, perturbations_per_eval=16)
    _close(occlusion(model, x, t, window=w, stride=s, baseline=0.0, batch_size=32), ref[:, 0])


@pytest.mark.parametrize("case", MODELS)
def test_gradcam_matches_captum_layergradcam(request, case):
    model, x, layer = _case(request, case)
    t = resolve_target(model, x)
    lgc = captum_attr.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
    ref = captum_attr.LayerAttribution.interpolate(lgc, tuple(x.shape[2:]), "bilinear")[:, 0]
    _close(gradcam(model, x, t), ref)


@pytest.mark.parametrize("ours,theirs", [(gradcam, "GradCAM"), (gradcam_pp, "GradCAMPlusPlus")])
def test_cams_match_pytorch_grad_cam(resnet18_64, x_resnet, ours, theirs):
    """pytorch-grad-cam min-max scales each map (then resizes it with OpenCV), so compare min-max normalised maps
    (atol 0.02: the order of scaling and resizing moves the extremes)."""
    gc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = x_resnet.double()
    t = resolve_target(resnet18_64, x)
    with getattr(gc, theirs)(model=resnet18_64, target_layers=[resnet18_64.net.layer4]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in t])
    mine = ours(resnet18_64, x, t).numpy()
    assert all(np.ptp(r) > 0.5 for r in ref)  # maps with structure, not constants
    for i in range(len(t)):
        np.testing.assert_allclose(normalise(mine[i], "minmax"), ref[i], atol=0.02)
