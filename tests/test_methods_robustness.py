"""What a demanding user hits on real models and inputs: an input that requires grad, CAM layers that return a
tuple, run twice, never run or have no spatial axes, and option values that only fail against the input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TinyCNN
from saliencylab.errors import UserError
from saliencylab.methods import METHODS
from saliencylab.methods.cam import gradcam, gradcam_pp
from saliencylab.methods.gradient import integrated_gradients
from saliencylab.methods.options import OptionError
from saliencylab.methods.perturbation import occlusion

FAST = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"n_steps": 4},
        "occlusion": {"window": 4, "stride": 4}, "rise": {"n_masks": 16, "grid": 4}}


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.family != "attention"])
def test_input_that_requires_grad_is_not_tied_to_the_map(name, x_small):
    """A map must not carry the caller's autograd graph (gradient x input returned x's graph: `.numpy()` failed)."""
    model = TinyCNN().eval()
    x = x_small.clone().requires_grad_(True)
    t = torch.tensor([0, 2])
    out = METHODS[name].fn(model, x, t, **FAST.get(name, {}))
    assert not out.requires_grad and out.grad_fn is None and x.grad is None
    ref = METHODS[name].fn(model, x_small, t, **FAST.get(name, {}))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.numpy()


class TupleBlock(nn.Module):
    """A block that returns (features, attention-like side output), as some backbones do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean(1)


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TupleBlock()
        self.shared = nn.ReLU()
        self.unused = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y, _side = self.block(x)
        y = self.shared(self.head(self.shared(y)))  # `shared` runs twice
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("method", [gradcam, gradcam_pp])
@pytest.mark.parametrize("layer,words", [
    ("block", "the CAM layer 'block' returns a tuple, not a tensor; name another layer"),
    ("shared", "the CAM layer 'shared' runs more than once per forward pass"),
    ("unused", "the CAM layer 'unused' does not run in the forward pass"),
    ("fc", "the CAM layer 'fc' outputs shape (2, 3), not [B, C, *spatial]"),
])
def test_unusable_cam_layers_are_named_in_one_line(method, layer, words, x_small):
    model = TupleNet().train()
    model.block.eval()
    with pytest.raises(UserError) as info:
        method(model, x_small, torch.tensor([0, 1]), layer=layer)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert _hooks(model) == 0
    assert model.training and not model.block.training and model.head.training


def test_cam_on_the_inner_conv_of_a_tuple_block_works(x_small):
    model = TupleNet().eval()
    out = gradcam(model, x_small, torch.tensor([0, 1]), layer="block.conv", relu=False)
    assert out.shape == (2, 16, 16) and out.abs().max() > 0


def test_occlusion_window_larger_than_the_input_names_the_option():
    model = TinyCNN().eval()
    with pytest.raises(OptionError, match=r"occlusion window=32 is larger than the input \(16, 16\)"):
        occlusion(model, torch.rand(1, 3, 16, 16), torch.tensor([0]))
    with pytest.raises(OptionError, match="one per spatial axis"):
        occlusion(model, torch.rand(1, 3, 16, 16), torch.tensor([0]), window=(4, 4, 4))


def test_baseline_tensor_of_the_wrong_shape_names_the_option():
    model = TinyCNN().eval()
    with pytest.raises(OptionError, match=r"baseline of shape \(3, 8, 8\) does not broadcast"):
        integrated_gradients(model, torch.rand(1, 3, 16, 16), torch.tensor([0]), n_steps=2,
                             baseline=torch.zeros(3, 8, 8))
