"""Study 2: evaluate a chest X-ray classifier on its test split (or another dataset) and draw Figure 3."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliencylab.data.datasets import load_dataset, load_mask, read_split
from saliencylab.errors import UserError
from saliencylab.fsutil import write_json, write_text
from saliencylab.metrics.classification import binary_metrics, in_words
from saliencylab.models.registry import Classifier, load_checkpoint
from saliencylab.render.figures import save_figure
from saliencylab.train import decode_cache, evaluate_logits, to_batch


def load_run(run: str | Path) -> tuple[Path, Classifier, dict[str, Any]]:
    """The run folder, its best checkpoint and its training config."""
    run = Path(run)
    ckpt = run / "best.pt"
    if not ckpt.is_file():
        raise UserError(f"'{run}' has no best.pt; train first with `saliencylab train --out {run}`")
    clf = load_checkpoint(ckpt)
    return run, clf, dict(clf.extra.get("config", {}))


def evaluate(run: str | Path, *, data: str | None = None, threshold: float = 0.5, out: str | Path | None = None,
             figure3: bool = True, methods: str = "vanilla,smoothgrad,integrated_gradients,gradcam",
             n_per_side: int = 2, low: float = 0.1, high: float = 0.9, seed: int = 0,
             progress: bool | None = None) -> dict[str, Any]:
    """Write predictions.csv, metrics.json, ROC / confusion / histogram PNGs and Figure 3.

    With `data`, the images of that dataset whose names are in the run's test split are used (phantoms
    drawn with the same seed share names, so a marker-swapped copy tests the same patients); when none
    match, all of its images are.
    """
    run, clf, cfg = load_run(run)
    out = Path(out) if out else run / ("eval" if data is None else f"eval-{Path(data).name}")
    out.mkdir(parents=True, exist_ok=True)
    root = data or cfg.get("data")
    if not root:
        raise UserError(f"'{run}/best.pt' does not record its dataset; pass --data DIR")
    classes = tuple(cfg.get("classes", clf.class_names))
    ds = load_dataset(root, classes=classes)
    split = read_split(run / "split.csv") if (run / "split.csv").is_file() else {}
    test = [r for r in ds.records if split.get(r.file) == "test"]
    scope = "test split"
    if not test:
        test, scope = list(ds.records), "all images"
    cache, bad = decode_cache(ds, test, clf.input_size[0], progress=progress)
    keep = np.array([r.file not in {f for f, _ in bad} for r in test])
    test = [r for r, k in zip(test, keep, strict=True) if k]
    cache = cache[keep]
    clf.to("cpu")
    logits = evaluate_logits(clf, cache, np.arange(len(test)))
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    labels = np.array([r.label for r in test])
    metrics = binary_metrics(labels, probs, threshold=threshold, seed=seed)
    metrics["in_words"] = in_words(metrics, classes)
    metrics.update({"classes": list(classes), "positive_class": classes[1], "data": str(root), "scope": scope,
                    "unreadable": len(bad), "checkpoint": str(run / "best.pt")})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "label", "probability", "prediction"])
    for r, p in zip(test, probs, strict=True):
        w.writerow([r.file, r.label, f"{p:.6f}", int(p >= threshold)])
    write_text(out / "predictions.csv", buf.getvalue())
    write_json(out / "metrics.json", metrics)
    _plots(out, labels, probs, metrics, classes)
    if figure3:
        metrics["figure3"] = figure_3(clf, ds.root, test, cache, probs, out, methods=methods, n_per_side=n_per_side,
                                      low=low, high=high, seed=seed)
        write_json(out / "metrics.json", metrics)
    return metrics | {"out": str(out)}


def _plots(out: Path, labels: np.ndarray, probs: np.ndarray, metrics: dict[str, Any], classes: tuple) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, probs)
        fig, ax = plt.subplots(figsize=(4.2, 4))
        auc = metrics["auroc"]
        ax.plot(fpr, tpr, lw=2, label=f"AUC {auc['value']:.3f} ({auc['ci_low']:.3f}-{auc['ci_high']:.3f})")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="chance")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curve")
        ax.legend(loc="lower right")
        save_figure(fig, out / "roc.png")
    c = metrics["confusion"]
    mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(mat, cmap="Blues")
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, f"{v:,}", ha="center", va="center", color="white" if v > mat.max() / 2 else "black")
    ax.set_xticks([0, 1], [f"pred. {classes[0]}", f"pred. {classes[1]}"])
    ax.set_yticks([0, 1], [classes[0], classes[1]])
    ax.set_title("confusion matrix")
    save_figure(fig, out / "confusion.png")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    bins = np.linspace(0, 1, 26)
    for lab, name in enumerate(classes):
        ax.hist(probs[labels == lab], bins=bins, alpha=0.6, label=name)
    ax.axvline(metrics["threshold"], color="k", ls="--", lw=1)
    ax.set(xlabel=f"predicted probability of {classes[1]}", ylabel="images", title="probabilities by class")
    ax.legend()
    save_figure(fig, out / "histograms.png")


def figure_3(clf: Classifier, root: Path, records: list, cache: np.ndarray, probs: np.ndarray, out: Path, *,
             methods: str, n_per_side: int, low: float, high: float, seed: int) -> dict[str, Any]:
    """Saliency for test images predicted near 0 and near 1 (the article's Figure 3), lung contour on top."""

    from saliencylab.methods import parse_methods, resolve_target
    from saliencylab.render import normalise, overlay, smooth

    specs = parse_methods(methods)
    rng = np.random.default_rng(seed)
    low_idx, high_idx = np.nonzero(probs <= low)[0], np.nonzero(probs >= high)[0]
    chosen = [int(i) for i in rng.permutation(low_idx)[:n_per_side]]
    chosen += [int(i) for i in rng.permutation(high_idx)[:n_per_side]]
    if not chosen:
        return {"images": [], "note": f"no test image predicted <= {low} or >= {high}"}
    x = to_batch(cache, np.array(chosen), clf.channels).contiguous()
    side = torch.tensor([0 if probs[i] <= low else 1 for i in chosen])
    target = resolve_target(clf.module, x, side)
    maps = {s.name: s.fn(clf.module, x, target).detach().numpy() for s in specs}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    fig, axes = plt.subplots(len(chosen), len(specs) + 1, figsize=(2.3 * (len(specs) + 1), 2.5 * len(chosen)),
                             squeeze=False)
    info = []
    for r, i in enumerate(chosen):
        rec = records[i]
        img = cache[i].astype(np.float32) / 255
        lung = load_mask(root, rec.mask, img.shape[0])
        contour = find_boundaries(lung) if lung is not None else None
        name = "COVID" if rec.label else "Normal"
        axes[r, 0].imshow(img, cmap="gray")
        axes[r, 0].set_title(f"{Path(rec.file).name}\n{name}, p={probs[i]:.3f}", fontsize=8)
        for c, s in enumerate(specs, start=1):
            shown = normalise(smooth(np.abs(maps[s.name][r]), 0.01 * img.shape[0]), s.display)
            rgb = overlay(img, shown)
            if contour is not None:
                rgb[contour] = (0, 255, 0)
            axes[r, c].imshow(rgb)
            if r == 0:
                axes[r, c].set_title(s.name, fontsize=9, fontweight="bold")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        info.append({"file": rec.file, "label": int(rec.label), "probability": float(probs[i]),
                     "explained": clf.class_names[int(target[r])]})
    fig.suptitle("Saliency for test images predicted near 0 (top) and near 1 (bottom); green: lung mask",
                 fontsize=10)
    save_figure(fig, out / "figure3.png")
    return {"images": info, "methods": [s.name for s in specs], "png": "figure3.png"}


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    def f(name: str) -> str:
        m = metrics[name]
        return f"{name} {m['value']:.3f} ({m['ci_low']:.3f}-{m['ci_high']:.3f})"

    base = metrics["majority_baseline"]
    return [*metrics["in_words"],
            ", ".join(f(k) for k in ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auroc")),
            f"majority baseline (always {base['predicts']}): accuracy {base['accuracy']:.3f}, balanced 0.500"]


