"""The model package after its split: frozen Classifier, modes kept, checkpoint schema, no guessing on ViTs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from saliencylab.cli import app
from saliencylab.errors import UserError
from saliencylab.models import CamLayout, Normalized, find_cam_layer, load_model, save_checkpoint
from saliencylab.models.registry import load_checkpoint


def _bn_net() -> Normalized:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return Normalized(net, (0.5,) * 3, (0.25,) * 3)


def _modes(m: nn.Module) -> dict[str, bool]:
    return {n: s.training for n, s in m.named_modules()}


def test_cam_layer_search_and_gradcam_keep_every_submodule_mode():
    """A train-mode model with a frozen BatchNorm (eval): both modes survive the search and Grad-CAM."""
    from saliencylab.methods import get_method

    model = _bn_net().train()
    model.net[1].eval()  # frozen BatchNorm
    before = _modes(model)
    assert before["net.1"] is False and before[""] is True
    assert find_cam_layer(model, torch.rand(1, 3, 8, 8)) == "net.4"
    assert _modes(model) == before
    get_method("gradcam").fn(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    assert _modes(model) == before


def test_num_outputs_is_a_field_and_the_classifier_is_frozen():
    module = _bn_net().train()
    module.net[1].eval()
    before = _modes(module)
    clf = load_model(module, input_size=8)  # load_model puts the whole model in eval, as for every model
    assert "num_outputs" in {f.name for f in dataclasses.fields(clf)} and clf.num_outputs == 3
    module.train()
    module.net[1].eval()
    assert clf.num_outputs == 3 and _modes(module) == before  # reading it runs nothing
    with pytest.raises(dataclasses.FrozenInstanceError):
        clf.name = "other"  # type: ignore[misc]
    assert clf.replace(name="other").name == "other" and clf.name == "module"


@pytest.fixture
def checkpoint(tmp_path):
    clf = load_model("cxr_cnn", weights="random", channels=1, image_size=32)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(clf, path, arch="cxr_cnn", arch_kwargs={"channels": 1, "image_size": 32})
    return path


@pytest.mark.parametrize("field", ["arch", "arch_kwargs", "state_dict", "class_names", "input_size", "channels",
                                   "mean", "std"])
def test_checkpoint_missing_field_is_named(checkpoint, field):
    ckpt = torch.load(checkpoint, weights_only=True)
    del ckpt[field]
    torch.save(ckpt, checkpoint)
    with pytest.raises(UserError, match=f"'{checkpoint}' lacks the field '{field}'.*retrain"):
        load_checkpoint(checkpoint)


def test_checkpoint_wrong_field_and_cli_line(checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["input_size"] = "big"
    torch.save(ckpt, checkpoint)
    with pytest.raises(UserError, match="field 'input_size' is not \\[height, width\\]"):
        load_model(str(checkpoint))
    res = CliRunner().invoke(app, ["classify", "sample:chelsea", "--model", str(checkpoint)])
    assert res.exit_code == 2 and "input_size" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_checkpoint_with_pickled_object_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "saliencylab.checkpoint", "obj": CamLayout()}, path)  # a pickled object
    with pytest.raises(UserError, match="pickled Python objects") as err:
        load_checkpoint(path)
    assert "weights_only=False" not in str(err.value) and str(path) in str(err.value)


def _timm_vit():
    return load_model("timm:vit_tiny_patch16_224", weights="random", img_size=32, patch_size=8, depth=2,
                      num_classes=3)


def test_the_search_refuses_a_vision_transformer_and_names_a_layer():
    """It used to pick `blocks.11.attn.k_norm` of timm's ViT; now it refuses, naming the last block's norm1."""
    clf = _timm_vit()
    bare = Normalized(clf.module.net, clf.mean, clf.std)
    with pytest.raises(UserError, match="attention blocks.*gradcam.layer=net.blocks.1.norm1"):
        find_cam_layer(bare, torch.rand(1, 3, 32, 32))


def test_timm_vit_declares_tokens_and_gradcam_matches_pytorch_grad_cam():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from saliencylab.methods import get_method

    clf = _timm_vit()
    assert clf.cam_layer == "net.blocks.1.norm1" and clf.layout == CamLayout("tokens", (4, 4), 1)
    model = clf.module.double()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = get_method("gradcam").fn(model, x, torch.tensor([0, 2]))

    def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)

    with GradCAM(model, [model.net.blocks[1].norm1], reshape_transform=tokens_to_grid) as cam:
        cam.compute_input_gradient = False
        acts = []
        h = model.net.blocks[1].norm1.register_forward_hook(lambda m, i, o: acts.append(o))
        try:
            ref = cam(x, [ClassifierOutputTarget(0), ClassifierOutputTarget(2)])  # normalised and resized by it
        finally:
            h.remove()
    # pytorch-grad-cam min-max scales each map after its bilinear resize (cv2): compare the scaled maps
    ours_n = (ours - ours.amin((1, 2), keepdim=True)) / (ours.amax((1, 2), keepdim=True) -
                                                        ours.amin((1, 2), keepdim=True))
    assert ours.amax() > 0
    corr = [float(torch.corrcoef(torch.stack([ours_n[i].flatten(), torch.from_numpy(ref[i]).double().flatten()]))[0, 1])
            for i in range(2)]
    assert min(corr) > 0.99, corr


def test_a_loaded_checkpoint_is_in_eval_mode(tmp_path):
    """load_checkpoint hands back a model ready for inference (a train-mode BatchNorm would update its running
    statistics on the first forward pass and change every later map)."""
    from saliencylab.models import load_model
    from saliencylab.models.registry import load_checkpoint, save_checkpoint

    clf = load_model("cxr_cnn", weights="random")
    clf.module.train()
    save_checkpoint(clf, tmp_path / "c.pt", arch="cxr_cnn", arch_kwargs={})
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert not any(m.training for m in loaded.module.modules())
