"""`saliencylab audit` end to end on a small shortcut-trained run: every check present, numbers sane."""

from __future__ import annotations

import csv
import json
import math

from typer.testing import CliRunner

from saliencylab.cli import app

runner = CliRunner()


def test_audit_writes_every_check(cxr_run, tmp_path):
    out = tmp_path / "audit"
    res = runner.invoke(app, ["audit", str(cxr_run), "--n", "12", "--methods", "vanilla,gradcam",
                              "--sanity-images", "4", "--faithfulness-images", "2", "--compare", str(cxr_run),
                              "--road", "--data-randomisation", "--batch-size", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    a = json.loads((out / "audit.json").read_text())
    n_test = sum(r["split"] == "test" for r in csv.DictReader(open(cxr_run / "split.csv")))
    assert a["images"] == min(12, n_test) == 6 and set(a["methods"]) == {"vanilla", "gradcam"}
    for s in a["methods"].values():
        assert 0 <= s["lung_mass"] <= 1 and 0.1 < s["lung_share"] < 0.5
        assert math.isclose(s["lung_ratio"], s["lung_mass"] / s["lung_share"], rel_tol=1e-9)
        assert 0 <= s["border_mass"] <= 1 and 0 <= s["marker_mass"] <= 1
        assert {"deletion_blur", "insertion_blur", "deletion_blur_random", "insertion_blur_random",
                "deletion_blur_lerf", "insertion_blur_lerf", "deletion_noisy_linear"} <= set(s["faithfulness"])
        assert s["faithfulness_images"] == 2
        assert s["sanity"]["mode"] == "cascading" and len(s["sanity"]["steps"]) > 3
        assert s["sanity"]["passed"] in (True, False)
        assert -1 <= s["noise_spearman"] <= 1 and s["max_sensitivity"] >= 0
    assert a["agreement_between_models"] == {"vanilla": 1.0, "gradcam": 1.0}  # a run compared with itself
    assert (cxr_run / "shuffled" / "best.pt").is_file()
    assert all(-1 <= s["data_randomisation_spearman"] <= 1 for s in a["methods"].values())
    assert list(a["agreement_between_methods"]) == ["vanilla vs gradcam"]
    probes = a["probes"]
    assert probes["lungs_blacked_out"]["images"] == 6
    assert 0 <= probes["lungs_blacked_out"]["auroc"] <= 1 or math.isnan(probes["lungs_blacked_out"]["auroc"])
    swap = probes["marker_swap"]
    assert swap["images"] == 6 and 0 <= swap["flips"] <= 6
    assert all(k.split(":")[0] in ("load", "agreement", "probes", "vanilla", "gradcam") for k in a["seconds"])
    rows = list(csv.DictReader(open(out / "audit_images.csv")))
    assert len(rows) == 12 and {r["method"] for r in rows} == {"vanilla", "gradcam"}
    for png in ("localisation.png", "sanity.png"):
        assert (out / png).is_file()
    assert (out / "flagged.csv").read_text().startswith("file,methods")


def test_audit_errors(tmp_path):
    res = runner.invoke(app, ["audit", str(tmp_path)])
    assert res.exit_code == 2 and "has no best.pt" in res.stderr


def test_audit_of_explain_outputs(tmp_path):
    """Photos have no masks: the audit runs what applies, with explain's own methods and options."""
    import numpy as np
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"p{i}.png")
    ex = tmp_path / "ex"
    res = runner.invoke(app, ["explain", *[str(tmp_path / f"p{i}.png") for i in range(3)], "--model",
                              "torchvision:squeezenet1_1", "--weights", "random", "--methods",
                              "vanilla,spectral_residual", "--out", str(ex)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["audit", str(ex), "--faithfulness-images", "1", "--sanity-images", "3"])
    assert res.exit_code == 0, res.output
    a = json.loads((ex / "audit" / "audit.json").read_text())
    assert a["images"] == 3 and a["model"] == {"model": "torchvision:squeezenet1_1", "weights": "random"}
    assert a["methods"]["spectral_residual"]["sanity"] is None  # model-free: nothing to randomise
    assert len(a["methods"]["vanilla"]["sanity"]["steps"]) == 26  # every convolution of SqueezeNet 1.1
    assert list(a["agreement_between_methods"]) == ["vanilla vs spectral_residual"]
