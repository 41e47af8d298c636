"""Classification metrics against hand-computed values (the article's counts) and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saliencylab.metrics.classification import binary_metrics, in_words, wilson


def _from_counts(tp, fn, tn, fp):
    labels = np.array([1] * (tp + fn) + [0] * (tn + fp))
    probs = np.array([0.9] * tp + [0.1] * fn + [0.1] * tn + [0.9] * fp)
    return labels, probs


def test_article_counts():
    labels, probs = _from_counts(321, 46, 991, 23)  # 367 COVID, 1,014 normal on the article's test split
    m = binary_metrics(labels, probs, n_boot=200)
    assert m["confusion"] == {"tp": 321, "fn": 46, "tn": 991, "fp": 23}
    assert round(m["sensitivity"]["value"], 3) == 0.875
    assert round(m["specificity"]["value"], 3) == 0.977
    assert round(m["accuracy"]["value"], 3) == 0.950
    assert round(m["majority_baseline"]["accuracy"], 3) == 0.734  # always "normal"
    assert in_words(m, ("Normal", "COVID")) == ["321 of 367 COVID correctly predicted",
                                                 "991 of 1,014 Normal correctly predicted"]
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "auroc"):
        v = m[name]
        assert v["ci_low"] <= v["value"] <= v["ci_high"], name


def test_against_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    m = binary_metrics(labels, probs, n_boot=200)
    preds = probs >= 0.5
    assert m["f1"]["value"] == pytest.approx(f1_score(labels, preds))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(labels, preds))
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(labels, probs))
    assert m["ppv"]["value"] == pytest.approx(precision_score(labels, preds))
    assert m["sensitivity"]["value"] == pytest.approx(recall_score(labels, preds))
    assert m["specificity"]["value"] == pytest.approx(recall_score(labels, preds, pos_label=0))


def test_wilson_interval_known_values():
    v, lo, hi = wilson(0, 10)
    assert v == 0 and lo == 0 and hi == pytest.approx(1.959963984540054**2 / (10 + 1.959963984540054**2))
    v, lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)  # textbook value
    assert all(math.isnan(t) for t in wilson(0, 0))


def test_bootstrap_is_seeded():
    labels, probs = _from_counts(30, 5, 40, 6)
    a, b = binary_metrics(labels, probs, n_boot=100, seed=1), binary_metrics(labels, probs, n_boot=100, seed=1)
    assert a["f1"] == b["f1"]


def test_undefined_metrics_say_why():
    labels = np.array([0, 0, 0, 0])  # no positive image
    m = binary_metrics(labels, np.array([0.1, 0.2, 0.3, 0.4]), n_boot=20)
    assert math.isnan(m["sensitivity"]["value"]) and math.isnan(m["auroc"]["value"])
    assert m["undefined"] == {"sensitivity": "no positive images", "ppv": "no positive predictions",
                              "f1": "no positive images and no positive predictions",
                              "balanced_accuracy": "needs both positive and negative images",
                              "auroc": "needs both positive and negative images"}
    assert binary_metrics(*_from_counts(5, 1, 6, 2), n_boot=20)["undefined"] == {}
