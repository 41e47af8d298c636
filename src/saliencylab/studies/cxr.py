"""Study 2: evaluate a chest X-ray classifier on its test split (or another dataset) and draw Figure 3."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliencylab.data.datasets import Record, load_mask
from saliencylab.dist import World, gather_shards, local_device, my_shards, process_group, shard_bounds, world
from saliencylab.errors import UserError
from saliencylab.fsutil import write_json, write_text
from saliencylab.metrics.classification import binary_metrics, in_words
from saliencylab.models.registry import Classifier
from saliencylab.render.figures import save_figure
from saliencylab.studies.subject import Subject, check_input, class_probabilities, load_batch, load_run, resolve

__all__ = ["evaluate", "figure_3", "load_run", "summary_lines"]


def evaluate(run: str | Path | None = None, *, model: str | None = None, weights: str | None = None,
             data: str | Path | None = None, classes: tuple[str, ...] | None = None, masks: str | Path | None = None,
             n: int | None = None, threshold: float = 0.5, out: str | Path | None = None, figure3: bool = True,
             methods: str = "vanilla,smoothgrad,integrated_gradients,gradcam", n_per_side: int = 2, low: float = 0.1,
             high: float = 0.9, seed: int = 0, batch_size: int = 64, progress: bool | None = None,
             log: Any = None, model_kwargs: dict[str, Any] | None = None, device: str = "cpu",
             precision: str = "fp32") -> dict[str, Any]:
    """Write predictions.csv, metrics.json, unreadable.json, ROC / confusion / histogram PNGs and Figure 3.

    The model and images come from a run folder (its test split; with `data`, the images of that dataset
    whose names are in the test split, else all of them) or from `model` + `data` (every image, or a seeded
    sample of `n`). Images stream through in batches of `batch_size`: memory stays flat in their number.
    Unreadable images are skipped and listed (console, unreadable.json, metrics.json). The model runs on
    `device` ('auto', 'cpu', 'cuda'; under torchrun cuda:<local rank>) at `precision` ('fp32', 'tf32',
    'bf16'), both recorded in metrics.json.

    Under torchrun each rank predicts its share of the batches (batches r, r + world, ...) and rank 0 alone
    writes the files, the same files as one process.
    """
    from saliencylab.precision import check_precision

    precision = check_precision(precision)
    w = world()
    with process_group(w, torch.device("cpu")):
        return _evaluate(w, run, model=model, weights=weights, data=data, classes=classes, masks=masks, n=n,
                         threshold=threshold, out=out, figure3=figure3, methods=methods, n_per_side=n_per_side,
                         low=low, high=high, seed=seed, batch_size=batch_size,
                         progress=progress if w.main else False, log=log if w.main else None,
                         model_kwargs=model_kwargs, device=local_device(device, w), precision=precision)


def _evaluate(w: World, run: str | Path | None, *, model: str | None, weights: str | None, data: str | Path | None,
              classes: tuple[str, ...] | None, masks: str | Path | None, n: int | None, threshold: float,
              out: str | Path | None, figure3: bool, methods: str, n_per_side: int, low: float, high: float,
              seed: int, batch_size: int, progress: bool | None, log: Any,
              model_kwargs: dict[str, Any] | None, device: torch.device, precision: str) -> dict[str, Any]:
    from saliencylab.precision import precision as run_at

    subject = resolve(run, model=model, weights=weights, data=data, classes=classes, masks=masks, n=n, seed=seed,
                      model_kwargs=model_kwargs, device=device)
    if not subject.labelled:
        raise UserError(f"'{subject.base}' is an explain folder without labels; pass --data DIR (labelled images)")
    if not subject.binary:
        raise UserError(f"evaluate reports binary metrics; this model has {len(subject.classes)} classes "
                        f"({', '.join(subject.classes)}): use `saliencylab audit` for it, or --classes NEG,POS "
                        "with a binary model")
    out = Path(out) if out else subject.default_out("eval", str(data) if data else None)
    with run_at(precision, subject.clf.device):
        probs, kept, bad = _predict(subject, batch_size, progress, w)
    if log is not None and bad:
        log(f"{len(bad)} unreadable images skipped: " + ", ".join(f for f, _ in bad[:10])
            + (" ..." if len(bad) > 10 else "") + f" (listed in {out / 'unreadable.json'})")
    if not kept:
        raise UserError(f"no readable image in '{subject.origin.get('data')}' ({len(bad)} unreadable); "
                        "check the dataset")
    classes = subject.classes
    labels = np.array([r.label for r in kept])
    metrics = binary_metrics(labels, probs, threshold=threshold, seed=seed)
    metrics["in_words"] = in_words(metrics, classes)
    metrics.update({"classes": list(classes), "positive_class": classes[1], "data": str(subject.origin.get("data")),
                    "scope": subject.scope, "unreadable": len(bad),
                    "checkpoint": str(subject.base / "best.pt") if subject.kind == "run" else None,
                    "model": subject.origin.get("model"), "weights": subject.origin.get("weights"),
                    "device": str(subject.clf.device), "precision": precision})
    if not w.main:  # rank 0 writes the files
        return metrics | {"out": str(out), "unreadable_files": [f for f, _ in bad]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "unreadable.json", [{"file": f, "reason": r} for f, r in bad])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "label", "probability", "prediction"])
    for r, p in zip(kept, probs, strict=True):
        w.writerow([r.file, r.label, f"{p:.6f}", int(p >= threshold)])
    write_text(out / "predictions.csv", buf.getvalue())
    write_json(out / "metrics.json", metrics)
    _plots(out, labels, probs, metrics, classes)
    if figure3:
        with run_at(precision, subject.clf.device):
            metrics["figure3"] = figure_3(subject, kept, probs, out, methods=methods, n_per_side=n_per_side,
                                          low=low, high=high, seed=seed)
        write_json(out / "metrics.json", metrics)
    if subject.kind == "model" and out.parent == subject.base:
        write_json(subject.base / "model.json", subject.origin)
    return metrics | {"out": str(out), "unreadable_files": [f for f, _ in bad]}


def _predict(subject: Subject, batch_size: int, progress: bool | None,
             w: World | None = None) -> tuple[np.ndarray, list[Record], list[tuple[str, str]]]:
    """Positive-class probability per readable image, batch by batch; the readable records; the unreadable.

    With several ranks, rank r predicts batches r, r + world, ... and every rank gets all of them, in order.
    """
    from tqdm import tqdm

    w = w or World()
    clf = subject.clf
    bounds = shard_bounds(len(subject.records), batch_size)
    mine: dict[int, tuple[np.ndarray | None, list[Record], list[tuple[str, str]]]] = {}
    with tqdm(total=len(subject.records), unit="img", desc="evaluate", leave=False,
              disable=None if progress is None else not progress) as bar:
        for i in my_shards(len(bounds), w):
            lo, hi = bounds[i]
            x, recs, skipped = load_batch(subject, subject.records[lo:hi])
            p = None
            if recs:
                if not any(v[1] for v in mine.values()):  # the first readable batch of this rank
                        check_input(clf, subject.origin.get("model") or subject.origin.get("run", "?"),
                                str(subject.origin.get("data")), x)
                p = class_probabilities(clf.module, x)[:, 1]
            mine[i] = (p, recs, skipped)
            bar.update((hi - lo) * w.size)
    every = gather_shards(mine, w)
    probs = [every[i][0] for i in range(len(bounds)) if every[i][0] is not None]
    kept = [r for i in range(len(bounds)) for r in every[i][1]]
    bad = [b for i in range(len(bounds)) for b in every[i][2]]
    return (np.concatenate(probs) if probs else np.zeros(0)), kept, bad


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


def figure_3(subject: Subject, records: list[Record], probs: np.ndarray, out: Path, *, methods: str,
             n_per_side: int, low: float, high: float, seed: int) -> dict[str, Any]:
    """Saliency for test images predicted near 0 and near 1 (the article's Figure 3), lung contour on top."""

    from saliencylab.methods import parse_methods, resolve_target
    from saliencylab.render import normalise, overlay, smooth

    clf: Classifier = subject.clf
    specs = parse_methods(methods)
    rng = np.random.default_rng(seed)
    low_idx, high_idx = np.nonzero(probs <= low)[0], np.nonzero(probs >= high)[0]
    chosen = [int(i) for i in rng.permutation(low_idx)[:n_per_side]]
    chosen += [int(i) for i in rng.permutation(high_idx)[:n_per_side]]
    if not chosen:
        return {"images": [], "note": f"no test image predicted <= {low} or >= {high}"}
    x, recs, bad = load_batch(subject, [records[i] for i in chosen])
    if bad:  # rotted since it was read a moment ago
        return {"images": [], "note": f"{len(bad)} of the chosen images became unreadable"}
    side = torch.tensor([0 if probs[i] <= low else 1 for i in chosen])
    target = resolve_target(clf.module, x, side)
    maps = {s.name: s.fn(clf.module, x, target).detach().float().cpu().numpy() for s in specs}
    x = x.cpu()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    fig, axes = plt.subplots(len(chosen), len(specs) + 1, figsize=(2.3 * (len(specs) + 1), 2.5 * len(chosen)),
                             squeeze=False)
    info = []
    for r, i in enumerate(chosen):
        rec = records[i]
        img = x[r, 0].numpy() if x.shape[1] == 1 else x[r].permute(1, 2, 0).numpy()
        lung = load_mask(subject.root, rec.mask, img.shape[0])
        contour = find_boundaries(lung) if lung is not None else None
        name = subject.classes[rec.label]
        axes[r, 0].imshow(img, cmap="gray")
        axes[r, 0].set_title(f"{Path(rec.file).name}\nlabel {name}, predicted {probs[i]:.2f}", fontsize=9)
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
    import textwrap

    title = (f"Test images predicted near 0 (top) and near 1 (bottom); label: the true class, predicted: the "
             f"model's probability of {subject.classes[1]}; green: lung mask")
    fig.suptitle(textwrap.fill(title, int(12 * 2.3 * (len(specs) + 1))), fontsize=10)
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


