"""`evaluate` on any model and labelled folder or CSV, without a training run; unreadable images named;
CSV and mask-folder datasets."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from saliencylab.cli import app
from saliencylab.data.datasets import attach_masks, load_csv, load_dataset, load_labelled
from saliencylab.errors import UserError

runner = CliRunner()


def _png(path, size=(16, 16), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(path)


def test_evaluate_model_and_folder_matches_the_run(cxr_run, cxr_data, tmp_path):
    """The same checkpoint through --model/--data gives the run's own probabilities on its test images."""
    res = runner.invoke(app, ["evaluate", str(cxr_run), "--out", str(tmp_path / "run"), "--per-side", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--model", str(cxr_run / "best.pt"), "--data", str(cxr_data),
                              "--out", str(tmp_path / "any"), "--per-side", "0", "--batch-size", "7"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "any" / "metrics.json").read_text())
    assert m["n"] == 60 and m["scope"] == "all images" and m["model"] == str(cxr_run / "best.pt")
    run_p = {r["file"]: float(r["probability"]) for r in csv.DictReader(open(tmp_path / "run" / "predictions.csv"))}
    any_p = {r["file"]: float(r["probability"]) for r in csv.DictReader(open(tmp_path / "any" / "predictions.csv"))}
    assert len(run_p) == 6 and all(any_p[f] == pytest.approx(p, abs=2e-6) for f, p in run_p.items())
    res = runner.invoke(app, ["evaluate", "--model", str(cxr_run / "best.pt"), "--data", str(cxr_data), "--n", "10",
                              "--out", str(tmp_path / "n10"), "--per-side", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "n10" / "metrics.json").read_text())["n"] == 10


def test_evaluate_names_images_that_rotted_after_training(cxr_run, cxr_data, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(cxr_data, copy)
    test = [r["file"] for r in csv.DictReader(open(cxr_run / "split.csv")) if r["split"] == "test"]
    for f in test[:2]:
        (copy / f).write_bytes(b"not a png")
    res = runner.invoke(app, ["evaluate", str(cxr_run), "--data", str(copy), "--out", str(tmp_path / "ev"),
                              "--per-side", "0"])
    assert res.exit_code == 0, res.output
    assert "2 unreadable images skipped" in res.stderr and all(f in res.stderr for f in test[:2])
    listed = json.loads((tmp_path / "ev" / "unreadable.json").read_text())
    assert [u["file"] for u in listed] == test[:2] and all(u["reason"] for u in listed)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["unreadable"] == 2 and m["n"] == len(test) - 2
    assert "(2 unreadable skipped)" in res.output


def test_evaluate_errors_are_one_line(cxr_run, cxr_data, tmp_path):
    for args, words in (([], "--model M --data DIR"), (["--model", str(cxr_run / "best.pt")], "--data"),
                        (["--model", str(cxr_run / "best.pt"), "--data", str(cxr_data), "--classes", "A,B,C"],
                         "one logit"),
                        (["--model", str(cxr_run / "best.pt"), "--data", str(tmp_path / "no.csv")], "no such CSV")):
        res = runner.invoke(app, ["evaluate", *args, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and words in res.stderr, (args, res.output)
        assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_model_and_data_outputs_render_in_the_report(cxr_run, cxr_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["evaluate", "--model", str(cxr_run / "best.pt"), "--data", str(cxr_data), "--n", "12",
                              "--methods", "vanilla"])
    assert res.exit_code == 0, res.output
    base = tmp_path / "runs" / "best-phantoms"
    assert (base / "eval" / "metrics.json").is_file()
    assert json.loads((base / "model.json").read_text())["model"] == str(cxr_run / "best.pt")
    res = runner.invoke(app, ["report", str(base)])
    assert res.exit_code == 0, res.output
    html = (base / "report.html").read_text()
    m = json.loads((base / "eval" / "metrics.json").read_text())
    assert f'data-metric="auroc">{m["auroc"]["value"]:.3f}<' in html and 'id="cxr"' in html


def test_csv_dataset(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        _png(tmp_path / name)
    _png(tmp_path / "m" / "a.png")
    (tmp_path / "list.csv").write_text("file,label,mask,group\na.png,COVID,m/a.png,p1\nb.png,normal,,p1\n"
                                       "sub/c.png,1,,p2\n")
    ds = load_csv(tmp_path / "list.csv", classes=("Normal", "COVID"))
    assert ds.layout == "csv" and ds.root == tmp_path and ds.has_masks
    assert [(r.file, r.label, r.cls, r.mask, r.group) for r in ds.records] == [
        ("a.png", 1, "COVID", "m/a.png", "p1"), ("b.png", 0, "Normal", None, "p1"),
        ("sub/c.png", 1, "COVID", None, "p2")]
    assert load_labelled(tmp_path / "list.csv", classes=("Normal", "COVID")).records == ds.records
    for text, words in (("f,label\nx.png,COVID\n", "needs the columns file,label"),
                        ("file,label\na.png,Cat\n", "line 2: label 'Cat' is not one of"),
                        ("file,label,mask\na.png,COVID,m/none.png\n", "mask 'm/none.png' does not exist"),
                        ("file,label\n", "needs the columns")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(UserError, match=words):
            load_csv(tmp_path / "bad.csv", classes=("Normal", "COVID"))


def test_masks_folder_matched_by_name_or_stem(tmp_path):
    for cls in ("COVID", "Normal"):
        for i in range(2):
            _png(tmp_path / "d" / cls / f"{cls}-{i}.jpg".replace(".jpg", ".png"))
    _png(tmp_path / "masks" / "deep" / "COVID-0.png")
    _png(tmp_path / "masks" / "Normal-1.bmp")
    ds = attach_masks(load_dataset(tmp_path / "d"), tmp_path / "masks")
    got = {r.file: r.mask for r in ds.records}
    assert got["COVID/COVID-0.png"] == str((tmp_path / "masks" / "deep" / "COVID-0.png").resolve())
    assert got["Normal/Normal-1.png"] == str((tmp_path / "masks" / "Normal-1.bmp").resolve())
    assert got["COVID/COVID-1.png"] is None and got["Normal/Normal-0.png"] is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no mask there is named like an image"):
        attach_masks(load_dataset(tmp_path / "d"), tmp_path / "empty")


def test_multiclass_folders_and_colour_cache(tmp_path):
    """Three class folders in the model's output order; colour kept for a 3-channel model."""
    import torch

    from saliencylab.data.cache import decode_cache, to_batch

    for k, cls in enumerate(("cat", "dog", "fox")):
        path = tmp_path / cls / "x.png"
        path.parent.mkdir(parents=True)
        rgb = np.zeros((8, 8, 3), np.uint8)
        rgb[..., k] = 255
        Image.fromarray(rgb).save(path)
    ds = load_dataset(tmp_path, classes=("cat", "dog", "fox"))
    assert [r.label for r in ds.records] == [0, 1, 2]
    cache, bad = decode_cache(ds, ds.records, 8, workers=1, progress=False, channels=3)
    x = to_batch(cache, np.arange(3), 3)
    assert not bad and x.shape == (3, 3, 8, 8)
    assert torch.equal(x.mean((2, 3)), torch.eye(3))
    grey = to_batch(cache, np.arange(3), 1)
    assert torch.allclose(grey[:, 0, 0, 0], torch.tensor([0.299, 0.587, 0.114]), atol=1e-6)
