"""transformers ViTs from a save_pretrained folder: logits, token Grad-CAM and attention rollout by hand."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from saliencylab.cli import app
from saliencylab.errors import UserError
from saliencylab.methods import get_method
from saliencylab.methods._common import input_gradient
from saliencylab.models import CamLayout, find_cam_layer, load_model
from saliencylab.ops import resize

transformers = pytest.importorskip("transformers")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A random tiny ViT (image 32, patch 8, 2 layers, hidden 32) with its image processor, saved to a folder."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                    intermediate_size=64, num_labels=3, id2label={0: "cat", 1: "dog", 2: "cow"},
                    label2id={"cat": 0, "dog": 1, "cow": 2}, attn_implementation="eager")
    model = ViTForImageClassification(cfg).eval()
    folder = tmp_path_factory.mktemp("hf") / "vit"
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD)).save_pretrained(
        folder)
    return folder, model


def _x(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_vit_folder_loads_with_its_preprocessing_and_classes(vit_folder):
    folder, model = vit_folder
    clf = load_model(folder)
    assert clf.format == "transformers" and clf.class_names == ["cat", "dog", "cow"]
    assert clf.input_size == (32, 32) and clf.mean == MEAN and clf.std == STD and clf.num_outputs == 3
    assert clf.cam_layer.startswith("net.model.vit.") and clf.cam_layer.endswith(".1.layernorm_before")
    assert clf.layout == CamLayout("tokens", (4, 4), 1)
    x = _x().float()
    xn = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(clf.module(x), model(pixel_values=xn).logits, atol=1e-5, rtol=1e-5)
    xr = x.clone().requires_grad_(True)
    logits = model(pixel_values=(xr - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).logits
    (ref,) = torch.autograd.grad(logits[:, 1].sum(), xr)
    ours = input_gradient(clf.module, x, torch.tensor([1, 1]))
    torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    with pytest.raises(UserError, match="--input-size 64,64 contradicts transformers folder"):
        load_model(folder, input_size=64)


def test_the_search_refuses_the_hf_vit_instead_of_its_patch_embedding(vit_folder):
    from saliencylab.models import Normalized

    clf = load_model(vit_folder[0])
    bare = Normalized(clf.module.net, clf.mean, clf.std)  # no declared layer: what the search alone would do
    with pytest.raises(UserError, match=f"attention blocks.*{clf.cam_layer}"):
        find_cam_layer(bare, torch.rand(1, 3, 32, 32))


def test_token_gradcam_by_hand(vit_folder):
    """Class token dropped, 16 patch tokens to a 4x4 grid, gradients averaged over the grid, ReLU, resize."""
    clf = load_model(vit_folder[0])
    model = clf.module.double()
    x, target = _x(), torch.tensor([0, 2])
    cam = get_method("gradcam").fn(model, x, target)
    layer = dict(model.named_modules())[clf.cam_layer]
    keep = {}
    h = layer.register_forward_hook(lambda m, i, o: keep.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        h.remove()
    a = keep["a"]  # (B, 17, 32)
    (g,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), a)
    a, g = a[:, 1:].detach(), g[:, 1:]  # (B, 16, 32)
    ref = (g.mean(1, keepdim=True) * a).sum(-1).clamp(min=0).reshape(2, 1, 4, 4)
    ref = resize(ref, (32, 32))[:, 0]
    assert float(ref.amax()) > 0
    torch.testing.assert_close(cam, ref, atol=1e-10, rtol=1e-7)
    clf.module.float()


def test_attention_rollout_by_hand(vit_folder):
    """Abnar & Zuidema: mean over heads, 0.5 A + 0.5 I, rows normalised, multiplied layer on layer."""
    folder, model = vit_folder
    clf = load_model(folder)
    x = _x().float()
    ours = get_method("attention_rollout").fn(clf.module, x, torch.tensor([0, 1]))
    xn = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        atts = model(pixel_values=xn.float(), output_attentions=True).attentions
    assert len(atts) == 2 and atts[0].shape == (2, 4, 17, 17)
    r = torch.eye(17).expand(2, 17, 17).double()
    for att in atts:
        a = 0.5 * att.double().mean(1) + 0.5 * torch.eye(17, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        r = torch.einsum("bij,bjk->bik", a, r)
    ref = resize(r[:, 0, 1:].reshape(2, 1, 4, 4), (32, 32))[:, 0]
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-5)
    # class-agnostic: the same map for another target; rows of the rollout sum to one, so maps are < 1
    torch.testing.assert_close(get_method("attention_rollout").fn(clf.module, x, torch.tensor([2, 2])), ours)
    assert float(ours.max()) < 1


def test_attention_rollout_refuses_a_cnn_with_a_clear_line(tmp_path):
    clf = load_model("torchvision:resnet18", weights="random")
    with pytest.raises(UserError, match="needs a vision transformer"):
        get_method("attention_rollout").fn(clf.module, torch.rand(1, 3, 32, 32), torch.tensor([0]))
    res = CliRunner().invoke(app, ["explain", "sample:chelsea", "--model", "torchvision:resnet18", "--weights",
                                   "random", "--methods", "attention_rollout", "--out", str(tmp_path / "o")])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "needs a vision transformer" in lines[0], res.output


def test_timm_vit_rollout_matches_attention_computed_from_its_weights():
    clf = load_model("timm:vit_tiny_patch16_224", weights="random", img_size=32, patch_size=8, depth=2,
                     num_classes=3)
    model = clf.module.double()
    x = _x(1)
    ours = get_method("attention_rollout").fn(model, x, torch.tensor([0]))
    normed = []
    hooks = [blk.norm1.register_forward_hook(lambda m, i, o: normed.append(o)) for blk in model.net.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    r = torch.eye(17, dtype=torch.float64)[None]
    for blk, z in zip(model.net.blocks, normed, strict=True):
        heads = blk.attn.num_heads
        q, k, _ = blk.attn.qkv(z).reshape(1, 17, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (1, heads, T, d) each
        att = (blk.attn.q_norm(q) @ blk.attn.k_norm(k).transpose(-2, -1) * blk.attn.scale).softmax(-1)
        a = 0.5 * att.mean(1) + 0.5 * torch.eye(17, dtype=torch.float64)
        r = (a / a.sum(-1, keepdim=True)) @ r
    ref = resize(r[:, 0, 1:].reshape(1, 1, 4, 4), (32, 32))[:, 0]
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)
    assert all(b.attn.fused_attn == model.net.blocks[0].attn.fused_attn for b in model.net.blocks)


def test_hf_folder_through_the_cli(vit_folder, tmp_path):
    folder, _ = vit_folder
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", "sample:chelsea", "--model", str(folder), "--methods",
                                   "gradcam,attention_rollout", "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"gradcam", "attention_rollout"}
    res = CliRunner().invoke(app, ["classify", "sample:chelsea", "--model", str(folder), "--channels", "1"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "--channels 1 contradicts" in lines[0], res.output


def test_rollout_leaves_modes_hooks_and_fused_kernels_as_they_were():
    clf = load_model("timm:vit_tiny_patch16_224", weights="random", img_size=32, patch_size=8, depth=2,
                     num_classes=3)
    model = clf.module.train()
    model.net.blocks[0].eval()
    fused = [b.attn.fused_attn for b in model.net.blocks]
    modes = {n: m.training for n, m in model.named_modules()}
    get_method("attention_rollout").fn(model, _x(1).float(), torch.tensor([0]))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert [b.attn.fused_attn for b in model.net.blocks] == fused
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_methods_that_apply_to_each_model(vit_folder):
    """`--methods all` keeps what applies: rollout only on transformers, no gradients through onnxruntime."""
    cnn = load_model("torchvision:resnet18", weights="random")
    vit = load_model(vit_folder[0])
    assert not cnn.supports("attention") and cnn.supports("cam") and cnn.supports("gradient")
    assert vit.supports("attention") and vit.supports("cam")
    forward_only = cnn.replace(gradients=False)
    assert not forward_only.supports("gradient") and forward_only.supports("perturbation")
