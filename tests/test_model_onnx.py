"""ONNX models: onnx2torch conversion with the original's logits and gradients; onnxruntime when it cannot."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import normalised_reference
from saliencylab.cli import app
from saliencylab.errors import UserError
from saliencylab.methods import get_method
from saliencylab.methods._common import input_gradient
from saliencylab.models import Normalized, load_model

pytest.importorskip("onnx2torch")
pytest.importorskip("onnxruntime")
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


class Net(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
                                      nn.Conv2d(6, 6, 3, padding=1), nn.Tanh())
        self.pool = pool
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def _export(net: nn.Module, path, dynamic: bool = True) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.rand(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}} if dynamic else None)


def _x() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dynamic", [True, False])
def test_onnx_converts_with_the_original_logits_gradient_and_cam(tmp_path, dynamic):
    net = Net(nn.AdaptiveAvgPool2d(1))
    path = tmp_path / "net.onnx"
    _export(net, path, dynamic)
    clf = load_model(path, mean=MEAN, std=STD)
    assert clf.format == "onnx" and clf.gradients and clf.input_size == (16, 16) and clf.channels == 3
    x, target = _x(), torch.tensor([0, 2])
    logits, grad = normalised_reference(net, x, target, MEAN, STD)
    with torch.no_grad():
        torch.testing.assert_close(clf.module(x), logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(input_gradient(clf.module, x, target), grad, atol=1e-4 * float(grad.abs().max()),
                               rtol=0)
    # Grad-CAM on the converted graph equals Grad-CAM on the original at the same (last tanh) layer
    cam = get_method("gradcam").fn(clf.module, x, target)
    ref = get_method("gradcam").fn(Normalized(net, MEAN, STD, cam_layer="net.features.4").eval(), x, target)
    assert float(ref.amax()) > 0
    torch.testing.assert_close(cam, ref, atol=1e-4 * float(ref.amax()), rtol=0)


def test_onnx_operator_the_converter_lacks_runs_forward_only(tmp_path):
    """GlobalMaxPool has no onnx2torch converter: classify and occlusion work, gradients refuse naming it."""
    import onnx

    path = tmp_path / "maxpool.onnx"
    _export(Net(nn.AdaptiveAvgPool2d(1)), path)
    proto = onnx.load(str(path))
    pools = [n for n in proto.graph.node if n.op_type == "GlobalAveragePool"]
    assert len(pools) == 1
    pools[0].op_type = "GlobalMaxPool"  # a standard operator that onnxruntime runs and onnx2torch lacks
    onnx.save(proto, str(path))
    net = Net(nn.AdaptiveMaxPool2d(1))  # the same weights (same seed), with the max pool
    clf = load_model(path, mean=MEAN, std=STD)
    assert clf.format == "onnxruntime" and not clf.gradients
    x, target = _x(), torch.tensor([0, 2])
    logits, _ = normalised_reference(net, x, target, MEAN, STD)
    with torch.no_grad():
        torch.testing.assert_close(clf.module(x), logits, atol=1e-4, rtol=1e-4)
    occ = get_method("occlusion")
    opts = {"window": 4, "stride": 4} if "window" in occ.options() else {}
    ours = occ.fn(clf.module, x, target, **opts)
    ref = occ.fn(Normalized(net, MEAN, STD).eval(), x, target, **opts)
    torch.testing.assert_close(ours, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    for method in ("vanilla", "gradcam"):
        with pytest.raises(UserError, match="GlobalMaxPool .*forward only|cannot convert its operator GlobalMaxPool"):
            get_method(method).fn(clf.module, x, target)
    res = CliRunner().invoke(app, ["explain", "sample:chelsea", "--model", str(path), "--methods", "vanilla",
                                   "--out", str(tmp_path / "out")])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "GlobalMaxPool" in lines[0] and "opset_version=17" in lines[0]
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["classify", "sample:chelsea", "--model", str(path)])
    assert res.exit_code == 0 and "class_0" in res.output, res.output
    twin = copy.deepcopy(clf.module)  # the audit's randomisation copies models; sessions cannot be copied
    with torch.no_grad():
        torch.testing.assert_close(twin(x), logits, atol=1e-4, rtol=1e-4)


def test_bad_onnx_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    res = CliRunner().invoke(app, ["classify", "sample:chelsea", "--model", str(path)])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "not a valid ONNX model" in lines[0], res.output
