"""Binary classification metrics with 95% confidence intervals, and the majority-class baseline.

Proportions (accuracy, sensitivity, specificity, PPV, NPV) get Wilson score intervals (Wilson 1927;
recommended by Brown, Cai & DasGupta 2001, https://doi.org/10.1214/ss/1009213286); F1, balanced accuracy
and ROC AUC get seeded percentile-bootstrap intervals (stratified by class, 2,000 resamples).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(value, low, high) of a proportion; NaN when n is 0."""
    if n == 0:
        return math.nan, math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def confusion(labels: np.ndarray, preds: np.ndarray) -> dict[str, int]:
    """{tp, fn, tn, fp} with label 1 the positive class."""
    labels, preds = np.asarray(labels).astype(int), np.asarray(preds).astype(int)
    return {"tp": int(((labels == 1) & (preds == 1)).sum()), "fn": int(((labels == 1) & (preds == 0)).sum()),
            "tn": int(((labels == 0) & (preds == 0)).sum()), "fp": int(((labels == 0) & (preds == 1)).sum())}


def _f1(c: dict[str, int]) -> float:
    d = 2 * c["tp"] + c["fp"] + c["fn"]
    return 2 * c["tp"] / d if d else math.nan


def _balanced(c: dict[str, int]) -> float:
    pos, neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    if not pos or not neg:
        return math.nan
    return 0.5 * (c["tp"] / pos + c["tn"] / neg)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


def _bootstrap(labels: np.ndarray, scores: np.ndarray, preds: np.ndarray, n: int, seed: int) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    pos, neg = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
    out: dict[str, list[float]] = {"f1": [], "balanced_accuracy": [], "auroc": []}
    for _ in range(n):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) if len(pos) and len(neg) \
            else rng.choice(len(labels), len(labels))
        c = confusion(labels[idx], preds[idx])
        out["f1"].append(_f1(c))
        out["balanced_accuracy"].append(_balanced(c))
        out["auroc"].append(_auroc(labels[idx], scores[idx]))
    return {k: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))) if np.isfinite(v).any()
            else (math.nan, math.nan) for k, v in out.items()}


def binary_metrics(labels: np.ndarray, probs: np.ndarray, *, threshold: float = 0.5, n_boot: int = 2000,
                   seed: int = 0) -> dict[str, Any]:
    """Every metric as {value, ci_low, ci_high}, the confusion counts, and the majority-class baseline.

    Args:
        labels: 0/1 per image (1: positive class).
        probs: predicted probability of the positive class per image.
        threshold: predicted positive when prob >= threshold.

    Returns:
        Each metric's value is NaN when undefined (e.g. PPV with no positive prediction); 'undefined' maps
        each such metric to the reason.
    """
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=np.float64)
    preds = (probs >= threshold).astype(int)
    c = confusion(labels, preds)
    n = len(labels)

    def prop(k: int, m: int) -> dict[str, float]:
        v, lo, hi = wilson(k, m)
        return {"value": v, "ci_low": lo, "ci_high": hi}

    boot = _bootstrap(labels, probs, preds, n_boot, seed) if n else {}
    out: dict[str, Any] = {
        "n": n, "threshold": threshold, "confusion": c,
        "accuracy": prop(c["tp"] + c["tn"], n),
        "sensitivity": prop(c["tp"], c["tp"] + c["fn"]),
        "specificity": prop(c["tn"], c["tn"] + c["fp"]),
        "ppv": prop(c["tp"], c["tp"] + c["fp"]),
        "npv": prop(c["tn"], c["tn"] + c["fn"]),
    }
    for name, value in (("f1", _f1(c)), ("balanced_accuracy", _balanced(c)), ("auroc", _auroc(labels, probs))):
        lo, hi = boot.get(name, (math.nan, math.nan))
        out[name] = {"value": value, "ci_low": lo, "ci_high": hi}
    out["undefined"] = _undefined_reasons(out)
    majority = int(labels.mean() >= 0.5) if n else 0
    base = confusion(labels, np.full(n, majority))
    out["majority_baseline"] = {
        "predicts": "positive" if majority else "negative",
        "accuracy": (base["tp"] + base["tn"]) / n if n else math.nan,
        "balanced_accuracy": 0.5, "sensitivity": float(majority), "specificity": float(1 - majority),
    }
    return out


def _undefined_reasons(out: dict[str, Any]) -> dict[str, str]:
    """Why each NaN metric is undefined, so a report can say so instead of printing 'nan'."""
    why = {"accuracy": "no images", "sensitivity": "no positive images", "specificity": "no negative images",
           "ppv": "no positive predictions", "npv": "no negative predictions",
           "f1": "no positive images and no positive predictions",
           "balanced_accuracy": "needs both positive and negative images",
           "auroc": "needs both positive and negative images"}
    return {k: reason for k, reason in why.items() if math.isnan(out[k]["value"])}


def in_words(metrics: dict[str, Any], classes: tuple[str, str]) -> list[str]:
    """The article's phrasing: '321 of 367 COVID correctly predicted'."""
    c = metrics["confusion"]
    neg, pos = classes
    return [f"{c['tp']:,} of {c['tp'] + c['fn']:,} {pos} correctly predicted",
            f"{c['tn']:,} of {c['tn'] + c['fp']:,} {neg} correctly predicted"]
