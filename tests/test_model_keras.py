"""Keras 3 models (.keras, .h5) through Keras' torch backend: predictions, gradients, NHWC Grad-CAM, bad files.

Keras is imported with KERAS_BACKEND=torch (set by the adapter before the first import).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saliencylab.cli import app
from saliencylab.errors import UserError
from saliencylab.methods import get_method
from saliencylab.methods._common import input_gradient
from saliencylab.models import load_model
from saliencylab.ops import resize

if importlib.util.find_spec("keras") is None:  # not importorskip: that would import it on the default backend
    pytest.skip("needs the keras extra", allow_module_level=True)
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def keras():
    from saliencylab.models.formats.keras import import_keras

    return import_keras()


def _sequential(keras, final: str = "sigmoid", k: int = 1, rescale: bool = True):
    """The article's shape, small: conv/pool blocks, dense, dropout, a sigmoid (or softmax) dense."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input((16, 16, 3))]
    if rescale:
        layers.append(keras.layers.Rescaling(1 / 255.0))
    layers += [keras.layers.Conv2D(4, 3, activation="relu", padding="same"), keras.layers.MaxPooling2D(),
               keras.layers.Conv2D(5, 3, activation="tanh", padding="same", name="lastconv"),
               keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(8, activation="relu"),
               keras.layers.Dropout(0.5), keras.layers.Dense(k, activation=final, name="out")]
    return keras.Sequential(layers)


def _x(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _pre_activation(model, pixels_nhwc: torch.Tensor, keras) -> tuple[torch.Tensor, torch.Tensor]:
    """The original model run layer by layer: (activations of lastconv [B, H, W, C], pre-activation logits)."""
    h, acts = pixels_nhwc, None
    for layer in model.layers:
        if layer.name == "out":
            z = torch.matmul(h, layer.kernel.value) + layer.bias.value  # Dense without its activation
            return acts, z
        h = layer(h, training=False)
        if layer.name == "lastconv":
            acts = h
    raise AssertionError("no output layer")


def test_keras_sigmoid_model_logit_gradient_and_gradcam(tmp_path, keras):
    model = _sequential(keras)
    path = tmp_path / "model.keras"
    model.save(path)
    clf = load_model(path)
    assert clf.format == "keras" and clf.binary and clf.channels == 3 and clf.input_size == (16, 16)
    assert clf.score.startswith("pre-sigmoid logit") and clf.layout.kind == "nhwc"
    assert clf.cam_layer == "net.layers.lastconv"
    x = _x()
    with torch.no_grad():
        ours = clf.module(x)
        # Rescaling honoured: the original model is fed 0..255 pixels, and our wrapper feeds exactly that
        probs = model(x.permute(0, 2, 3, 1) * 255, training=False)
    torch.testing.assert_close(torch.sigmoid(ours), probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, torch.logit(probs.double()).float(), atol=1e-4, rtol=1e-4)
    # the input gradient equals torch autograd through the original Keras model's pre-sigmoid logit
    target = torch.tensor([1, 0])
    xr = x.clone().requires_grad_(True)
    _, z = _pre_activation(model, xr.permute(0, 2, 3, 1) * 255, keras)
    (ref,) = torch.autograd.grad((z[:, 0] * torch.tensor([1.0, -1.0])).sum(), xr)
    grad = input_gradient(clf.module, x, target)
    torch.testing.assert_close(grad, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    # Grad-CAM by hand in NHWC: weights are the gradients averaged over H and W (axes 1, 2), not over H and C
    a = xr.detach().permute(0, 2, 3, 1).mul(255)
    acts, z = _pre_activation(model, a, keras)
    (ga,) = torch.autograd.grad((z[:, 0] * torch.tensor([1.0, -1.0])).sum(), acts)
    cam_ref = (ga.mean((1, 2), keepdim=True) * acts).sum(-1).clamp(min=0)  # (B, H, W)
    cam_ref = resize(cam_ref[:, None].detach(), (16, 16))[:, 0]
    cam = get_method("gradcam").fn(clf.module, x, target)
    assert float(cam_ref.amax()) > 0
    torch.testing.assert_close(cam, cam_ref, atol=1e-4 * float(cam_ref.amax()), rtol=0)


def test_keras_softmax_h5_without_rescaling(tmp_path, keras):
    model = _sequential(keras, final="softmax", k=3, rescale=False)
    path = tmp_path / "model.h5"
    model.save(path)  # Keras 3's legacy HDF5 writer
    clf = load_model(path, classes=["a", "b", "c"], mean=0.5, std=0.25)
    assert clf.num_outputs == 3 and clf.score.startswith("pre-softmax") and clf.class_names == ["a", "b", "c"]
    x = _x()
    with torch.no_grad():
        probs = model(((x - 0.5) / 0.25).permute(0, 2, 3, 1), training=False)
        torch.testing.assert_close(clf.module(x).softmax(1), probs, atol=1e-5, rtol=0)


def test_tf_keras_2_h5_fixture():
    """A full-model .h5 written by TensorFlow's own Keras (see tests/fixtures/README.md); TF's numbers recorded."""
    path = FIXTURES / "tf_keras2_cnn.h5"
    ref = np.load(FIXTURES / "tf_keras2_cnn.npz")
    clf = load_model(path)
    x = torch.from_numpy(ref["x"]).permute(0, 3, 1, 2).float()  # the NHWC pixels TF saw, in [0, 1]
    with torch.no_grad():
        logits = clf.module(x)
    torch.testing.assert_close(torch.sigmoid(logits).numpy(), ref["probs"], atol=1e-5, rtol=0)
    grad = input_gradient(clf.module, x, torch.ones(len(x), dtype=torch.long)).permute(0, 2, 3, 1).numpy()
    scale = np.abs(ref["logit_grad"]).max()
    np.testing.assert_allclose(grad, ref["logit_grad"], atol=1e-4 * scale, rtol=0)


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output


@pytest.mark.parametrize("case", ["corrupt", "weights_only", "savedmodel", "mean_with_rescaling"])
def test_bad_keras_inputs_are_one_line(tmp_path, keras, case):
    if case == "corrupt":
        path = tmp_path / "model.keras"
        path.write_bytes(b"PK\x03\x04 not really a zip")
        needle = "not a readable .keras file"
    elif case == "weights_only":
        model = _sequential(keras)
        model.save_weights(tmp_path / "w.weights.h5")
        path = tmp_path / "w.h5"
        os.replace(tmp_path / "w.weights.h5", path)
        needle = "weights only (no model_config)"
    elif case == "savedmodel":
        path = tmp_path / "saved"
        path.mkdir()
        (path / "saved_model.pb").write_bytes(b"")
        needle = "TensorFlow SavedModel"
    else:
        path = tmp_path / "model.keras"
        _sequential(keras).save(path)
        needle = "rescales its input itself"
    extra = ["--mean", "0.5"] if case == "mean_with_rescaling" else []
    code, out = _cli("classify", "sample:chelsea", "--model", str(path), *extra)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and str(path) in lines[0], out
    with pytest.raises(UserError):
        load_model(path, **({"mean": 0.5} if extra else {}))


def test_keras_imported_with_another_backend_is_named(monkeypatch, keras):
    from saliencylab.models.formats import keras as adapter

    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    with pytest.raises(UserError, match="already imported with the tensorflow backend.*KERAS_BACKEND=torch"):
        adapter.import_keras()
