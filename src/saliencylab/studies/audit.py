"""Trust: `saliencylab audit` turns the article's limits of saliency maps into numbers, per method.

Localisation against anatomy (lungs, border) and findings (lesions, marker), randomisation sanity checks,
deletion/insertion faithfulness against a random map, stability under noise and shifts, agreement between
methods (and models), and shortcut probes (lungs blacked out; the marker added or removed).

The shape (as PAIR's `metrics/pic.py`): images stream through in batches; each batch becomes one frozen
`Batch` (images, targets, labels, optional masks, one map per method, the model); each check is one
function `(batch, config) -> list[row]` registered with what it needs (`needs=('lungs',)`), returning typed
per-image rows; one aggregate step per check turns its rows into the numbers of `audit.json`; the file
writers come last. A check whose needs are not met is skipped, with its reason in `audit.json` and on the
console. Adding a check: write its row dataclass, its function and its summary, and `register_check` it.

Batches are grouped into shards whose rows are written to OUT/shards as each shard finishes (`audit_store`):
the summaries are always computed from those files, so a killed audit resumes, a torchrun audit splits the
shards over its ranks (rank 0 merges), and neither changes a number.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saliencylab import dist
from saliencylab.data.datasets import Record, load_mask
from saliencylab.errors import UserError
from saliencylab.fsutil import _remove_empty, write_json, write_text
from saliencylab.hashing import digest, file_digest, state_digest
from saliencylab.methods import MethodSpec, get_method, parse_methods
from saliencylab.metrics.localisation import (
    border_mask,
    box_mask,
    corner_mask,
    mask_auroc,
    mass_inside,
    otsu_iou,
    pointing_chance,
    pointing_game,
    relevance_mass_positive,
    relevance_rank_accuracy,
)
from saliencylab.render.figures import save_figure
from saliencylab.studies import audit_store as store
from saliencylab.studies import verdicts
from saliencylab.studies.subject import Subject, check_input, class_probabilities, load_batch, load_run, resolve

MapFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_METHODS = "vanilla,smoothgrad,integrated_gradients,gradcam"

# ---------------------------------------------------------------------------------------------- the context


@dataclass(frozen=True)
class AuditConfig:
    """How much of each check to run.

    Attributes:
        sanity_images: images (of the first batch) for the randomisation checks.
        faithfulness_images: images (the first ones) for deletion / insertion curves.
        road: also fill removed pixels by noisy linear imputation (Rong et al. 2022).
        faithfulness_subsets: random pixel subsets per image for the faithfulness correlation.
        seed: seeds noise, random maps and randomised weights.
    """

    sanity_images: int = 8
    faithfulness_images: int = 16
    road: bool = False
    faithfulness_subsets: int = 50
    seed: int = 0


@dataclass(frozen=True)
class Batch:
    """Everything the checks see of one batch (read-only; no check changes it).

    Attributes:
        offset: index of the first image in the audit (0 for the first batch).
        records: the images' dataset records.
        x: images [B, C, H, W] in [0, 1].
        targets: the class explained per image [B] (what the model predicted, or explain's target).
        labels: true class per image [B], or None without labels.
        probs: class probabilities [B, K] (K = 2 for a single-logit model: [1 - p, p]).
        lungs, lesions, markers: boolean (H, W) masks per image, None where there is none.
        maps: raw saliency [B, H, W] per method name (float32, CPU).
        fns: `(model, x, target) -> maps` per method name, options bound.
        uses_model: per method name, whether its map depends on the model (sanity applies).
        model: the classifier's module.
        others: other models by role ('compare', 'shuffled').
        phantoms: per image, its metadata row and the dataset's drawing settings (None for other data).
    """

    offset: int
    records: tuple[Record, ...]
    x: torch.Tensor
    targets: torch.Tensor
    labels: np.ndarray | None
    probs: np.ndarray
    lungs: tuple[np.ndarray | None, ...]
    lesions: tuple[np.ndarray | None, ...]
    markers: tuple[np.ndarray | None, ...]
    maps: Mapping[str, torch.Tensor]
    fns: Mapping[str, MapFn]
    uses_model: Mapping[str, bool]
    model: nn.Module
    others: Mapping[str, nn.Module] = field(default_factory=dict)
    phantoms: tuple[dict[str, Any] | None, ...] = ()

    @property
    def files(self) -> list[str]:
        return [r.file for r in self.records]


# -------------------------------------------------------------------------------------------- the registry

Needs = tuple[str, ...]
CheckFn = Callable[[Batch, AuditConfig], list[Any]]

NEED_REASONS = {
    "lungs": "no lung masks (use a <class>/masks layout, --masks DIR, or a mask column in the CSV)",
    "lesions": "no lesion masks (phantoms carry them in <class>/lesions)",
    "markers": "no marker boxes (phantoms list them in metadata.csv)",
    "phantoms": "the images are not phantoms that can be redrawn with and without the marker",
    "labels": "the images carry no labels (an explain folder without --data)",
    "binary": "the model is not a binary classifier",
    "two_methods": "only one method was audited",
    "compare": "no second model (--compare)",
    "shuffled": "not asked for (--data-randomisation, on a training run)",
    "smprt": "not asked for (--smprt; about 16 times the cost of the randomisation check)",
}


@dataclass(frozen=True)
class Check:
    """One registered check.

    Attributes:
        run: `(batch, config) -> rows` for one batch (rows are dataclasses, per image or per method).
        summarise: `(rows, config) -> {key: value}`; for a per-method check it gets one method's rows and
            its keys go into `methods[name]`, else they go into `section` of audit.json. It must give the
            same keys (None / NaN) for no rows, so a skipped check keeps the file's shape.
        needs: what must be available ('lungs', 'lesions', 'markers', 'phantoms', 'labels', 'binary',
            'two_methods', 'compare', 'shuffled').
        per_method: rows carry a `method` field and summaries are per method.
        section: where a whole-audit summary goes ('probes' or a top-level key).
    """

    name: str
    run: CheckFn
    summarise: Callable[[list[Any], AuditConfig], dict[str, Any]]
    needs: Needs = ()
    per_method: bool = True
    section: str = "methods"


CHECKS: dict[str, Check] = {}


def register_check(name: str, *, summarise: Callable[[list[Any], AuditConfig], dict[str, Any]],
                   needs: Needs = (), per_method: bool = True, section: str = "methods"
                   ) -> Callable[[CheckFn], CheckFn]:
    """Register a check function under a unique name."""

    def deco(fn: CheckFn) -> CheckFn:
        if name in CHECKS:
            raise ValueError(f"check {name!r} is registered twice")
        CHECKS[name] = Check(name, fn, summarise, needs, per_method, section)
        return fn

    return deco


# ------------------------------------------------------------------------------------------------- helpers


def _nanmean(values: Sequence[float | None]) -> float:
    arr = np.array([v for v in values if v is not None], dtype=np.float64)
    return float(np.nanmean(arr)) if arr.size and np.isfinite(arr).any() else math.nan


def _quiet(fn: Callable[..., float], *args: Any, **kw: Any) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def _score(fn: Callable[..., float], m: torch.Tensor, mask: np.ndarray | None, **kw: Any) -> float:
    return _quiet(fn, m.numpy(), mask, **kw) if mask is not None else math.nan


def _mean_of(rows: list[Any], key: str) -> float:
    return _nanmean([getattr(r, key) for r in rows])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from saliencylab.metrics.similarity import spearman

    return _quiet(spearman, a, b)


def _positive(probs: np.ndarray) -> np.ndarray:
    return probs[:, 1]


# ------------------------------------------------------------------------------------------ localisation


@dataclass(frozen=True)
class RegionRow:
    """Saliency against one region mask (lungs or lesions) for one image and method; NaN without a mask.

    Attributes:
        mass: share of |map| inside (chance: `share`); mass_positive: Arras et al.'s relevance mass
            (positive relevance only; equal to `mass` for unsigned maps).
        pointing: pointing-game hit (tolerance scaled to the image); pointing_chance: a random peak's hit rate.
        rank_accuracy: share of the top-K pixels inside (K = mask size; chance: `share`).
        auroc: the map as a pixel classifier of the mask (chance 0.5).
    """

    file: str
    method: str
    region: str
    mass: float
    mass_positive: float
    share: float
    pointing: float
    pointing_chance: float
    rank_accuracy: float
    auroc: float
    iou: float


def _region_rows(b: Batch, region: str, masks: tuple[np.ndarray | None, ...]) -> list[RegionRow]:
    rows = []
    for name, m in b.maps.items():
        for i, f in enumerate(b.files):
            mask = masks[i]
            rows.append(RegionRow(
                f, name, region, _score(mass_inside, m[i], mask), _score(relevance_mass_positive, m[i], mask),
                float(mask.mean()) if mask is not None else math.nan, _score(pointing_game, m[i], mask),
                _quiet(pointing_chance, mask) if mask is not None else math.nan,
                _score(relevance_rank_accuracy, m[i], mask), _score(mask_auroc, m[i], mask),
                _score(otsu_iou, m[i], mask)))
    return rows


def _region_summary(prefix: str) -> Callable[[list[RegionRow], AuditConfig], dict[str, Any]]:
    def summarise(rows: list[RegionRow], cfg: AuditConfig) -> dict[str, Any]:
        keys = ("mass", "mass_positive", "share", "pointing", "pointing_chance", "rank_accuracy", "auroc", "iou")
        out = {f"{prefix}_{k}": _mean_of(rows, k) for k in keys}
        if prefix == "lung":
            mass, share = out["lung_mass"], out["lung_share"]
            out["lung_ratio"] = mass / share if share and math.isfinite(share) else math.nan
            out["lungs_verdict"] = verdicts.judge([r.mass - r.share for r in rows], "lungs", seed=cfg.seed).as_dict()
        return out

    return summarise


@register_check("lungs", summarise=_region_summary("lung"), needs=("lungs",))
def lungs(b: Batch, cfg: AuditConfig) -> list[RegionRow]:
    """Saliency against the lungs: mass (absolute and positive), pointing game, rank accuracy, mask AUROC,
    each beside its chance level."""
    return _region_rows(b, "lungs", b.lungs)


@dataclass(frozen=True)
class BorderRow:
    """Saliency on the image's border band (10% of the side) and its corners (20% squares)."""

    file: str
    method: str
    border_mass: float
    corner_mass: float


@register_check("border", summarise=lambda rows, cfg: {"border_mass": _mean_of(rows, "border_mass"),
                                                        "corner_mass": _mean_of(rows, "corner_mass")})
def border(b: Batch, cfg: AuditConfig) -> list[BorderRow]:
    """Where markers, rulers and text sit: the border and the corners (no mask needed)."""
    shape = tuple(b.x.shape[-2:])
    band, corners = border_mask(shape, 0.1), corner_mask(shape, 0.2)
    return [BorderRow(f, name, _score(mass_inside, m[i], band), _score(mass_inside, m[i], corners))
            for name, m in b.maps.items() for i, f in enumerate(b.files)]


@register_check("lesions", needs=("lesions",), summarise=_region_summary("lesion"))
def lesions(b: Batch, cfg: AuditConfig) -> list[RegionRow]:
    """Saliency on the findings: the same scores against the lesion mask, threshold-free ones (relevance
    rank accuracy, mask AUROC) included, and the Otsu IoU of CheXlocalize."""
    return _region_rows(b, "lesions", b.lesions)


@dataclass(frozen=True)
class MarkerRow:
    file: str
    method: str
    marker_mass: float
    marker_share: float


def _marker_summary(rows: list[MarkerRow], cfg: AuditConfig) -> dict[str, Any]:
    diffs = [r.marker_mass - r.marker_share for r in rows]
    return {**{k: _mean_of(rows, k) for k in ("marker_mass", "marker_share")},
            "marker_verdict": verdicts.judge(diffs, "marker", seed=cfg.seed).as_dict()}


@register_check("marker", needs=("markers",), summarise=_marker_summary)
def marker(b: Batch, cfg: AuditConfig) -> list[MarkerRow]:
    """Saliency on the laterality marker (images without one: NaN; chance: the marker's share)."""
    return [MarkerRow(f, name, _score(mass_inside, m[i], b.markers[i]),
                      float(b.markers[i].mean()) if b.markers[i] is not None else math.nan)
            for name, m in b.maps.items() for i, f in enumerate(b.files)]


@dataclass(frozen=True)
class FlagRow:
    """Whether one image's map sits off the anatomy beyond chance (see `verdicts.flag_image`).

    Attributes:
        reasons: 'marker' and/or 'outside lungs', space-joined ('' when not flagged).
        score: the larger excess over chance (marker mass minus its share, or the lungs' share minus the
            mass inside them); the most telling images have the largest.
    """

    file: str
    method: str
    reasons: str
    score: float
    marker_excess: float
    marker_null: float
    lung_deficit: float
    lung_null: float


def _flags_summary(rows: list[FlagRow], cfg: AuditConfig) -> dict[str, Any]:
    hit = sorted((r for r in rows if r.reasons), key=lambda r: -r.score)
    return {"flagged": [r.file for r in hit], "flag_reasons": {r.file: r.reasons for r in hit},
            "flag_rule": {"marker_excess": verdicts.FLAG_MARKER_EXCESS, "random_boxes": verdicts.FLAG_BOXES,
                          "lung_deficit": verdicts.FLAG_LUNG_DEFICIT}}


@register_check("flags", summarise=_flags_summary)
def flags(b: Batch, cfg: AuditConfig) -> list[FlagRow]:
    """Flag images whose saliency falls on the marker beyond every marker-sized box at a random position (and
    1 point above the marker's share), or outside the lungs 10 points beyond a random map's share and beyond
    the same map moved to any random place."""
    rows = []
    for name, m in b.maps.items():
        for i, f in enumerate(b.files):
            got = verdicts.flag_image(m[i].numpy(), b.lungs[i], b.markers[i], seed=cfg.seed + b.offset + i)
            rows.append(FlagRow(f, name, " ".join(got.reasons), got.score, got.marker_excess, got.marker_null,
                                got.lung_deficit, got.lung_null))
    return rows


# ------------------------------------------------------------------------------------------------ stability


@dataclass(frozen=True)
class StabilityRow:
    """Similarity of the map with the map of a noisy / shifted copy; max-sensitivity on the first batch."""

    file: str
    method: str
    noise_spearman: float
    noise_ssim: float
    shift_spearman: float
    shift_ssim: float
    max_sensitivity: float | None
    unrelated_spearman: float = math.nan


def _stability_summary(rows: list[StabilityRow], cfg: AuditConfig) -> dict[str, Any]:
    keys = ("noise_spearman", "noise_ssim", "shift_spearman", "shift_ssim", "unrelated_spearman")
    diffs = [r.noise_spearman - r.unrelated_spearman for r in rows]
    return {**{k: _mean_of(rows, k) for k in keys}, "max_sensitivity": _mean_of(rows, "max_sensitivity"),
            "stability_verdict": verdicts.judge(diffs, "stability", seed=cfg.seed).as_dict()}


@register_check("stability", summarise=_stability_summary)
def stability_check(b: Batch, cfg: AuditConfig) -> list[StabilityRow]:
    """Stability under small noise and a 3-pixel shift; max-sensitivity (Yeh et al. 2019) on the first batch.
    Its chance level: the Spearman correlation of the map with the map of the next image in the batch (a map
    that looks the same on every image is stable without telling anything)."""
    from saliencylab.metrics.stability import max_sensitivity, stability

    rows = []
    n = len(b.x)
    for name, fn in b.fns.items():
        m = b.maps[name].numpy()
        unrelated = [_spearman(m[i], m[(i + 1) % n]) if n > 1 else math.nan for i in range(n)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st = stability(b.model, b.x, b.targets, fn, maps=b.maps[name], seed=cfg.seed)
            sens = (max_sensitivity(b.model, b.x, b.targets, fn, n_samples=4, seed=cfg.seed, maps=b.maps[name])
                    .tolist() if b.offset == 0 else [None] * len(b.x))
        rows += [StabilityRow(f, name, s["noise_spearman"], s["noise_ssim"], s["shift_spearman"], s["shift_ssim"],
                              None if v is None else float(v), u)
                 for f, s, v, u in zip(b.files, st, sens, unrelated, strict=True)]
    return rows


# -------------------------------------------------------------------------------------------- faithfulness


@dataclass(frozen=True)
class FaithfulnessRow:
    """Area under one deletion / insertion curve: most relevant first (`map`), a random map, least first."""

    file: str
    method: str
    fill: str
    mode: str
    map: float
    random: float
    lerf: float


def _faithfulness_summary(rows: list[FaithfulnessRow], cfg: AuditConfig) -> dict[str, Any]:
    fills = ["blur", "noisy_linear"] if cfg.road else ["blur"]
    out: dict[str, Any] = {}
    for fill in fills:
        out[fill] = {mode: {k: _mean_of([r for r in rows if r.fill == fill and r.mode == mode], k)
                            for k in ("map", "random", "lerf")} for mode in ("deletion", "insertion")}
    # per image, oriented so that positive is better: deletion (lower is better) random - map, insertion map - random
    gain = {mode: {r.file: (r.random - r.map if mode == "deletion" else r.map - r.random)
                   for r in rows if r.fill == "blur" and r.mode == mode} for mode in ("deletion", "insertion")}
    both = [(gain["deletion"][f] + gain["insertion"][f]) / 2 for f in gain["deletion"] if f in gain["insertion"]]
    return {"faithfulness": out, "faithfulness_images": len({r.file for r in rows}),
            "deletion_verdict": verdicts.judge(list(gain["deletion"].values()), "deletion", seed=cfg.seed).as_dict(),
            "insertion_verdict": verdicts.judge(list(gain["insertion"].values()), "insertion", seed=cfg.seed).as_dict(),
            "faithfulness_verdict": verdicts.judge(both, "faithfulness", seed=cfg.seed).as_dict()}


@register_check("faithfulness", summarise=_faithfulness_summary)
def faithfulness(b: Batch, cfg: AuditConfig) -> list[FaithfulnessRow]:
    """Deletion and insertion (Petsiuk et al. 2018) on the first `faithfulness_images` images, against a
    random map and the least-relevant-first order; blur fill, and noisy linear imputation with `road`."""
    from saliencylab.metrics.faithfulness import area, removal_curve

    k = max(0, min(cfg.faithfulness_images - b.offset, len(b.x)))
    fills = ["blur", "noisy_linear"] if cfg.road else ["blur"]
    rows = []
    for name, maps in b.maps.items():
        gen = torch.Generator().manual_seed(cfg.seed + b.offset)
        for i in range(k):
            rand = torch.rand(maps[i].shape, generator=gen)
            for fill in fills:
                for mode in ("deletion", "insertion"):
                    areas = [area(removal_curve(b.model, b.x[i], b.targets[i], m, mode=mode, fill=fill, order=order,
                                                steps=10, seed=cfg.seed))
                             for m, order in ((maps[i], "morf"), (rand, "morf"), (maps[i], "lerf"))]
                    rows.append(FaithfulnessRow(b.records[i].file, name, fill, mode, *areas))
    return rows


@dataclass(frozen=True)
class CorrelationRow:
    """Faithfulness correlation of one image's map (Bhatt et al. 2020; chance 0)."""

    file: str
    method: str
    correlation: float


@register_check("faithfulness_correlation", summarise=lambda rows, cfg: {
    "faithfulness_correlation": _mean_of(rows, "correlation")})
def faithfulness_correlation_check(b: Batch, cfg: AuditConfig) -> list[CorrelationRow]:
    """Correlation between the saliency of random pixel subsets and the score drop when they are removed,
    on the first `faithfulness_images` images."""
    from saliencylab.metrics.faithfulness import faithfulness_correlation

    k = max(0, min(cfg.faithfulness_images - b.offset, len(b.x)))
    if not k:
        return []
    rows = []
    for name, maps in b.maps.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            corr = faithfulness_correlation(b.model, b.x[:k], b.targets[:k], maps[:k],
                                            n_subsets=cfg.faithfulness_subsets, seed=cfg.seed)
        rows += [CorrelationRow(b.files[i], name, float(c)) for i, c in enumerate(corr)]
    return rows


@dataclass(frozen=True)
class ComplexityRow:
    """How concentrated a map is: Gini sparseness of |map| (higher: sparser; constant 0) and its normalised
    entropy (lower: simpler; constant 1)."""

    file: str
    method: str
    sparseness: float
    complexity: float
    signed: bool


@register_check("complexity", summarise=lambda rows, cfg: {
    "sparseness": _mean_of(rows, "sparseness"), "complexity": _mean_of(rows, "complexity"),
    "signed": bool(rows) and any(r.signed for r in rows)})
def complexity_check(b: Batch, cfg: AuditConfig) -> list[ComplexityRow]:
    """Sparseness (Chalasani et al. 2020) and complexity (Bhatt et al. 2020) of each map."""
    from saliencylab.metrics.complexity import complexity, sparseness

    return [ComplexityRow(f, name, _quiet(sparseness, m[i].numpy()), _quiet(complexity, m[i].numpy(), normalised=True),
                          bool((m[i] < 0).any()))
            for name, m in b.maps.items() for i, f in enumerate(b.files)]


# ------------------------------------------------------------------------------------------------- sanity


@dataclass(frozen=True)
class SanityRow:
    """The randomisation checks of one method (cascading and independent), on the first batch's images."""

    method: str
    cascading: dict[str, Any] | None
    independent: dict[str, Any] | None


@register_check("sanity", summarise=lambda rows, cfg: {
    "sanity": rows[0].cascading if rows else None, "sanity_independent": rows[0].independent if rows else None})
def sanity(b: Batch, cfg: AuditConfig) -> list[SanityRow]:
    """Cascading and independent model randomisation (Adebayo et al. 2018); None for model-free methods."""
    from saliencylab.metrics.sanity import randomisation_check

    if b.offset:
        return []
    k = min(cfg.sanity_images, len(b.x))
    rows = []
    for name, fn in b.fns.items():
        if not b.uses_model[name]:
            rows.append(SanityRow(name, None, None))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(SanityRow(name, *(randomisation_check(b.model, b.x[:k], b.targets[:k], fn, seed=cfg.seed,
                                                              mode=mode) for mode in ("cascading", "independent"))))
    return rows


@dataclass(frozen=True)
class RandomLogitRow:
    """Similarity (SSIM) of the map for the explained class and for another class; `identical` when the two
    maps are the same (a single-logit model with a sign-free method), with the reason."""

    file: str
    method: str
    similarity: float
    identical: bool
    reason: str | None


def _random_logit_summary(rows: list[RandomLogitRow], cfg: AuditConfig) -> dict[str, Any]:
    identical = bool(rows) and all(r.identical for r in rows)
    return {"random_logit": _mean_of(rows, "similarity"), "random_logit_identical": identical,
            "random_logit_note": rows[0].reason if identical else None}


@register_check("random_logit", summarise=_random_logit_summary)
def random_logit_check(b: Batch, cfg: AuditConfig) -> list[RandomLogitRow]:
    """Random Logit (Sixt et al. 2020) on the first batch's `sanity_images` images: is the map for one class
    different from the map for another? Lower is better; compare with the sanity check's unrelated-images line."""
    from saliencylab.metrics.sanity import random_logit

    if b.offset:
        return []
    k = min(cfg.sanity_images, len(b.x))
    rows = []
    for name, fn in b.fns.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = random_logit(b.model, b.x[:k], b.targets[:k], fn, seed=cfg.seed, maps=b.maps[name][:k])
        rows += [RandomLogitRow(b.files[i], name, float(g["similarity"]), bool(g["identical"]), g.get("reason"))
                 for i, g in enumerate(got)]
    return rows


@dataclass(frozen=True)
class MprtRow:
    """eMPRT (and sMPRT when asked) of one method on the first batch."""

    method: str
    result: dict[str, Any] | None


@register_check("emprt", summarise=lambda rows, cfg: {
    "emprt_rise": rows[0].result["mean_rise"] if rows and rows[0].result else math.nan})
def emprt(b: Batch, cfg: AuditConfig) -> list[MprtRow]:
    """eMPRT (Hedström et al. 2023): relative rise of the map's complexity when every layer is randomised
    (0: the map ignores the model; higher is better), on the first batch's `sanity_images` images."""
    from saliencylab.metrics.sanity import efficient_mprt

    if b.offset:
        return []
    k = min(cfg.sanity_images, len(b.x))
    rows = []
    for name, fn in b.fns.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(MprtRow(name, efficient_mprt(b.model, b.x[:k], b.targets[:k], fn, seed=cfg.seed,
                                                     maps=b.maps[name][:k])))
    return rows


@register_check("smprt", needs=("smprt",), summarise=lambda rows, cfg: {"smprt": rows[0].result if rows else None})
def smprt(b: Batch, cfg: AuditConfig) -> list[MprtRow]:
    """sMPRT (Hedström et al. 2023): the randomisation check on maps averaged over noisy copies, bottom-up."""
    from saliencylab.metrics.sanity import smooth_mprt

    if b.offset:
        return []
    k = min(cfg.sanity_images, len(b.x))
    rows = []
    for name, fn in b.fns.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows.append(MprtRow(name, smooth_mprt(b.model, b.x[:k], b.targets[:k], fn, seed=cfg.seed)
                                if b.uses_model[name] else None))
    return rows


@dataclass(frozen=True)
class AgreementRow:
    """Spearman rank correlation between this map and another one of the same image."""

    file: str
    method: str
    spearman: float


def _other_maps_check(role: str) -> Callable[[Batch, AuditConfig], list[AgreementRow]]:
    def run(b: Batch, cfg: AuditConfig) -> list[AgreementRow]:
        rows = []
        for name, fn in b.fns.items():
            other = fn(b.others[role], b.x, b.targets).detach().float().cpu().numpy()
            rows += [AgreementRow(f, name, _spearman(b.maps[name][i].numpy(), other[i])) for i, f in enumerate(b.files)]
        return rows

    run.__doc__ = f"Rank agreement of each map with the same method's map on the {role} model."
    return run


register_check("data_randomisation", needs=("shuffled",), summarise=lambda rows, cfg: {
    "data_randomisation_spearman": _mean_of(rows, "spearman")})(_other_maps_check("shuffled"))
register_check("agreement_between_models", needs=("compare",), summarise=lambda rows, cfg: {
    "agreement_between_models": _mean_of(rows, "spearman")})(_other_maps_check("compare"))


@dataclass(frozen=True)
class MethodPairRow:
    file: str
    a: str
    b: str
    spearman: float


def _pairs_summary(rows: list[MethodPairRow], cfg: AuditConfig) -> dict[str, Any]:
    pairs = list(dict.fromkeys((r.a, r.b) for r in rows))
    return {"agreement_between_methods": [
        {"methods": [a, b], "spearman": _nanmean([r.spearman for r in rows if (r.a, r.b) == (a, b)])}
        for a, b in pairs]}


@register_check("agreement_between_methods", needs=("two_methods",), per_method=False, section="",
                summarise=_pairs_summary)
def agreement_between_methods(b: Batch, cfg: AuditConfig) -> list[MethodPairRow]:
    """Rank agreement between every pair of methods on the same image."""
    names = list(b.maps)
    return [MethodPairRow(f, a, c, _spearman(b.maps[a][i].numpy(), b.maps[c][i].numpy()))
            for ai, a in enumerate(names) for c in names[ai + 1:] for i, f in enumerate(b.files)]


# ------------------------------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class PredictionRow:
    """The model's prediction for one image and its true label."""

    file: str
    label: int
    prediction: int
    probability: float  # of the positive class for a binary model, else of the predicted class


@register_check("accuracy", needs=("labels",), per_method=False, section="probes", summarise=lambda rows, cfg: {
    "accuracy": float(np.mean([r.label == r.prediction for r in rows])) if rows else math.nan})
def accuracy(b: Batch, cfg: AuditConfig) -> list[PredictionRow]:
    """Accuracy of the model on the audited images."""
    assert b.labels is not None
    pred = b.probs.argmax(1)
    prob = _positive(b.probs) if b.probs.shape[1] == 2 else b.probs.max(1)
    return [PredictionRow(f, int(b.labels[i]), int(pred[i]), float(prob[i])) for i, f in enumerate(b.files)]


@dataclass(frozen=True)
class BlackedOutRow:
    """Positive probability with the lungs blacked out (images with a lung mask)."""

    file: str
    label: int
    probability: float


def _blacked_summary(rows: list[BlackedOutRow], cfg: AuditConfig) -> dict[str, Any]:
    from saliencylab.metrics.classification import binary_metrics

    if not rows:
        return {"lungs_blacked_out": None}
    labels = np.array([r.label for r in rows])
    m = binary_metrics(labels, np.array([r.probability for r in rows], dtype=float), n_boot=200, seed=cfg.seed)
    # blacking out moves every probability, so besides accuracy at 0.5 the AUROC tells whether the rest of
    # the image still separates the classes (0.5: it does not)
    return {"lungs_blacked_out": {
        "images": len(rows), "accuracy": m["accuracy"]["value"], "balanced_accuracy": m["balanced_accuracy"]["value"],
        "auroc": m["auroc"]["value"], "auroc_ci": [m["auroc"]["ci_low"], m["auroc"]["ci_high"]],
        "majority_baseline_accuracy": m["majority_baseline"]["accuracy"]}}


@register_check("lungs_blacked_out", needs=("lungs", "labels", "binary"), per_method=False, section="probes",
                summarise=_blacked_summary)
def lungs_blacked_out(b: Batch, cfg: AuditConfig) -> list[BlackedOutRow]:
    """Predictions with the lungs blacked out (Maguolo & Nanni 2021,
    https://doi.org/10.1016/j.inffus.2021.04.008): a model that still separates the classes reads something else."""
    from saliencylab.metrics.probes import blacked_out

    assert b.labels is not None
    have = [i for i, m in enumerate(b.lungs) if m is not None]
    if not have:
        return []
    p = _positive(class_probabilities(b.model, blacked_out(b.x[have], [b.lungs[i] for i in have])))
    return [BlackedOutRow(b.records[i].file, int(b.labels[i]), float(v)) for i, v in zip(have, p, strict=True)]


@dataclass(frozen=True)
class MarkerSwapRow:
    """Positive probability of the same phantom drawn with and without the laterality marker."""

    file: str
    label: int
    with_marker: float
    without_marker: float


def _swap_summary(rows: list[MarkerSwapRow], cfg: AuditConfig) -> dict[str, Any]:
    from saliencylab.metrics.probes import flips

    if not rows:
        return {"marker_swap": None}
    w, wo = np.array([r.with_marker for r in rows]), np.array([r.without_marker for r in rows])
    labels = np.array([r.label for r in rows])
    f = flips(w, wo)
    return {"marker_swap": {
        "images": f["images"], "flips": f["flips"], "flip_rate": f["flip_rate"],
        "positive_rate_with_marker": f["positive_rate_a"], "positive_rate_without_marker": f["positive_rate_b"],
        "accuracy_with_marker": float(((w >= 0.5) == labels).mean()),
        "accuracy_without_marker": float(((wo >= 0.5) == labels).mean())}}


@register_check("marker_swap", needs=("phantoms", "labels", "binary"), per_method=False, section="probes",
                summarise=_swap_summary)
def marker_swap(b: Batch, cfg: AuditConfig) -> list[MarkerSwapRow]:
    """Each phantom redrawn from its seed with and without the marker: how many predictions flip."""
    from saliencylab.data import shortcuts

    assert b.labels is not None
    have = [i for i, ph in enumerate(b.phantoms) if ph is not None]
    if not have:
        return []
    with_marker, without = (_positive(class_probabilities(b.model, x)) for x in shortcuts.swapped(
        "marker", [b.phantoms[i]["row"] for i in have], b.phantoms[have[0]]["settings"], input_size=b.x.shape[-1],
        channels=b.x.shape[1]))  # every other family, the anatomy source and the exposure as stored
    return [MarkerSwapRow(b.records[i].file, int(b.labels[i]), float(with_marker[j]), float(without[j]))
            for j, i in enumerate(have)]


# the phantoms' other shortcut families (DeGrave et al. 2021), by the settings key of their per-class rates
SHORTCUT_RATES = {"text": "text_rate", "site": "site_rate", "position": "ap_rate", "devices": "device_rate"}


@dataclass(frozen=True)
class ShortcutSwapRow:
    """Positive probability of the same phantom drawn with one shortcut family present and absent."""

    file: str
    family: str
    present: float
    absent: float


def _shortcut_summary(rows: list[ShortcutSwapRow], cfg: AuditConfig) -> dict[str, Any]:
    from saliencylab.metrics.probes import flips

    out: dict[str, Any] = {f"{family}_swap": None for family in SHORTCUT_RATES}
    for family in SHORTCUT_RATES:
        mine = [r for r in rows if r.family == family]
        if mine:
            f = flips(np.array([r.present for r in mine]), np.array([r.absent for r in mine]))
            out[f"{family}_swap"] = {"images": f["images"], "flips": f["flips"], "flip_rate": f["flip_rate"],
                                     "positive_rate_present": f["positive_rate_a"],
                                     "positive_rate_absent": f["positive_rate_b"]}
    return out


@register_check("shortcut_swaps", needs=("phantoms", "binary"), per_method=False, section="probes",
                summarise=_shortcut_summary)
def shortcut_swaps(b: Batch, cfg: AuditConfig) -> list[ShortcutSwapRow]:
    """For every shortcut family the phantoms were drawn with (text, site, position, devices; a rate above
    0 in any class), each phantom redrawn with the family present and absent: how many decisions flip."""
    from saliencylab.data import shortcuts

    have = [i for i, ph in enumerate(b.phantoms) if ph is not None]
    if not have:
        return []
    settings = b.phantoms[have[0]]["settings"]
    rows = [b.phantoms[i]["row"] for i in have]
    out = []
    for family, key in SHORTCUT_RATES.items():
        if not any(float(v) > 0 for v in (settings.get(key) or {}).values()):
            continue  # never drawn: nothing to swap
        present, absent = (_positive(class_probabilities(b.model, x)) for x in shortcuts.swapped(
            family, rows, settings, input_size=b.x.shape[-1], channels=b.x.shape[1]))
        out += [ShortcutSwapRow(b.records[i].file, family, float(present[j]), float(absent[j]))
                for j, i in enumerate(have)]
    return out


# ------------------------------------------------------------------------------------------------ running


def audit(run: str | Path | None = None, *, model: str | None = None, weights: str | None = None,
          data: str | Path | None = None, classes: Sequence[str] | None = None, masks: str | Path | None = None,
          methods: str | None = None, n: int | None = 64, compare: str | None = None, sanity_images: int = 8,
          faithfulness_images: int = 16, road: bool = False, data_randomisation: bool = False,
          smprt: bool = False, faithfulness_subsets: int = 50, seed: int = 0,
          batch_size: int = 16, options: dict[str, dict[str, Any]] | None = None, out: str | Path | None = None,
          progress: bool | None = None, log: Callable[[str], None] = print,
          model_kwargs: dict[str, Any] | None = None, device: str = "cpu", precision: str = "fp32",
          shard_size: int = 256, resume: bool = False) -> dict[str, Any]:
    """Audit the saliency maps of a run, an explain folder, or any model on any labelled data; write
    audit.json, audit_images.csv, flagged.csv and figures under `out` (default RUN/audit).

    Images stream through in batches of `batch_size`: only per-image rows and a few thumbnails are kept,
    so memory does not grow with `n` (None: every image). `methods` defaults to an explain folder's own
    methods and options, else the four gradient and CAM methods; `options` holds per-method keyword
    options (e.g. {'smoothgrad': {'n_samples': 8}}). Checks that cannot run are listed with their reasons.
    Every check runs on `device` ('auto', 'cpu', 'cuda': models and images are moved there; random draws
    come from seeded CPU generators) at `precision` ('fp32', 'tf32', 'bf16'; see `saliencylab.precision`).

    The batches are grouped into shards of about `shard_size` images (whole batches), each written to
    OUT/shards when finished (see `audit_store`): running the same audit again, after a kill or with more
    work, recomputes only the shards whose images, model or settings changed (`resume=True` refuses a folder
    with nothing to resume). Under torchrun each rank audits shards r, r + world, ... (`device='cuda'`: the
    GPU of its local rank) and rank 0 writes the summaries, the same files as one process; the other ranks
    return {'out': ..., 'rank': r}.
    """
    from saliencylab.precision import check_precision

    precision = check_precision(precision)
    w = dist.world()
    with dist.process_group(w, torch.device("cpu")):
        return _audit(w, run, model=model, weights=weights, data=data, classes=classes, masks=masks,
                      methods=methods, n=n, compare=compare,
                      cfg=AuditConfig(sanity_images=sanity_images, faithfulness_images=faithfulness_images,
                                      road=road, faithfulness_subsets=faithfulness_subsets, seed=seed),
                      data_randomisation=data_randomisation, smprt=smprt, batch_size=batch_size, options=options,
                      out=out, progress=progress if w.main else False, log=log if w.main else _silent,
                      model_kwargs=model_kwargs, device=dist.local_device(device, w), precision=precision,
                      shard_size=shard_size, resume=resume)


def _silent(line: str) -> None:
    """The log of every rank but 0."""


def _audit(w: dist.World, run: str | Path | None, *, model: str | None, weights: str | None,
           data: str | Path | None, classes: Sequence[str] | None, masks: str | Path | None, methods: str | None,
           n: int | None, compare: str | None, cfg: AuditConfig, data_randomisation: bool, smprt: bool,
           batch_size: int, options: dict[str, dict[str, Any]] | None, out: str | Path | None,
           progress: bool | None, log: Callable[[str], None], model_kwargs: dict[str, Any] | None,
           device: torch.device, precision: str, shard_size: int, resume: bool) -> dict[str, Any]:
    from saliencylab.precision import precision as run_at

    subject = resolve(run, model=model, weights=weights, data=data, classes=classes, masks=masks, n=n, seed=cfg.seed,
                      model_kwargs=model_kwargs, device=device)
    specs, options = _methods(subject, methods, options)
    others: dict[str, nn.Module] = {}
    if compare:
        others["compare"] = _other_model(compare, subject)
    if data_randomisation and subject.kind == "run":
        others["shuffled"] = _shuffled_label_model(subject.base, subject.config, log, subject.clf.device)
    available = _available(subject, specs, others) | ({"smprt"} if smprt else set())
    active = [c for c in CHECKS.values() if all(need in available for need in c.needs)]
    skipped = [{"check": c.name, "reason": "; ".join(NEED_REASONS[need] for need in c.needs
                                                      if need not in available)}
               for c in CHECKS.values() if c not in active]
    out = Path(out) if out else subject.default_out("audit", str(data) if data else None)
    if resume and not store.has_shards(out):
        raise UserError(f"--resume: '{out}' holds no audit shards to resume; drop --resume to start the audit")
    where = subject.origin.get("data") or subject.origin.get("explain")
    log(f"auditing {len(subject.records)} images of {where} with {', '.join(s.name for s in specs)}")
    for s in skipped:
        log(f"skipped {s['check']}: {s['reason']}")

    job = _job_key(subject, specs, options, cfg, active, others, batch_size, precision)
    per = max(1, math.ceil(shard_size / batch_size)) * batch_size  # whole batches: the same batches for any world
    bounds = dist.shard_bounds(len(subject.records), per)
    made = [p for p in (*out.parents[::-1], out, out / store.FOLDER) if not os.path.lexists(p)]  # folders it makes
    with run_at(precision, subject.clf.device):
        done = _run_shards(subject, specs, options, cfg, active, others, batch_size, progress, out, bounds, job, w)
    every = dist.gather_shards(done, w)  # {shard: (readable images, reused)}
    if not sum(v[0] for v in every.values()):  # nothing to summarise: leave no trace of this audit
        if w.main:
            store.remove(out, 0, len(bounds))
            _remove_empty(made)
        n_bad = len(subject.records)
        raise UserError(f"no readable image in '{where}'{f' ({n_bad} unreadable)' if n_bad else ''}; "
                        "check the dataset")
    reused = sum(v[1] for v in every.values())
    if reused:
        log(f"resumed: {reused} of {len(bounds)} shards of {per} images reused from {out / store.FOLDER}")
    if not w.main:
        dist.barrier(w)
        return {"out": str(out), "rank": w.rank}
    got = store.merged([store.read(out, s) for s in range(len(bounds))])
    thumbs = sorted(got.thumbs, key=lambda t: -t.score)[:FLAGGED_SHOWN]  # the shards' best, in order: the run's
    result = aggregate(subject, specs, cfg, active, skipped, got.rows, got.images, got.unreadable, got.timings)
    result |= {"device": str(subject.clf.device), "precision": precision,
               "shards": {"count": len(bounds), "images_per_shard": per, "reused": reused}}
    for line in summary_lines(result):
        log(line)
    write_outputs(out, result, got.rows, thumbs, specs[0].name)
    store.remove(out, len(bounds))
    if subject.kind == "model" and out.parent == subject.base:
        write_json(subject.base / "model.json", subject.origin)
    dist.barrier(w)
    return result | {"out": str(out)}


def _job_key(subject: Subject, specs: list[MethodSpec], options: dict[str, dict[str, Any]], cfg: AuditConfig,
             active: list[Check], others: Mapping[str, nn.Module], batch_size: int, precision: str) -> str:
    """What every shard's rows depend on besides its own images: the model, methods, checks and settings."""
    from saliencylab import __version__
    from saliencylab.studies.streaming import model_hash

    return digest({
        "saliencylab": __version__, "model": model_hash(subject.clf), "classes": list(subject.classes),
        "methods": {s.name: {**s.options(), **options.get(s.name, {})} for s in specs},
        "config": asdict(cfg), "checks": [c.name for c in active], "batch_size": batch_size, "precision": precision,
        "others": {role: state_digest(m) for role, m in others.items()},
        "phantoms": _phantom_settings(subject.root) if subject.meta else {}, "source_size": _source_size(subject)})


def _shard_key(job: str, subject: Subject, records: Sequence[Record]) -> str:
    """The job's key with every image of the shard: its name, label, masks, target and the bytes of each file."""
    from saliencylab.studies.streaming import input_hash

    def mask(p: str | None) -> str:
        return file_digest(subject.root / p) if p else ""

    return digest([job, *[
        [r.file, r.label, r.mask, r.lesions, subject.targets.get(r.file), subject.meta.get(r.file, {}),
         input_hash(str(subject.root / r.file)), mask(r.mask), mask(r.lesions)] for r in records]])


def _run_shards(subject: Subject, specs: list[MethodSpec], options: dict[str, dict[str, Any]], cfg: AuditConfig,
                active: list[Check], others: Mapping[str, nn.Module], batch_size: int, progress: bool | None,
                out: Path, bounds: list[tuple[int, int]], job: str, w: dist.World
                ) -> dict[int, tuple[int, int]]:
    """Audit this rank's shards that are not finished yet; {shard: (readable images, 1 if reused)}."""
    from tqdm import tqdm

    mine = list(dist.my_shards(len(bounds), w))
    # one step per image for each method's maps and each check: the bar moves as each stage finishes a batch
    per_image = len(specs) + len(active)
    done: dict[int, tuple[int, int]] = {}
    with tqdm(total=sum(bounds[s][1] - bounds[s][0] for s in mine) * per_image, unit="step", desc="audit",
              leave=False, disable=None if progress is None else not progress) as bar:
        for s in mine:
            lo, hi = bounds[s]
            key = _shard_key(job, subject, subject.records[lo:hi])
            images = store.finished(out, s, key)
            if images is not None:
                bar.update((hi - lo) * per_image)
                done[s] = (images, 1)
                continue
            res = _stream(subject, subject.records[lo:hi], lo, specs, options, cfg, active, others, batch_size, bar)
            store.write(out, s, key, res)
            done[s] = (res.images, 0)
    return done


def _stream(subject: Subject, records: Sequence[Record], start: int, specs: list[MethodSpec],
            options: dict[str, dict[str, Any]], cfg: AuditConfig, active: list[Check],
            others: Mapping[str, nn.Module], batch_size: int, bar: Any) -> store.ShardResult:
    """Run every active check on every batch of one shard (`start`: its first image's index in the audit);
    keep only rows, timings and a few thumbnails."""
    clf = subject.clf
    model = clf.module.eval()
    fns = {s.name: partial(_call, s, options.get(s.name, {})) for s in specs}
    uses = {s.name: s.uses_model for s in specs}
    rows: dict[str, list[Any]] = {"__images__": []}
    timings: dict[str, float] = {}
    thumbs: list[Thumb] = []
    unreadable: list[tuple[str, str]] = []
    src_size = _source_size(subject)
    phantom = _phantom_settings(subject.root) if subject.meta else {}

    def tick(key: str, t: float) -> None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t

    per_image = len(specs) + len(active)
    offset = start  # the first shard counts readable images from 0: "the first batch" is the audit's first
    for lo in range(0, len(records), batch_size):
        t = time.perf_counter()
        x, recs, bad = load_batch(subject, records[lo:lo + batch_size])
        unreadable += bad
        bar.update(len(bad) * per_image)
        if not recs:
            continue
        if not rows["__images__"]:
            check_input(clf, subject.origin.get("model") or subject.origin.get("run", "?"),
                        str(subject.origin.get("data") or subject.origin.get("explain")), x)
        batch = _context(subject, recs, x, offset, model, fns, uses, others, src_size, phantom)
        tick("load", t)
        batch = _with_maps(batch, timings, bar)
        for check in active:
            bar.set_description(f"audit: {check.name}")
            t = time.perf_counter()
            rows.setdefault(check.name, []).extend(check.run(batch, cfg))
            tick(check.name, t)
            bar.update(len(recs))
        shown = batch.probs[:, 1] if batch.probs.shape[1] == 2 else batch.probs.max(1)  # as PredictionRow
        rows["__images__"] += [PredictionRow(r.file, -1 if batch.labels is None else int(batch.labels[i]),
                                             int(batch.probs[i].argmax()), float(shown[i]))
                               for i, r in enumerate(recs)]
        thumbs = _most_telling(thumbs, batch, rows.get("flags", [])[-len(recs) * len(specs):], subject.classes)
        offset += len(recs)
    return store.ShardResult(rows, timings, thumbs, unreadable, len(rows["__images__"]))


def _methods(subject: Subject, methods: str | None, options: dict[str, dict[str, Any]] | None
             ) -> tuple[list[MethodSpec], dict[str, dict[str, Any]]]:
    """The methods to audit and their options: given, else an explain folder's own, else the defaults."""
    options = dict(options or {})
    if methods is None and subject.kind == "explain":
        import json

        res = json.loads((subject.base / "results.json").read_text())
        specs = [get_method(name) for name in res["methods"]]
        for name, info in res["methods"].items():
            spec = get_method(name)
            kept = {k: v for k, v in info.get("options", {}).items() if k in spec.options()
                    and isinstance(v, (int, float, str, bool)) and not (isinstance(v, str) and v.startswith("<"))}
            options[name] = {**kept, **options.get(name, {})}
        return specs, options
    return parse_methods(methods or DEFAULT_METHODS), options


def _available(subject: Subject, specs: list[MethodSpec], others: Mapping[str, nn.Module]) -> set[str]:
    have = {"labels"} if subject.labelled else set()
    if subject.has_lungs:
        have.add("lungs")
    if subject.has_lesions:
        have.add("lesions")
    if any(subject.meta.get(r.file, {}).get("marker_box") for r in subject.records):
        have.add("markers")
    if subject.meta and all(subject.meta.get(r.file, {}).get("seed") not in (None, "") for r in subject.records):
        have.add("phantoms")
    if subject.binary:
        have.add("binary")
    if len(specs) > 1:
        have.add("two_methods")
    return have | set(others)


def _context(subject: Subject, recs: list[Record], x: torch.Tensor, offset: int, model: nn.Module,
             fns: Mapping[str, MapFn], uses: Mapping[str, bool], others: Mapping[str, nn.Module], src_size: int,
             phantom: dict[str, Any]) -> Batch:
    """The frozen per-batch context (maps are added by `_with_maps`)."""
    size = x.shape[-1]
    probs = class_probabilities(model, x)
    if subject.targets:
        targets = torch.tensor([subject.targets[r.file] for r in recs])
    else:  # explain what the model predicted
        targets = torch.from_numpy(probs.argmax(1).astype(np.int64))
    labels = np.array([r.label for r in recs]) if subject.labelled else None
    lungs = tuple(load_mask(subject.root, r.mask, size) for r in recs)
    lesions = tuple(load_mask(subject.root, r.lesions, size) for r in recs)
    markers = tuple(_marker(subject.meta.get(r.file, {}), size, src_size) for r in recs)
    phantoms = tuple(_phantom(subject.meta.get(r.file, {}), phantom, src_size) for r in recs)
    return Batch(offset, tuple(recs), x, targets, labels, probs, lungs, lesions, markers, {}, fns, uses, model,
                 others, phantoms)


def _with_maps(b: Batch, timings: dict[str, float], bar: Any = None) -> Batch:
    from dataclasses import replace

    maps = {}
    for name, fn in b.fns.items():
        if bar is not None:
            bar.set_description(f"audit: {name} maps")
        t = time.perf_counter()
        maps[name] = fn(b.model, b.x, b.targets).detach().float().cpu()
        timings[f"maps: {name}"] = timings.get(f"maps: {name}", 0.0) + time.perf_counter() - t
        if bar is not None:
            bar.update(len(b.x))
    return replace(b, maps=maps)


@dataclass(frozen=True)
class Thumb:
    """One flagged image for flagged.png: image (H, W[, 3]) in [0, 1], the map that flags it, its masks."""

    score: float
    image: np.ndarray
    saliency: np.ndarray
    lungs: np.ndarray | None
    marker: np.ndarray | None
    file: str
    method: str
    reasons: str
    caption: str


FLAGGED_SHOWN = 6  # flagged.png's images


def _most_telling(kept: list[Thumb], b: Batch, flag_rows: list[Any], classes: Sequence[str],
                  k: int = FLAGGED_SHOWN) -> list[Thumb]:
    """The `k` flagged images with the largest excess over chance so far, one per image (its most telling
    method)."""
    best: dict[str, Any] = {}
    for r in flag_rows:
        if r.reasons and (r.file not in best or r.score > best[r.file].score):
            best[r.file] = r
    seen = {t.file for t in kept}
    for f, r in best.items():
        if f in seen:
            continue
        i = b.files.index(f)
        label = "" if b.labels is None else f"label {classes[int(b.labels[i])]}, "
        if b.probs.shape[1] == 2:  # the positive class's probability, as Figure 3
            pred = f"predicted {float(b.probs[i, 1]):.2f}"
        else:
            top = int(b.probs[i].argmax())
            pred = f"predicted {classes[top] if top < len(classes) else top} {float(b.probs[i, top]):.2f}"
        if "marker" in r.reasons:
            share = float(b.markers[i].mean())
            what = f"{100 * (r.marker_excess + share):.0f}% on marker (area {100 * share:.0f}%)"
        else:
            share = float(b.lungs[i].mean())
            what = f"{100 * (share - r.lung_deficit):.0f}% in lungs (area {100 * share:.0f}%)"
        kept.append(Thumb(r.score, _display(b.x[i]), b.maps[r.method][i].numpy(), b.lungs[i], b.markers[i], f,
                          r.method, r.reasons, f"{label}{pred}\n{r.method}: {what}"))
    return sorted(kept, key=lambda t: -t.score)[:k]


def _call(spec: MethodSpec, opts: dict[str, Any], model: nn.Module, x: torch.Tensor,
          target: torch.Tensor) -> torch.Tensor:
    return spec.fn(model, x, target, **opts)


def _display(x: torch.Tensor) -> np.ndarray:
    """x[C, H, W] -> (H, W) or (H, W, 3) float in [0, 1] for thumbnails."""
    x = x.detach().float().cpu()
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def _source_size(subject: Subject) -> int:
    from PIL import Image

    for r in subject.records[:1]:
        try:
            return Image.open(subject.root / r.file).size[0]
        except (OSError, ValueError):
            pass
    return subject.clf.input_size[0]


def _marker(row: dict[str, str], size: int, src_size: int) -> np.ndarray | None:
    box = row.get("marker_box", "")
    if not box:
        return None
    return box_mask((size, size), tuple(round(int(v) * size / src_size) for v in box.split()), pad=1)


def _phantom(row: dict[str, str], settings: dict[str, Any], src_size: int) -> dict[str, Any] | None:
    if row.get("seed") in (None, ""):
        return None
    # what `data.shortcuts.redraw` needs to draw the image again: its metadata row and the dataset's settings
    return {"row": row, "settings": {"size": src_size, **settings}}


def _phantom_settings(root: Path) -> dict[str, Any]:
    import json

    path = root / "phantoms.json"
    return json.loads(json.loads(path.read_text())["settings"]) if path.is_file() else {}


def _other_model(other: str, subject: Subject) -> nn.Module:
    """A second model for --compare: a run folder or anything `load_model` takes."""
    from saliencylab.models.registry import load_model

    clf = subject.clf
    clf2 = load_run(other)[1] if (Path(other) / "best.pt").is_file() else load_model(other, device=clf.device)
    if clf2.input_size != clf.input_size or clf2.channels != clf.channels:
        raise UserError(f"--compare {other}: that model takes {clf2.channels}x{clf2.input_size}, this one "
                        f"{clf.channels}x{clf.input_size}; compare models with the same input")
    return clf2.to(clf.device).module.eval()


def _shuffled_label_model(run_dir: Path, cfg: dict[str, Any], log: Callable[[str], None],
                          device: torch.device) -> nn.Module:
    """Adebayo et al.'s data randomisation: the same training on shuffled labels (kept in RUN/shuffled)."""
    from saliencylab.train import TrainConfig, train

    fields_ = {k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__}
    fields_["classes"] = tuple(fields_.get("classes", ("Normal", "COVID")))
    fields_["extra"] = {**fields_.get("extra", {}), "shuffle_labels": True}
    out = run_dir / "shuffled"
    w = dist.world()
    # every rank takes rank 0's answer: under torchrun all of them train (each its slice) or none does
    if dist.broadcast_flag(not (out / "best.pt").is_file(), w, torch.device("cpu")):
        log(f"data randomisation: training on shuffled labels into {out}")
        train(TrainConfig(**fields_), out, progress=False, log=log, device=str(device))
    dist.barrier(w)  # rank 0 has written best.pt
    return load_run(out)[1].to(device).module.eval()


# ---------------------------------------------------------------------------------------------- aggregate


def aggregate(subject: Subject, specs: list[MethodSpec], cfg: AuditConfig, active: list[Check],
              skipped: list[dict[str, str]], rows: Mapping[str, list[Any]], images: int,
              unreadable: list[tuple[str, str]], timings: Mapping[str, float]) -> dict[str, Any]:
    """Every check's summary in one result (the content of audit.json). Skipped checks give their keys with
    None / NaN values, so the file always has the same shape."""
    methods: dict[str, dict[str, Any]] = {s.name: {} for s in specs}
    top: dict[str, Any] = {"probes": {}}
    for check in CHECKS.values():
        got = rows.get(check.name, []) if check in active else []
        if check.per_method:
            for s in specs:
                methods[s.name].update(check.summarise([r for r in got if r.method == s.name], cfg))
        elif check.section:
            top[check.section].update(check.summarise(got, cfg))
        else:
            top.update(check.summarise(got, cfg))
    for m in methods.values():  # each check's verdict under one key: faithfulness, lungs, marker, stability, ...
        m["verdicts"] = {k.removesuffix("_verdict"): m.pop(k) for k in list(m) if k.endswith("_verdict")}
    top["flags"] = {"images": len({f for m in methods.values() for f in m.get("flagged") or []}),
                    "by_method": {name: len(m.get("flagged") or []) for name, m in methods.items()}}
    return {"kind": subject.kind, **{k: subject.origin.get(k) for k in ("run", "explain", "model", "weights")},
            "data": subject.origin.get("data"), "masks": subject.origin.get("masks"), "classes": list(subject.classes),
            "scope": subject.scope, "images": images, "unreadable": len(unreadable),
            "unreadable_files": [{"file": f, "reason": r} for f, r in unreadable],
            "checks": [c.name for c in active], "skipped": skipped, "methods": methods, **top,
            "seconds": {k: round(v, 3) for k, v in timings.items()}, "seed": cfg.seed}


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    lines = []
    for name, s in result["methods"].items():
        parts = []
        if "lungs" in result["checks"]:
            parts.append(f"{100 * s['lung_mass']:.0f}% of the saliency inside the lungs (they cover "
                         f"{100 * s['lung_share']:.0f}%)")
        if "marker" in result["checks"]:
            parts.append(f"marker {100 * s['marker_mass']:.1f}% (its share {100 * s['marker_share']:.1f}%)")
        f = s["faithfulness"]["blur"]
        v = s["verdicts"]
        parts.append(f"deletion {f['deletion']['map']:.3f} (lower is better; random {f['deletion']['random']:.3f}), "
                     f"insertion {f['insertion']['map']:.3f} (higher is better; random {f['insertion']['random']:.3f})"
                     f": {v['faithfulness']['verdict']}")
        if "stability" in result["checks"]:
            parts.append(f"stability: {v['stability']['verdict']}")
        sanity_ = s["sanity"]
        parts.append("sanity " + ("n/a" if not sanity_ or sanity_["passed"] is None else
                                  "passed" if sanity_["passed"] else "failed"))
        if "flags" in result["checks"]:
            parts.append(f"{len(s['flagged'])} images flagged")
        lines.append(f"{name}: " + ", ".join(parts))
    lines += [f"warning: {w}" for w in verdicts.failing(result["methods"])]
    p = result["probes"]
    if p.get("lungs_blacked_out"):
        b = p["lungs_blacked_out"]
        lines.append(f"lungs blacked out: accuracy {b['accuracy']:.3f} (majority baseline "
                     f"{b['majority_baseline_accuracy']:.3f}), AUROC {b['auroc']:.3f} (0.5: nothing left to read)")
    if p.get("marker_swap"):
        lines.append(f"marker added vs removed: {p['marker_swap']['flips']} of {p['marker_swap']['images']} "
                     "predictions flip")
    for family in SHORTCUT_RATES:
        if p.get(f"{family}_swap"):
            sw = p[f"{family}_swap"]
            lines.append(f"{family} present vs absent: {sw['flips']} of {sw['images']} predictions flip")
    if result["unreadable"]:
        lines.append(f"{result['unreadable']} unreadable images skipped: "
                     + ", ".join(u["file"] for u in result["unreadable_files"][:5])
                     + (" ..." if result["unreadable"] > 5 else ""))
    return lines


# ------------------------------------------------------------------------------------------------ writers


def image_rows(rows: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """One row per (image, method) with every per-image number of the per-method checks (audit_images.csv)."""
    preds = {r.file: r for r in rows.get("__images__", [])}
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for name, got in rows.items():
        check = CHECKS.get(name)
        if check is None or not check.per_method or not got or not hasattr(got[0], "file"):
            continue
        if name not in ("lungs", "lesions", "border", "marker", "stability", "complexity", "flags"):
            continue  # not every image / kept in the summary
        for r in got:
            p = preds[r.file]
            row = merged.setdefault((r.file, r.method), {"file": r.file, "label": p.label,
                                                          "probability": round(p.probability, 6), "method": r.method})
            prefix = {"lungs": "lung_", "lesions": "lesion_", "flags": "flag_"}.get(name, "")
            row.update({prefix + f.name: getattr(r, f.name) for f in fields(r)
                        if f.name not in ("file", "method", "region")})
    return list(merged.values())


def write_outputs(out: Path, result: Mapping[str, Any], rows: Mapping[str, list[Any]], thumbs: list[Thumb],
                  first: str) -> None:
    """audit.json, audit_images.csv, flagged.csv, unreadable.json and the figures."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "audit.json", result)
    write_json(out / "unreadable.json", result["unreadable_files"])
    table = image_rows(rows)
    if table:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in table for k in r)), lineterminator="\n")
        w.writeheader()
        w.writerows(table)
        write_text(out / "audit_images.csv", buf.getvalue())
    s = result["methods"]
    flagged = sorted({f for m in s.values() for f in (m.get("flagged") or [])})
    write_text(out / "flagged.csv", "file,methods,reasons\n" + "".join(
        f"{f},{' '.join(n for n, m in s.items() if f in (m.get('flagged') or []))},"
        f"{' / '.join(sorted({m['flag_reasons'][f] for m in s.values() if f in (m.get('flag_reasons') or {})}))}\n"
        for f in flagged))
    _figures(out, result, thumbs, first)


# figures are drawn at 100 dpi no wider than 8.6 in, so a 900 px window shows them unscaled with text of >= 9 pt
FIGURE_FONT = {"font.size": 10, "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9,
               "axes.titlesize": 11, "axes.labelsize": 10}
MAX_FIGURE_INCHES = 8.6


def _figures(out: Path, result: Mapping[str, Any], thumbs: list[Thumb], first: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["methods"]
    names = list(s)
    with plt.rc_context(FIGURE_FONT):
        if "lungs" in result["checks"]:
            fig, ax = plt.subplots(figsize=(min(MAX_FIGURE_INCHES, 1.4 * len(names) + 2.6), 3.6))
            pos = np.arange(len(names))
            ax.bar(pos - 0.2, [s[n]["lung_mass"] for n in names], 0.4, label="saliency inside the lungs")
            ax.bar(pos + 0.2, [s[n]["lung_share"] for n in names], 0.4, label="lungs' share of the image (chance)")
            ax.set_xticks(pos, [n.replace("_", "\n") for n in names])
            ax.set_ylim(0, 1.25)
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
            ax.legend(loc="upper center", ncols=2, frameon=False)
            ax.set_title("localisation against anatomy")
            save_figure(fig, out / "localisation.png")

        if any(s[n]["sanity"] for n in names):
            fig, ax = plt.subplots(figsize=(6.4, 3.8))
            for n in names:
                steps = s[n]["sanity"]["steps"] if s[n]["sanity"] else []
                ax.plot(range(1, len(steps) + 1), [st["ssim"] for st in steps], "o-", label=n)
            base = [s[n]["sanity"]["baseline"]["ssim"] for n in names if s[n]["sanity"]]
            if base and np.isfinite(base).any():
                ax.axhline(float(np.nanmean(base)), color="gray", ls="--", label="unrelated images")
            ax.set(xlabel="layers randomised (from the output down)", ylabel="SSIM to the original map",
                   title="cascading randomisation")
            ax.legend()
            save_figure(fig, out / "sanity.png")

        (out / "flagged.png").unlink(missing_ok=True)  # a previous audit's figure must not outlive its flags
        if thumbs:
            flagged_figure(thumbs, out / "flagged.png")


def flagged_figure(thumbs: Sequence[Thumb], path: Path, *, columns: int = 3) -> None:
    """The most telling flagged images (at most 2 rows of `columns`), lungs outlined in green and the marker's
    box in red; each title says the label, the prediction and what flags the image."""
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from saliencylab.render import normalise, overlay

    cols = min(columns, len(thumbs))
    rows = math.ceil(len(thumbs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(2.8 * cols, 5.6), 3.2 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, t in zip(axes.flat, thumbs, strict=False):
        rgb = overlay(t.image.astype(np.float32), normalise(np.abs(t.saliency), "percentile"))
        if t.lungs is not None:
            rgb[find_boundaries(t.lungs)] = (0, 255, 0)
        if t.marker is not None and "marker" in t.reasons:
            rgb[find_boundaries(t.marker)] = (255, 40, 40)
        ax.imshow(rgb)
        ax.set_title(f"{Path(t.file).name}\n{t.caption}", fontsize=9)
    fig.suptitle("Flagged: saliency on the marker (red box) or outside\nthe lungs (green outline) beyond chance",
                 fontsize=10)
    save_figure(fig, path, tight=False)


def as_rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """Dataclass rows as dicts (for tests and notebooks)."""
    return [asdict(r) for r in rows]
