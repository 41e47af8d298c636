"""Method options are parsed and checked from their annotations, the same way from the CLI and from Python,
and refused with one line naming the option before any work is done."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from saliencylab.cli import app
from saliencylab.errors import UserError
from saliencylab.methods import METHODS, get_method
from saliencylab.methods.cam import gradcam
from saliencylab.methods.options import OptionError
from saliencylab.methods.registry import parse_method_options


def _text(value) -> str:
    """How a user writes a default on the command line."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("name", list(METHODS))
def test_defaults_fit_their_own_annotations_and_parse_back(name):
    spec = METHODS[name]
    spec.check_options(spec.options())
    for option, default in spec.options().items():
        if isinstance(default, (int, float, str, bool, tuple, type(None))):
            assert spec.parse_option(option, _text(default)) == default, option


BAD = [  # (pair, words the one-line message must contain)
    ("smoothgrad.n_samples=0", "n_samples takes an integer >= 1"),
    ("smoothgrad.n_samples=-4", "n_samples takes an integer >= 1"),
    ("smoothgrad.n_samples=2.5", "'2.5' is not an integer"),
    ("smoothgrad.noise_level=-0.1", "noise_level takes a number >= 0"),
    ("smoothgrad.noise_level=inf", "not a finite number"),
    ("smoothgrad.batch_size=0", "batch_size takes an integer >= 1 or none"),
    ("smoothgrad.seed=x", "seed takes an integer"),
    ("integrated_gradients.n_steps=abc", "'abc' is not a number; n_steps takes an integer >= 1"),
    ("integrated_gradients.rule=simpson", "rule takes one of gausslegendre, riemann_left"),
    ("integrated_gradients.baseline=grey", "baseline takes black, blur, a number"),
    ("gradcam.relu=maybe", "relu takes true or false"),
    ("occlusion.window=8,0", "window takes an integer >= 1 or a comma-separated list"),
    ("occlusion.stride=-1", "stride takes an integer >= 1"),
    ("rise.p_keep=0", "p_keep takes a number in (0, 1]"),
    ("rise.p_keep=1.5", "p_keep takes a number in (0, 1]"),
    ("rise.n_masks=0", "n_masks takes an integer >= 1"),
    ("rise.grid=-7", "grid takes an integer >= 1"),
    ("spectral_residual.avg_size=4", "avg_size takes an odd integer >= 1"),
    ("spectral_residual.sigma=-1", "sigma takes a number >= 0"),
]


@pytest.mark.parametrize("pair,words", BAD)
def test_parse_refuses_bad_values_naming_the_option(pair, words):
    spec = get_method(pair.split(".")[0])
    with pytest.raises(OptionError) as info:
        parse_method_options([pair], [spec])
    message = str(info.value)
    assert message.startswith(f"--set {pair}:") and words in message and "\n" not in message, message
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_options_are_converted_from_the_annotation_not_the_default():
    specs = [get_method(n) for n in ("gradcam", "occlusion", "integrated_gradients", "smoothgrad", "rise")]
    opts = parse_method_options(["gradcam.layer=1", "occlusion.window=8,4", "occlusion.baseline=0.5",
                                 "integrated_gradients.baseline=blur", "smoothgrad.batch_size=none",
                                 "rise.p_keep=1", "integrated_gradients.n_steps=7"], specs)
    assert opts["gradcam"] == {"layer": "1"}  # a layer name, not the integer 1
    assert opts["occlusion"] == {"window": (8, 4), "baseline": 0.5}
    assert opts["integrated_gradients"] == {"baseline": "blur", "n_steps": 7}
    assert opts["smoothgrad"] == {"batch_size": None}
    assert opts["rise"] == {"p_keep": 1.0} and isinstance(opts["rise"]["p_keep"], float)
    assert parse_method_options([], specs, batch_size=8)["rise"] == {"batch_size": 8}
    assert parse_method_options([], specs, batch_size=8)["gradcam"] == {}


def test_rules_between_options_are_checked_up_front():
    spec = get_method("integrated_gradients")
    with pytest.raises(OptionError, match="rule=riemann_trapezoid needs n_steps >= 2"):
        parse_method_options(["integrated_gradients.rule=riemann_trapezoid", "integrated_gradients.n_steps=1"],
                             [spec])


def test_layer_named_1_reaches_gradcam_as_a_name():
    """`--set gradcam.layer=1` on an nn.Sequential: the second module, named '1'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 8, 8)
    t = torch.tensor([0, 2])
    layer = parse_method_options(["gradcam.layer=1"], [get_method("gradcam")])["gradcam"]["layer"]
    acts = model[1](model[0](x)).detach()  # (B, 4, 8, 8)
    alpha = model[4].weight.detach()[t] / 64  # d score / d A_k is w_tk / (h w) at every pixel: its mean too
    expected = (alpha[:, :, None, None] * acts).sum(1).clamp(min=0)  # the layer's grid is the input's
    torch.testing.assert_close(gradcam(model, x, t, layer=layer), expected, rtol=1e-5, atol=1e-7)


class Counting(nn.Module):
    """A model that counts its forward passes: a refusal must come before any of them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)
        self.calls = 0
        self.cam_layer = "conv"

    def forward(self, x):
        self.calls += 1
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("name,options,words", [
    ("smoothgrad", {"n_samples": 0}, "smoothgrad(n_samples=0): 0 is out of range; n_samples takes an integer >= 1"),
    ("smoothgrad", {"n_samples": -1}, "n_samples takes an integer >= 1"),
    ("smoothgrad", {"n_samples": 2.0}, "2.0 is not an integer"),
    ("smoothgrad", {"n_samples": True}, "True is not an integer"),
    ("smoothgrad", {"batch_size": 0}, "batch_size takes an integer >= 1 or none"),
    ("integrated_gradients", {"n_steps": "8"}, "'8' is not an integer"),
    ("integrated_gradients", {"rule": "simpson"}, "rule takes one of"),
    ("integrated_gradients", {"rule": "riemann_trapezoid", "n_steps": 1}, "needs n_steps >= 2"),
    ("integrated_gradients", {"baseline": "grey"}, "baseline takes black, blur, a number, or a tensor"),
    ("occlusion", {"window": (2, 0)}, "window takes an integer >= 1"),
    ("rise", {"p_keep": 0.0}, "p_keep takes a number in (0, 1]"),
    ("rise", {"n_masks": 0}, "n_masks takes an integer >= 1"),
    ("gradcam", {"layer": 1}, "layer=1"),
    ("gradcam", {"relu": "no"}, "relu takes true or false"),
    ("spectral_residual", {"avg_size": 2}, "avg_size takes an odd integer"),
])
def test_python_callers_get_the_same_checks_before_any_work(name, options, words):
    model = Counting()
    with pytest.raises(ValueError) as info:
        METHODS[name].fn(model, torch.rand(1, 3, 8, 8), torch.tensor([1]), **options)
    assert isinstance(info.value, UserError) and words in str(info.value) and "\n" not in str(info.value)
    assert model.calls == 0


def test_python_values_of_the_right_kind_pass():
    import numpy as np

    model = Counting()
    x, t = torch.rand(1, 3, 8, 8), torch.tensor([1])
    METHODS["smoothgrad"].fn(model, x, t, n_samples=np.int64(2), noise_level=0, batch_size=None)
    METHODS["integrated_gradients"].fn(model, x, t, n_steps=2, baseline=torch.zeros(1, 3, 8, 8))
    METHODS["occlusion"].fn(model, x, t, window=[4, 2], stride=(4, 2), baseline="blur")
    assert model.calls > 0


runner = CliRunner()


@pytest.mark.parametrize("pair,words", [
    ("smoothgrad.n_samples=0", "smoothgrad.n_samples=0: 0 is out of range; n_samples takes an integer >= 1"),
    ("smoothgrad.n_samples=-3", "n_samples takes an integer >= 1"),
    ("integrated_gradients.n_steps=abc", "integrated_gradients.n_steps=abc: 'abc' is not a number; n_steps takes"),
    ("integrated_gradients.rule=simpson", "rule takes one of"),
    ("rise.p_keep=2", "p_keep takes a number in (0, 1]"),
])
def test_cli_refuses_bad_option_values_before_writing(tmp_path, pair, words):
    out = tmp_path / "o"
    method = pair.split(".")[0]
    res = runner.invoke(app, ["explain", "sample:chelsea", "--model", "torchvision:resnet18", "--weights", "random",
                              "--methods", method, "--set", pair, "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --set ") and words in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_methods_listing_shows_types_and_ranges():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    rows = [ln.split(None, 2) for ln in res.output.splitlines() if ln.startswith("    ")]  # OPTION DEFAULT ALLOWED
    assert ["n_samples", "32", "an integer >= 1"] in rows
    assert any(r[:2] == ["rule", "'gausslegendre'"] and r[2].startswith("one of gausslegendre, riemann_left")
               for r in rows)
    assert ["p_keep", "0.5", "a number in (0, 1]"] in rows
    data = json.loads(runner.invoke(app, ["methods", "--json"]).output)
    assert data["smoothgrad"]["options"]["n_samples"] == 32
    assert data["smoothgrad"]["option_types"]["n_samples"]["min"] == 1
    assert data["integrated_gradients"]["option_types"]["rule"]["choices"][0] == "gausslegendre"
    assert data["rise"]["option_types"]["p_keep"]["min_open"] is True
    assert data["gradcam"]["option_types"]["layer"]["nullable"] is True
    assert set(data) == set(METHODS)
