"""Study 1: classify photos with an ImageNet model (Table 1) and draw saliency maps over them (Figure 2)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliencylab.data.images import LoadedImage, iter_images
from saliencylab.errors import UserError
from saliencylab.methods import MethodSpec
from saliencylab.methods.convergence import ConvergenceRule, checked_map
from saliencylab.models.registry import Classifier
from saliencylab.render import normalise, smooth
from saliencylab.render.maps import DEFAULT_ALPHA, DEFAULT_SMOOTH
from saliencylab.studies.streaming import StreamConfig


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
    smooth: float = DEFAULT_SMOOTH
    normalise: str = "auto"
    alpha: float = DEFAULT_ALPHA
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
    """What `explain` wrote, for the caller to print.

    Attributes:
        images: a sample of the image records (those in figure.png); results.json lists all of them.
        n_images: how many images the run holds; computed/reused: maps computed now / kept from before.
    """

    out: Path
    images: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_images: int = 0
    computed: int = 0
    reused: int = 0
    grid: int = 0
    removed: int = 0
    warnings: list[str] = field(default_factory=list)  # convergence warnings (the first 50)
    n_warnings: int = 0


def run_method(clf: Classifier, spec: MethodSpec, x: torch.Tensor, target: torch.Tensor, opts: dict[str, Any],
               rule: ConvergenceRule = ConvergenceRule(), names: Sequence[str] | None = None,
               ) -> tuple[torch.Tensor, float, dict[str, list[Any]], dict[str, Any] | None]:
    """One method on one batch, with its convergence check (`methods.convergence.checked_map`).

    Returns the raw map [B, H, W], its seconds, per-image extras ('convergence': one record per image, with
    'warning' where the map is not converged; IG's 'ig_completeness_error') and the pass sizes the sampling
    methods chose (`describe_passes`, None for other methods).
    """
    from saliencylab.methods._common import describe_passes, record_passes

    t0 = time.perf_counter()
    with record_passes() as passes:
        checked = checked_map(spec, clf.module, x, target, opts, rule, names=names)
    if clf.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    extras: dict[str, list[Any]] = {}
    if checked.per_image:
        extras["convergence"] = checked.per_image
    if spec.name == "integrated_gradients":
        extras["ig_completeness_error"] = [r["completeness_error"] for r in checked.per_image]
    return checked.map, seconds, extras, describe_passes(passes)


def explain(clf: Classifier, sources: Sequence[str], methods: Sequence[MethodSpec], out: str | Path, *,
            options: dict[str, dict[str, Any]] | None = None, target: str = "predicted", top: int = 5,
            batch_size: int = 4, display: DisplaySettings = DisplaySettings(), grid_rows: int = 8,
            skip_bad: bool = False, progress: bool | None = None, command: str = "",
            model_args: dict[str, Any] | None = None, stream: StreamConfig | None = None,
            precision: str = "fp32", convergence: ConvergenceRule = ConvergenceRule()) -> ExplainResult:
    """Run each method on each image; write raw maps, overlays, a figure grid and results.json under `out`.

    A resumable job (see `saliencylab.studies.streaming`): each image's outputs are written atomically as it
    finishes and recorded in a per-shard manifest; running again skips what is done, and under torchrun
    every rank takes its own shards. A run of at most one shard that fails leaves no output.

    Args:
        options: per-method keyword options, e.g. {'smoothgrad': {'n_samples': 32}}.
        target: see `resolve_target` ('predicted', an index, a class name, 'positive'/'negative').
        batch_size: images per batch (sampling methods chunk further by their own batch_size).
        grid_rows: at most this many images go into figure.png (all get their own files); `stream.grid` wins.
        model_args: how the model was loaded ({'model': ..., 'weights': ...}), so `audit` can reload it.
        stream: shards, output formats, workers, --force/--resume (default: StreamConfig(grid=grid_rows)).
        precision: 'fp32', 'tf32' or 'bf16' for every model call (see `saliencylab.precision`).
        convergence: the convergence rule (IG steps adapted per image, half-split checks for SmoothGrad and
            RISE); per-image records go into results.json under 'convergence', warnings into the result.

    results.json records the device, the precision and, per sampling method, the pass size it used
    ('passes': {'rule', 'samples_per_pass'}, from `methods._common.record_passes`).
    """
    from saliencylab.studies.streaming import explain_stream

    options = options or {}
    stream = stream or StreamConfig(grid=grid_rows)
    res = explain_stream(clf, list(sources), methods, out, options=options, target=target, top=top,
                         batch_size=batch_size, display=display, cfg=stream, skip_bad=skip_bad, progress=progress,
                         command=command, model_args=model_args or {"model": clf.name, "weights": None},
                         defaults={m.name: {**_defaults(m), **options.get(m.name, {})} for m in methods},
                         precision=precision, convergence=convergence)
    return ExplainResult(out=Path(out), images=res.images, seconds=res.seconds, skipped=res.skipped,
                         n_images=res.n_images, computed=res.computed, reused=res.reused, grid=res.grid,
                         removed=res.removed, warnings=res.warnings, n_warnings=res.n_warnings)


def _defaults(spec: MethodSpec) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
            for k, v in spec.options().items()}
