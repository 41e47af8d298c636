"""Grad-CAM and Grad-CAM++ on one model of every torchvision CNN family, at its default CAM layer and at an
inner layer whose output the network then changes in place (`F.relu(..., inplace=True)`, `out += identity`).

Random weights, small inputs, float64. The reference is a hand computation on the same layer that reads the
gradient through an added zero tensor (a different mechanism from ours), then applies each paper's formula.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from saliencylab.methods._common import eval_mode, layer_by_name
from saliencylab.methods.cam import gradcam, gradcam_pp, layer_activation_and_gradient
from saliencylab.models import Normalized, find_cam_layer

# name: (input side, inner layer, what the network does to the inner layer's output next)
FAMILIES = {
    "resnet18": (64, "net.layer3.0.bn2", "out += identity"),
    "densenet121": (64, "net.features.denseblock2.denselayer1.norm1", "ReLU(inplace=True)"),
    "mobilenet_v2": (64, "net.features.1.conv.0.1", "ReLU6(inplace=True)"),
    "mobilenet_v3_small": (64, "net.features.3.block", "result += input"),
    "efficientnet_b0": (64, "net.features.1.0.block.0.1", "SiLU(inplace=True)"),
    "vgg11": (64, "net.features.0", "ReLU(inplace=True)"),
    "convnext_tiny": (64, "net.features.1.0", "another CNBlock"),
    "regnet_x_400mf": (64, "net.trunk_output.block1.block1-0.f.a.1", "ReLU(inplace=True)"),
    "shufflenet_v2_x0_5": (64, "net.conv1.1", "ReLU(inplace=True)"),
    "squeezenet1_1": (64, "net.features.3.squeeze", "ReLU(inplace=True)"),
    "mnasnet0_5": (64, "net.layers.1", "ReLU(inplace=True)"),
    "googlenet": (64, "net.conv1.bn", "F.relu(inplace=True)"),
    "inception_v3": (96, "net.Conv2d_1a_3x3.bn", "F.relu(inplace=True)"),
}
# the default layers (found by models.find_cam_layer) of DenseNet and the inner layers above are all followed
# by an in-place operation; before the fix every one of them raised "a leaf Variable that requires grad ..."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Float64 convolutions of 13 networks: on a busy 2-core machine, torch's default threads spun for 15x the
    CPU time of one thread (535 s against 41 s, measured); the previous setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "vgg11":  # VGG's 25088 x 4096 head costs seconds to initialise; the CAM layers are in `features`
        from torchvision.models.vgg import VGG, cfgs, make_layers

        net = VGG(make_layers(cfgs["A"]), num_classes=10, init_weights=False)
        net.classifier = nn.Linear(512 * 7 * 7, 10)
    else:
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        net = getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)
    if name == "squeezenet1_1":
        # its default init (Kaiming-uniform, zero bias) leaves every unit of the random net's last conv dead at
        # 64 px, so every map is zero; small positive biases keep units alive without changing the layout
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.uniform_(m.bias, 0.0, 0.1)
    return Normalized(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).double().eval()


def _reference(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
               layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM (Selvaraju et al., eq. 1-2) and Grad-CAM++ (Chattopadhay et al., eq. 19) on the layer's grid
    [B, 1, h, w], without the ReLU.

    The activation A is copied when the layer runs; dScore/dA is the gradient w.r.t. a zero tensor added to it.
    """
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, _i, out):
        seen["a"] = out.detach().clone()
        seen["z"] = torch.zeros_like(out, requires_grad=True)
        return out + seen["z"]

    handle = layer_by_name(model, layer).register_forward_hook(hook)
    try:
        with eval_mode(model), torch.enable_grad():
            logits = model(x)
            (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), seen["z"])
    finally:
        handle.remove()
    a = seen["a"]
    w = g.mean(dim=(2, 3), keepdim=True)
    g2, g3 = g**2, g**3
    den = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(den != 0, g2 / torch.where(den != 0, den, 1.0), 0.0)
    w_pp = (alpha * g.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    return (w * a).sum(dim=1, keepdim=True), (w_pp * a).sum(dim=1, keepdim=True)


def _up(cam: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, float64 model, input, {layer: (Grad-CAM, Grad-CAM++) reference maps on the layer's grid})."""
    name = request.param
    side, inner, _ = FAMILIES[name]
    model = _build(name)
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([3, 7])
    refs = {layer: _reference(model, x, t, layer) for layer in (find_cam_layer(model, x), inner)}
    return name, model, x, t, refs


@pytest.mark.parametrize("where", ["default", "inner"])
@pytest.mark.parametrize("method", [gradcam, gradcam_pp], ids=["gradcam", "gradcam_pp"])
def test_cam_matches_hand_computation(family, where, method):
    name, model, x, t, refs = family
    layer = list(refs)[0 if where == "default" else 1]
    low = refs[layer][method is gradcam_pp]
    ref = _up(low, x.shape[2:])
    scale = float(ref.abs().max())
    assert scale > 0, f"{name} {layer}: the reference map is zero; the test would prove nothing"
    # the default: the method finds the layer itself, as for a user's model
    raw = method(model, x, t, relu=False, **({} if where == "default" else {"layer": layer}))
    torch.testing.assert_close(raw, ref, rtol=1e-6, atol=1e-9 * scale)
    if where == "inner" and method is gradcam:  # the papers' ReLU comes before the upsampling
        relu = _up(low.clamp(min=0), x.shape[2:])
        torch.testing.assert_close(method(model, x, t, layer=layer), relu, rtol=1e-6, atol=1e-9 * scale)


def test_recorded_activation_is_the_layers_output_not_the_in_place_result():
    """DenseNet's head runs F.relu(features, inplace=True) on norm5's output: the activations Grad-CAM weighs
    are norm5's (signed), not the ReLU's."""
    model = _build("densenet121")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    acts, grads = layer_activation_and_gradient(model, x, torch.tensor([2]), "net.features")
    with torch.no_grad():
        expected = model.net.features((x - model.mean) / model.std)
    torch.testing.assert_close(acts, expected, rtol=1e-9, atol=1e-12)
    assert acts.min() < 0  # a post-ReLU copy would be >= 0
    assert grads.shape == acts.shape and grads.abs().sum() > 0
