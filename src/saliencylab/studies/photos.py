"""Study 1: classify photos with an ImageNet model (Table 1) and draw saliency maps over them (Figure 2)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliencylab.data.images import LoadedImage, iter_images
from saliencylab.errors import UserError
from saliencylab.fsutil import staged_dir, write_json, write_npy, write_png
from saliencylab.methods import MethodSpec, resolve_target
from saliencylab.methods.convergence import ConvergenceRule, checked_map
from saliencylab.models.registry import Classifier
from saliencylab.ops import resize
from saliencylab.render import GridRow, normalise, overlay, saliency_grid, smooth, to_uint8


def batched(images: Iterator[LoadedImage], size: int) -> Iterator[list[LoadedImage]]:
    """Group a stream of images into lists of at most `size`."""
    batch: list[LoadedImage] = []
    for img in images:
        batch.append(img)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def probabilities(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities [B, K]: softmax, or (1 - p, p) from a single-logit sigmoid head."""
    with torch.inference_mode():
        logits = clf.module(x).float()  # float32 also under bf16 autocast
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return logits.softmax(dim=1)


def top_k(clf: Classifier, probs: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
    """Per image, the k most probable classes as {rank, index, class, probability}."""
    k = min(k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [[{"rank": r + 1, "index": int(i), "class": clf.class_names[int(i)], "probability": float(v)}
             for r, (v, i) in enumerate(zip(vs, idx, strict=True))]
            for vs, idx in zip(values.cpu(), indices.cpu(), strict=True)]


def nothing_read(skipped: Sequence[tuple[str, str]]) -> UserError:
    """The one-line refusal when `--skip-bad` skipped every input: nothing is written, exit 2."""
    if not skipped:
        return UserError("no input image; pass files, folders, globs or sample:<name>")
    if len(skipped) == 1:
        return UserError(f"the only input could not be read, so nothing was written: {skipped[0][1]}")
    return UserError(f"none of the {len(skipped)} inputs could be read, so nothing was written; first: "
                     f"{skipped[0][1]} ({len(skipped) - 1} more skipped)")


def classify(clf: Classifier, sources: Sequence[str], *, k: int = 5, batch_size: int = 8,
             skip_bad: bool = False, skipped: list[tuple[str, str]] | None = None) -> Iterator[dict[str, Any]]:
    """Top-k predictions per image, streamed batch by batch."""
    for batch in batched(iter_images(sources, skip_bad=skip_bad, skipped=skipped), batch_size):
        x = torch.stack([clf.preprocess(img.pixels) for img in batch]).to(clf.device)
        for img, top in zip(batch, top_k(clf, probabilities(clf, x), k), strict=True):
            yield {"source": img.source, "name": img.name, "size": list(img.size), "top": top}


@dataclass(frozen=True)
class DisplaySettings:
    """How maps are drawn; the raw .npy maps are never affected.

    Attributes:
        sign: 'abs' shows |map| (the article's look), 'positive' clips negatives, 'signed' keeps both
            signs on a diverging colormap.
        smooth: Gaussian sigma as a fraction of the image's longer side (0: off).
        normalise: 'auto' (each method's preferred mode), 'absmax', 'minmax' or 'percentile'
            (see `render.normalise`).
        alpha: overlay opacity at the map's peak; opacity follows the saliency (`render.opacity`), so
            values below 0.1 leave the image as it is.
        cmap: matplotlib colormap (None: inferno, perceptually uniform, or bwr for signed maps).
    """

    sign: str = "abs"
    smooth: float = 0.01
    normalise: str = "auto"
    alpha: float = 0.7
    cmap: str | None = None

    def render(self, m: np.ndarray, preferred: str = "percentile") -> np.ndarray:
        """Raw map (H, W) -> normalised display map; `preferred` is the method's mode for 'auto'."""
        if self.sign == "abs":
            m = np.abs(m)
        elif self.sign == "positive":
            m = np.clip(m, 0, None)
        m = smooth(m, self.smooth * max(m.shape))
        return normalise(m, preferred if self.normalise == "auto" else self.normalise)  # type: ignore[arg-type]


@dataclass
class ExplainResult:
    """What `explain` wrote, for the caller to print."""

    out: Path
    images: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _safe_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^\w.-]+", "_", name).strip("._") or "image"
    out, i = base, 2
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _thumbnail(a: np.ndarray, longest: int = 320) -> np.ndarray:
    h, w = a.shape[:2]
    if max(h, w) <= longest:
        return a
    size = (max(1, round(h * longest / max(h, w))), max(1, round(w * longest / max(h, w))))
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return (t[0] if a.ndim == 2 else t.permute(1, 2, 0)).numpy()


def explain(clf: Classifier, sources: Sequence[str], methods: Sequence[MethodSpec], out: str | Path, *,
            options: dict[str, dict[str, Any]] | None = None, target: str = "predicted", top: int = 5,
            batch_size: int = 4, display: DisplaySettings = DisplaySettings(), grid_rows: int = 8,
            skip_bad: bool = False, progress: bool | None = None, command: str = "",
            model_args: dict[str, Any] | None = None, precision: str = "fp32",
            convergence: ConvergenceRule = ConvergenceRule()) -> ExplainResult:
    """Run each method on each image; write overlays, raw maps, a figure grid and results.json under `out`.

    Outputs are staged and moved into `out` only when every image succeeded (or was skipped with
    `skip_bad`), so a failed run leaves no partial files.

    Args:
        options: per-method keyword options, e.g. {'smoothgrad': {'n_samples': 32}}.
        target: see `resolve_target` ('predicted', an index, a class name, 'positive'/'negative').
        batch_size: images per batch (sampling methods chunk further by their own batch_size).
        grid_rows: at most this many images go into figure.png (all get their own files).
        model_args: how the model was loaded ({'model': ..., 'weights': ...}), so `audit` can reload it.
        precision: 'fp32', 'tf32' or 'bf16' for every model call (see `saliencylab.precision`).
        convergence: the convergence rule (IG steps adapted per image, half-split checks for SmoothGrad and
            RISE); per-image records go into results.json under 'convergence', warnings into the result.

    results.json records the device, the precision and, per sampling method, the pass size it used
    ('passes': {'rule', 'samples_per_pass'}, from `methods._common.record_passes`).
    """
    from tqdm import tqdm

    from saliencylab.methods._common import describe_passes, record_passes
    from saliencylab.precision import precision as run_at

    options = options or {}
    pass_log: dict[str, list[Any]] = {m.name: [] for m in methods}
    result = ExplainResult(out=Path(out))
    seconds = dict.fromkeys((m.name for m in methods), 0.0)
    grid: list[GridRow] = []
    taken: set[str] = set()
    records: list[dict[str, Any]] = []
    disable = None if progress is None else not progress  # None: show only on a terminal
    with staged_dir(out) as stage, tqdm(total=len(sources) * len(methods), unit="map", disable=disable,
                                         desc="explain") as bar, run_at(precision, clf.device) as precision:
        stream = iter_images(sources, skip_bad=skip_bad, skipped=result.skipped)
        for batch in batched(stream, batch_size):
            x = torch.stack([clf.preprocess(img.pixels) for img in batch]).to(clf.device)
            probs = probabilities(clf, x)
            tops = top_k(clf, probs, top)
            tgt = resolve_target(clf.module, x, target, clf.class_names)
            maps: dict[str, np.ndarray] = {}
            extras: dict[str, list[float]] = {}
            checks: dict[str, list[dict[str, Any]]] = {}
            for spec in methods:
                opts = options.get(spec.name, {})
                t0 = time.perf_counter()
                with record_passes() as passes:
                    checked = checked_map(spec, clf.module, x, tgt, opts, convergence,
                                          names=[img.source for img in batch])
                raw = checked.map
                pass_log[spec.name] += passes
                if clf.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[spec.name] += time.perf_counter() - t0
                if checked.per_image:
                    checks[spec.name] = checked.per_image
                result.warnings += checked.warnings
                if spec.name == "integrated_gradients":
                    extras["ig_completeness_error"] = [r["completeness_error"] for r in checked.per_image]
                maps[spec.name] = raw.detach().float().cpu()
                bar.update(len(batch))
            for i, img in enumerate(batch):
                name = _safe_name(img.name, taken)
                folder = stage / name
                write_png(folder / "image.png", to_uint8(img.pixels))
                row_maps = []
                record: dict[str, Any] = {
                    "source": img.source, "name": name, "size": list(img.size), "decoded": img.meta,
                    "top": tops[i],
                    "target": {"index": int(tgt[i]), "class": clf.class_names[int(tgt[i])],
                               "probability": float(probs[i, int(tgt[i])])},
                    "maps": {},
                }
                for key, vals in extras.items():
                    record[key] = vals[i]
                record["convergence"] = {m: rows[i] for m, rows in checks.items()}
                for spec in methods:
                    full = resize(maps[spec.name][i][None, None], img.size)[0, 0].numpy()  # (H, W) of the original
                    write_npy(folder / f"{spec.name}.npy", full.astype(np.float32))
                    shown = display.render(full, spec.display)
                    write_png(folder / f"{spec.name}.png",
                              overlay(img.pixels, shown, alpha=display.alpha, cmap=display.cmap))
                    record["maps"][spec.name] = {"npy": f"{name}/{spec.name}.npy", "png": f"{name}/{spec.name}.png"}
                    if len(grid) < grid_rows:
                        row_maps.append(display.render(_thumbnail(full), spec.display))
                if len(grid) < grid_rows:
                    t = record["target"]
                    grid.append(GridRow(_thumbnail(img.pixels), f"{name}\n{t['class']} {100 * t['probability']:.1f}%",
                                        row_maps))
                records.append(record)
        if not records:
            raise nothing_read(result.skipped)
        saliency_grid(grid, [m.name for m in methods], stage / "figure.png", alpha=display.alpha, cmap=display.cmap)
        result.images, result.seconds = records, seconds
        write_json(stage / "results.json", {
            "command": command,
            "model": clf.describe(),
            "model_args": model_args or {"model": clf.name, "weights": None},
            "device": str(clf.device),
            "precision": precision,
            "target": target,
            "display": display.__dict__,
            "methods": {m.name: {"options": {**_defaults(m), **options.get(m.name, {})}, "family": m.family,
                                 "paper": m.paper, "seconds": round(seconds[m.name], 4),
                                 "seconds_per_image": round(seconds[m.name] / len(records), 4),
                                 "passes": describe_passes(pass_log[m.name])}
                        for m in methods},
            "images": records,
            "skipped": [{"source": s, "reason": r} for s, r in result.skipped],
            "convergence": {"rule": asdict(convergence), "warnings": result.warnings},
            "figure": "figure.png",
        })
    return result


def _defaults(spec: MethodSpec) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
            for k, v in spec.options().items()}
