"""Bring your own model: each format loads into the same Classifier, with the original's logits and gradients.

Tiny models are built inside each test; nothing is downloaded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from conftest import normalised_reference
from saliencylab.cli import app
from saliencylab.errors import UserError
from saliencylab.methods import get_method
from saliencylab.methods._common import input_gradient
from saliencylab.models import load_model

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def cli(*args: str):
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output


def one_line_error(code: int, output: str, *needles: str) -> None:
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), output
    for n in needles:
        assert n in lines[0], (n, lines[0])


class SmallNet(nn.Module):
    """conv -> BN -> SiLU -> conv -> SiLU -> mean -> linear(3): smooth, so gradients compare tightly."""

    def __init__(self, channels: int = 3, k: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU(),
                                      nn.Conv2d(6, 6, 3, padding=1), nn.SiLU())
        self.head = nn.Linear(6, k)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.features[1].running_mean.uniform_(-0.1, 0.1, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def factory() -> nn.Module:
    return SmallNet()


def _x(n: int = 2, c: int = 3, s: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def _check_against(clf, net: nn.Module, tol: float = 1e-5) -> None:
    x, target = _x(), torch.tensor([0, 2])
    logits, grad = normalised_reference(net, x, target, MEAN, STD)
    with torch.no_grad():
        torch.testing.assert_close(clf.module(x), logits, atol=tol, rtol=tol)
    ours = input_gradient(clf.module, x, target)  # what vanilla gradient and friends differentiate
    scale = grad.abs().amax()
    torch.testing.assert_close(ours, grad, atol=tol * float(scale), rtol=0)


# ---------------------------------------------------------------- TorchScript and torch.export

def _save_script(net: nn.Module, path: Path, trace: bool = False) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(net.eval(), _x(1)) if trace else torch.jit.script(net.eval())
        torch.jit.save(scripted, str(path))
    return path


@pytest.mark.parametrize("trace", [False, True])
def test_torchscript_logits_and_gradient_match(tmp_path, trace):
    net = SmallNet()
    path = _save_script(net, tmp_path / "net.pt", trace)
    clf = load_model(path, input_size=16, mean=MEAN, std=STD, classes=["a", "b", "c"])
    assert clf.format == "torchscript" and clf.num_outputs == 3 and clf.class_names == ["a", "b", "c"]
    _check_against(clf, net)
    with pytest.raises(UserError, match="TorchScript runs its layers as one compiled graph"):
        get_method("gradcam").fn(clf.module, _x(), torch.tensor([0, 1]))


def test_export_program_declares_its_shape_and_matches(tmp_path):
    net = SmallNet().eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (_x(1),)), str(path))
    clf = load_model(path, mean=MEAN, std=STD)
    assert clf.format == "export" and clf.input_size == (16, 16) and clf.channels == 3
    _check_against(clf, net)
    with pytest.raises(UserError, match="--channels 1 contradicts torch.export program .*, which says 3"):
        load_model(path, channels=1)


class TupleNet(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean((2, 3)), x.amax((2, 3))


class MapNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.mark.parametrize(("net", "what"), [(TupleNet(), "returns tuple"), (MapNet(), "shape (1, 3, 8, 8)")])
def test_torchscript_of_a_non_classifier_is_refused(tmp_path, net, what):
    path = _save_script(net, tmp_path / "bad.pt")
    code, out = cli("classify", "sample:chelsea", "--model", str(path), "--input-size", "8")
    one_line_error(code, out, str(path), what, "not logits")


def test_torchscript_without_size_and_with_a_sidecar(tmp_path):
    net = SmallNet()
    path = _save_script(net, tmp_path / "net.pt")
    code, out = cli("classify", "sample:chelsea", "--model", str(path))
    one_line_error(code, out, "does not say its input size", "--input-size", "model.json")
    (tmp_path / "model.json").write_text(json.dumps({"input_size": [16, 16], "mean": list(MEAN), "std": list(STD),
                                                     "classes": ["cat", "dog", "cow"]}))
    clf = load_model(path)
    assert clf.input_size == (16, 16) and clf.class_names == ["cat", "dog", "cow"]
    _check_against(clf, net)
    assert load_model(path, input_size=(20, 24)).input_size == (20, 24)  # flags win over model.json
    code, out = cli("classify", "sample:chelsea", "--model", str(path), "--classes", "a,b")
    one_line_error(code, out, "3 outputs but 2 class names")
    code, out = cli("classify", "sample:chelsea", "--model", str(path), "--weights", "w.pt")
    one_line_error(code, out, "carries its own weights")


def test_torchscript_through_the_cli(tmp_path):
    path = _save_script(SmallNet(), tmp_path / "net.pt")
    img = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(img)
    code, out = cli("classify", str(img), "--model", str(path), "--input-size", "16", "--mean", "0.4,0.5,0.6",
                    "--std", "0.2,0.25,0.3", "--classes", "cat,dog,cow", "--top-k", "3")
    assert code == 0 and "cat" in out and "cow" in out, out
    code, out = cli("explain", str(img), "--model", str(path), "--input-size", "16", "--methods", "gradcam",
                    "--out", str(tmp_path / "out"))
    one_line_error(code, out, "TorchScript", "no layer can be hooked")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- any nn.Module, package.module:factory

def test_module_and_factory(tmp_path, monkeypatch):
    net = SmallNet()
    clf = load_model(net, input_size=16, mean=MEAN, std=STD)
    assert clf.format == "module" and clf.cam_layer is None
    _check_against(clf, net)
    torch.manual_seed(1)
    other = SmallNet()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    weights = tmp_path / "w.pt"
    torch.save(other.state_dict(), weights)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    clf = load_model("test_model_formats:factory", weights=str(weights), input_size=16, mean=MEAN, std=STD)
    _check_against(clf, other)
    # CAM on a plain module: the search finds the last conv stage, and Grad-CAM runs
    cam = get_method("gradcam").fn(clf.module, _x(), torch.tensor([0, 1]))
    assert cam.shape == (2, 16, 16) and float(cam.amax()) > 0


def test_factory_errors(tmp_path):
    code, out = cli("classify", "sample:chelsea", "--model", "no_such_pkg.models:build", "--input-size", "16")
    one_line_error(code, out, "cannot import 'no_such_pkg.models'", "PYTHONPATH")
    code, out = cli("classify", "sample:chelsea", "--model", "json:nothing_here", "--input-size", "16")
    one_line_error(code, out, "has no callable 'nothing_here'")


def test_contradicting_and_malformed_flags(tmp_path):
    code, out = cli("classify", "sample:chelsea", "--model", "torchvision:resnet18", "--weights", "random",
                    "--channels", "1")
    one_line_error(code, out, "--channels 1 contradicts torchvision:resnet18, which says 3")
    code, out = cli("classify", "sample:chelsea", "--model", "torchvision:resnet18", "--weights", "random",
                    "--input-size", "big")
    one_line_error(code, out, "--input-size big")
    clf = load_model("torchvision:resnet18", weights="random", input_size=64)
    assert clf.input_size == (64, 64)
