"""The command line: classify and explain end to end, and one clear line for every bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from saliencylab.cli import app
from test_images import bad_files

runner = CliRunner()
FAST = ["--model", "torchvision:resnet18", "--weights", "random"]


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _image(path: Path, shape=(48, 64, 3), seed=0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


@pytest.mark.embedded
def test_classify_default_photos_table_and_json(tmp_path):
    out = tmp_path / "top.json"
    res = run("classify", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "Egyptian cat" in res.output and "espresso" in res.output and "rank" in res.output
    data = json.loads(out.read_text())
    assert [r["source"] for r in data["images"]] == ["sample:chelsea", "sample:coffee", "sample:rocket",
                                                     "sample:motorcycle_left"]
    top = data["images"][1]["top"]
    assert len(top) == 5 and top[0]["class"] == "espresso" and top[0]["probability"] > 0.5
    assert all(a["probability"] >= b["probability"] for a, b in zip(top, top[1:], strict=False))


def test_explain_writes_maps_in_the_image_grid(tmp_path):
    from saliencylab.ops import resize
    from saliencylab.studies.streaming import load_map

    img = _image(tmp_path / "photo.png", (48, 64, 3))
    gray = _image(tmp_path / "xray.png", (40, 30), seed=1)
    out = tmp_path / "out"
    res = run("explain", str(img), str(gray), *FAST, "--methods", "vanilla,integrated_gradients,gradcam,"
              "spectral_residual", "--out", str(out), "--target", "3", "--set", "integrated_gradients.n_steps=4",
              "--no-adapt")
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["images"]] == ["photo", "xray"]
    for rec, size in zip(results["images"], [(48, 64), (40, 30)], strict=True):
        assert rec["size"] == list(size) and rec["target"]["index"] == 3
        for method in ["vanilla", "integrated_gradients", "gradcam", "spectral_residual"]:
            raw = np.load(out / rec["maps"][method]["npy"])  # at the model's resolution (issue 14: 222 MB)
            assert raw.dtype == np.float32 and raw.shape == (224, 224) and np.isfinite(raw).all()
            full = load_map(out / rec["name"], method)  # on the image's grid
            assert full.shape == size
            np.testing.assert_array_equal(full, resize(torch.from_numpy(raw)[None, None], size)[0, 0].numpy())
            png = np.asarray(Image.open(out / rec["maps"][method]["png"]))
            assert png.shape == (*size, 3)
        assert "ig_completeness_error" in rec
    assert set(results["methods"]) == {"vanilla", "integrated_gradients", "gradcam", "spectral_residual"}
    assert results["methods"]["integrated_gradients"]["options"]["n_steps"] == 4
    assert results["methods"]["vanilla"]["seconds"] >= 0
    assert results["precision"] == "fp32" and results["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert results["methods"]["vanilla"]["passes"] is None  # one pass, no sampling
    if not torch.cuda.is_available():  # the CPU rule: one path point of the 2 images per pass
        assert results["methods"]["integrated_gradients"]["passes"] == {"rule": "cpu", "samples_per_pass": [2]}
    fig = Image.open(out / "figure.png")
    assert fig.size[0] > fig.size[1]  # 5 columns, 2 rows
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_explain_map_matches_the_method_on_the_model_input(tmp_path):
    """The .npy is the method's raw map resized to the image grid: same values at the same size."""
    from saliencylab.methods import resolve_target
    from saliencylab.methods.gradient import vanilla
    from saliencylab.models import load_model

    img = _image(tmp_path / "p.png", (224, 224, 3))
    out = tmp_path / "out"
    assert run("explain", str(img), *FAST, "--methods", "vanilla", "--out", str(out)).exit_code == 0
    clf = load_model("torchvision:resnet18", weights="random")
    from saliencylab.data import load_image

    x = clf.preprocess(load_image(str(img)).pixels)[None]
    expected = vanilla(clf.module, x, resolve_target(clf.module, x))[0].numpy()
    np.testing.assert_allclose(np.load(out / "p" / "vanilla.npy"), expected, rtol=1e-5, atol=1e-7)


def test_methods_and_models_listing():
    res = run("methods")
    assert res.exit_code == 0 and "smoothgrad" in res.output and re.search(r"n_samples +32 ", res.output)
    res = run("models")
    assert "efficientnet_lite0" in res.output and "vgg16" in res.output


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "bomb", "bad_dicom"])
def test_bad_files_give_one_line_and_no_output(tmp_path, case):
    path, words = bad_files(tmp_path)[case]
    good = tmp_path / "good.png"
    out = tmp_path / "out"
    res = run("explain", str(good), str(path), *FAST, "--methods", "vanilla", "--out", str(out))
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0] and path.name in lines[0]
    assert "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir())  # the good image's outputs were not kept either
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_skip_bad_keeps_going(tmp_path):
    path, _ = bad_files(tmp_path)["text"]
    out = tmp_path / "out"
    res = run("explain", str(tmp_path / "good.png"), str(path), *FAST, "--methods", "vanilla", "--out", str(out),
              "--skip-bad")
    assert res.exit_code == 0 and "skipped" in res.stderr
    results = json.loads((out / "results.json").read_text())
    assert len(results["images"]) == 1 and results["skipped"][0]["source"].endswith("text.png")


@pytest.mark.parametrize("args,words", [
    (["classify", "--model", "resnet"], "unknown model 'resnet'"),
    (["explain", "--methods", "vanila"], "Did you mean vanilla"),
    (["explain", "--target", "egyptian kat"], "Did you mean 'Egyptian cat'"),
    (["explain", "--set", "smoothgrad.samples=3", "--methods", "smoothgrad"], "no option 'samples'"),
    (["explain", "--set", "smoothgrad.n_samples=3", "--methods", "vanilla"], "not among --methods"),
    (["explain", "--set", "smoothgrad.n_samples=many", "--methods", "smoothgrad"], "not a number"),
    (["explain", "--normalise", "zscore"], "--normalise zscore"),
    (["classify", "--model", "vgg16"], "vgg16-397923af.pth"),
    (["classify", "sample:nothing"], "unknown sample"),
])
def test_bad_flags_give_one_line(tmp_path, monkeypatch, args, words):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: no vgg16 weights
    res = run(*args, "--out", str(tmp_path / "o")) if args[0] == "explain" else run(*args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert not (tmp_path / "o").exists()
