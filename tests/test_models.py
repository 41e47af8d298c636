"""The model registry: the embedded ImageNet model, weight rules, CAM layers, checkpoints."""

from __future__ import annotations

import pytest
import torch

from saliencylab.errors import UserError
from saliencylab.models import find_cam_layer, load_model
from saliencylab.models.registry import load_checkpoint, save_checkpoint
from saliencylab.studies.photos import probabilities, top_k

CATS = {"Egyptian cat", "tabby", "tiger cat", "Persian cat", "Siamese cat", "lynx"}


@pytest.mark.embedded
def test_embedded_model_classifies_the_bundled_photos(lite0):
    from saliencylab.data import load_image

    x = torch.stack([lite0.preprocess(load_image(f"sample:{n}").pixels) for n in ("chelsea", "coffee")])
    tops = top_k(lite0, probabilities(lite0, x), 5)
    assert tops[0][0]["class"] in CATS
    assert tops[1][0]["class"] == "espresso"
    assert tops[0][0]["probability"] > 0.5 and tops[1][0]["probability"] > 0.5
    assert all(abs(sum(t["probability"] for t in top) - 1) < 0.5 for top in tops)


@pytest.mark.embedded
def test_embedded_mapping_is_checked_tensor_by_tensor(monkeypatch):
    """If the wheel's tensors ever stop mapping onto timm's, loading fails loudly instead of silently."""
    import timm

    from saliencylab.models import zoo

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sd = zoo._embedded_lite0_state_dict(net)
    assert len(sd) == 296 and list(sd) == list(net.state_dict())
    real_load = torch.load

    def shuffled(*a, **k):
        src = real_load(*a, **k)
        items = list(src.items())
        items[3], items[4] = items[4], items[3]  # two tensors in the wrong order
        return dict(items)

    monkeypatch.setattr(zoo.torch, "load", shuffled)
    with pytest.raises(RuntimeError, match="mapping no longer holds"):
        zoo._embedded_lite0_state_dict(net)


def test_normalisation_is_inside_the_module():
    clf = load_model("torchvision:resnet18", weights="random")
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor(clf.mean).view(1, 3, 1, 1)
    std = torch.tensor(clf.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(clf.module(x), clf.module.net((x - mean) / std))


def test_preprocess_gray_to_rgb_and_size():
    import numpy as np

    clf = load_model("torchvision:resnet18", weights="random")
    gray = np.linspace(0, 1, 50 * 40, dtype=np.float32).reshape(50, 40)
    x = clf.preprocess(gray)
    assert x.shape == (3, 224, 224) and torch.equal(x[0], x[1]) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_vgg16_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as info:
        load_model("vgg16")
    msg = str(info.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path) in msg and "--weights" in msg


def test_vgg16_from_hub_cache_and_weights_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    random_vgg = load_model("vgg16", weights="random")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(random_vgg.module.net.state_dict(), cache / "vgg16-397923af.pth")
    cached = load_model("vgg16")
    assert cached.class_names[0] == "tench" and len(cached.class_names) == 1000
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(cached.module(x), random_vgg.module(x))
    assert find_cam_layer(cached.module, x) == "net.features"


def test_weights_of_another_model_are_refused(tmp_path):
    other = load_model("torchvision:resnet18", weights="random")
    path = tmp_path / "resnet18.pth"
    torch.save(other.module.net.state_dict(), path)
    with pytest.raises(UserError, match="does not fit efficientnet_lite0.*another model"):
        load_model("efficientnet_lite0", weights=str(path))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch weights file"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "junk.pth"))


def test_unknown_models():
    with pytest.raises(UserError, match="Did you mean vgg16"):
        load_model("vgg61")
    with pytest.raises(UserError, match="torchvision has no model"):
        load_model("torchvision:resnet19")
    with pytest.raises(UserError, match="timm has no model"):
        load_model("timm:notanet")
    with pytest.raises(UserError, match="no weights for timm:resnet18"):
        load_model("timm:resnet18")


def test_cam_layer_heuristic():
    r18 = load_model("torchvision:resnet18", weights="random")
    assert find_cam_layer(r18.module, torch.rand(1, 3, 64, 64)) == "net.layer4"
    lite = load_model("efficientnet_lite0", weights="random")
    assert find_cam_layer(lite.module, torch.rand(1, 3, 64, 64)) == lite.cam_layer == "net.bn2"


def test_checkpoint_round_trip(tmp_path):
    clf = load_model("timm:resnet18", weights="random", num_classes=1, in_chans=1)
    clf = clf.replace(class_names=["Normal", "COVID"])
    path = tmp_path / "ckpt.pt"
    save_checkpoint(clf, path, arch="timm:resnet18", arch_kwargs={"num_classes": 1, "in_chans": 1},
                    config={"epochs": 2})
    back = load_model(str(path))
    assert back.binary and back.class_names == ["Normal", "COVID"] and back.channels == 1
    assert back.extra["config"] == {"epochs": 2}
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), clf.module.eval()(x))
    ckpt = torch.load(path, weights_only=True)  # loads without unpickling code
    assert ckpt["format"] == "saliencylab.checkpoint"
    plain = tmp_path / "plain.pt"
    torch.save(clf.module.net.state_dict(), plain)
    with pytest.raises(UserError, match="not a saliencylab checkpoint"):
        load_checkpoint(plain)


def test_device_errors():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="no CUDA GPU"):
        load_model("torchvision:resnet18", weights="random", device="cuda")
