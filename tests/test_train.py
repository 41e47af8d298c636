"""Training, resume, checkpoints through classify, evaluation and Figure 3, on a few dozen small phantoms."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from saliencylab.cli import app
from saliencylab.errors import UserError
from saliencylab.train import TrainConfig, train

runner = CliRunner()


def _cfg(data: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"data": str(data), "epochs": 3, "image_size": 64, "batch_size": 8, "lr": 2e-3,
                          "workers": 1, **kw})


def test_training_writes_the_run_and_loss_decreases(cxr_run):
    hist = list(csv.DictReader(open(cxr_run / "history.csv")))
    assert len(hist) == 3
    assert float(hist[-1]["train_loss"]) < float(hist[0]["train_loss"])
    assert all(float(h["images_per_second"]) > 0 for h in hist)
    for name in ("config.json", "split.csv", "best.pt", "state.pt", "history.png", "unreadable.json"):
        assert (cxr_run / name).is_file(), name
    ckpt = torch.load(cxr_run / "best.pt", weights_only=True)
    assert ckpt["arch"] == "cxr_cnn" and ckpt["class_names"] == ["Normal", "COVID"]
    assert ckpt["config"]["image_size"] == 64 and len(ckpt["extra"]["split_hash"]) == 16


def test_resume_reproduces_an_uninterrupted_run(cxr_data, cxr_run, tmp_path):
    def interrupt(msg: str) -> None:
        if msg.startswith("epoch 2/"):
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(cxr_data), out, progress=False, log=interrupt)
    train(_cfg(cxr_data), out, resume=True, progress=False, log=lambda *_: None)
    a = torch.load(cxr_run / "state.pt", weights_only=True)
    b = torch.load(out / "state.pt", weights_only=True)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)
    with pytest.raises(UserError, match="other settings"):
        train(_cfg(cxr_data, lr=0.1), out, resume=True, progress=False, log=lambda *_: None)


def test_checkpoint_works_with_classify_and_explain(cxr_run, cxr_data, tmp_path):
    img = next((cxr_data / "COVID" / "images").iterdir())
    res = runner.invoke(app, ["classify", str(img), "--model", str(cxr_run / "best.pt"), "--json",
                              str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    top = json.loads((tmp_path / "c.json").read_text())["images"][0]["top"]
    assert {t["class"] for t in top} == {"COVID", "Normal"} and abs(sum(t["probability"] for t in top) - 1) < 1e-5
    res = runner.invoke(app, ["explain", str(img), "--model", str(cxr_run / "best.pt"), "--target", "positive",
                              "--methods", "vanilla,gradcam", "--out", str(tmp_path / "ex")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ex" / "results.json").read_text())["images"][0]["target"]["class"] == "COVID"


def test_evaluate_writes_metrics_predictions_and_figure3(cxr_run, tmp_path):
    res = runner.invoke(app, ["evaluate", str(cxr_run), "--low", "0.5", "--high", "0.5", "--methods", "vanilla,gradcam",
                              "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    split = list(csv.DictReader(open(cxr_run / "split.csv")))
    n_test = sum(r["split"] == "test" for r in split)
    assert m["n"] == n_test and m["scope"] == "test split"
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "auroc"):
        assert set(m[name]) == {"value", "ci_low", "ci_high"}
    c = m["confusion"]
    assert c["tp"] + c["fn"] + c["tn"] + c["fp"] == n_test
    assert m["in_words"][0].endswith("COVID correctly predicted")
    preds = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    assert len(preds) == n_test and sum(int(p["prediction"]) == int(p["label"]) for p in preds) == c["tp"] + c["tn"]
    for png in ("roc.png", "confusion.png", "histograms.png", "figure3.png"):
        assert (tmp_path / "ev" / png).is_file(), png
    probs = [float(p["probability"]) for p in preds]
    expected = min(2, sum(p <= 0.5 for p in probs)) + min(2, sum(p >= 0.5 for p in probs))
    assert len(m["figure3"]["images"]) == expected > 0


def test_unreadable_images_are_skipped_and_counted(cxr_data, tmp_path):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(cxr_data, copy)
    (copy / "Normal" / "images" / "Normal-1.png").write_text("not a png")
    (copy / "Normal" / "masks" / "Normal-1.png").write_text("not a png")
    summary = train(_cfg(copy, epochs=1), tmp_path / "r", progress=False, log=lambda *_: None)
    assert summary["unreadable"] == 1
    assert json.loads((tmp_path / "r" / "unreadable.json").read_text())[0]["file"] == "Normal/images/Normal-1.png"


def test_train_cli_errors(tmp_path):
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "does not exist" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert res.exit_code == 2 and "has no best.pt" in res.stderr
