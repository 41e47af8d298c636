"""Trust: `saliencylab audit` turns the article's limits of saliency maps into numbers, per method.

Localisation against anatomy (lungs, border) and findings (lesions, marker), randomisation sanity checks,
deletion/insertion faithfulness against a random map, stability under noise and shifts, agreement between
methods (and models), and shortcut probes (lungs blacked out; the marker added or removed).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from saliencylab.data.datasets import Record, load_dataset, load_mask, read_metadata, read_split
from saliencylab.errors import UserError
from saliencylab.fsutil import write_json, write_text
from saliencylab.methods import MethodSpec, parse_methods
from saliencylab.metrics.faithfulness import area, removal_curve
from saliencylab.metrics.localisation import border_mask, box_mask, corner_mask, mass_inside, otsu_iou, pointing_game
from saliencylab.metrics.sanity import randomisation_check
from saliencylab.metrics.similarity import spearman
from saliencylab.metrics.stability import max_sensitivity, stability
from saliencylab.render.figures import save_figure
from saliencylab.studies.cxr import load_run
from saliencylab.train import decode_cache, evaluate_logits, to_batch


def _nanmean(values: list[float]) -> float:
    arr = np.array([v for v in values if v is not None], dtype=np.float64)
    return float(np.nanmean(arr)) if arr.size and np.isfinite(arr).any() else math.nan


def _quiet(fn: Callable[..., float], *args: Any, **kw: Any) -> float:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def audit(run: str | Path, *, methods: str = "vanilla,smoothgrad,integrated_gradients,gradcam", n: int = 64,
          data: str | None = None, compare: str | None = None, sanity_images: int = 8, faithfulness_images: int = 16,
          road: bool = False, data_randomisation: bool = False, seed: int = 0, batch_size: int = 16,
          options: dict[str, dict[str, Any]] | None = None, out: str | Path | None = None,
          progress: bool | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Audit a trained run's saliency maps on `n` seeded test images; write audit.json, audit_images.csv,
    flagged.csv and figures under `out` (default RUN/audit).

    Images stream through in batches of `batch_size`: only per-image numbers and a few thumbnails are kept,
    so memory does not grow with `n`. The sanity check and max-sensitivity use the first batch's images;
    faithfulness curves the first `faithfulness_images`. `options` holds per-method keyword options
    (e.g. {'smoothgrad': {'n_samples': 8}}).
    """
    run_dir, clf, cfg = load_run(run)
    specs = parse_methods(methods)
    out = Path(out) if out else run_dir / ("audit" if data is None else f"audit-{Path(data).name}")
    root = Path(data or cfg.get("data", ""))
    ds = load_dataset(root, classes=tuple(cfg.get("classes", clf.class_names)))
    split = read_split(run_dir / "split.csv") if (run_dir / "split.csv").is_file() else {}
    pool = [r for r in ds.records if split.get(r.file) == "test"] or list(ds.records)
    rng = np.random.default_rng(seed)
    chosen: list[Record] = [pool[i] for i in sorted(rng.permutation(len(pool))[:n])]
    size = clf.input_size[0]
    clf.to("cpu")
    model = clf.module.eval()
    other = _other_model(compare, clf) if compare else None
    shuffled = _shuffled_label_model(run_dir, cfg, log) if data_randomisation else None
    meta = read_metadata(root)
    src_size = Image.open(root / chosen[0].file).size[0] if chosen else size
    border, corners = border_mask((size, size), 0.1), corner_mask((size, size), 0.2)
    timings: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    per_method: dict[str, dict[str, Any]] = {s.name: {"faith": [], "faith_n": 0, "sens": [], "sanity": None,
                                                      "shuffled": []} for s in specs}
    agreement: dict[str, list[float]] = {}
    between_models: dict[str, list[float]] = {s.name: [] for s in specs}
    probe_acc: dict[str, list] = {"labels": [], "base": [], "blacked": [], "blacked_labels": [], "with": [],
                                  "without": []}
    thumbs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, str, float]] = []
    unreadable = 0
    log(f"auditing {len(chosen)} test images of {root} with {', '.join(s.name for s in specs)}")

    def tick(key: str, t: float) -> None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t

    from tqdm import tqdm

    bar = tqdm(total=len(chosen), unit="img", desc="audit", leave=False,
               disable=None if progress is None else not progress)
    for lo in range(0, len(chosen), batch_size):
        bar.update(len(chosen[lo:lo + batch_size]))
        t = time.perf_counter()
        recs = chosen[lo:lo + batch_size]
        cache, bad = decode_cache(ds, recs, size, workers=1, progress=False)
        ok = [i for i, r in enumerate(recs) if r.file not in {f for f, _ in bad}]
        unreadable += len(recs) - len(ok)
        recs, cache = [recs[i] for i in ok], cache[ok]
        if not recs:
            continue
        x = to_batch(cache, np.arange(len(recs)), clf.channels).contiguous()
        lungs = [load_mask(root, r.mask, size) for r in recs]
        lesions = [load_mask(root, r.lesions, size) for r in recs]
        markers = [_marker(meta.get(r.file, {}), size, src_size) for r in recs]
        labels = np.array([r.label for r in recs])
        probs = 1 / (1 + np.exp(-evaluate_logits(clf, cache, np.arange(len(recs))).astype(np.float64)))
        target = torch.from_numpy((probs >= 0.5).astype(np.int64))  # explain what the model predicted
        tick("load", t)
        maps_now: dict[str, np.ndarray] = {}
        for spec in specs:
            fn = partial(_call, spec, (options or {}).get(spec.name, {}))
            acc = per_method[spec.name]
            t = time.perf_counter()
            maps = fn(model, x, target).detach().float()
            maps_np = maps.numpy()
            maps_now[spec.name] = maps_np
            tick(f"{spec.name}: maps", t)
            t = time.perf_counter()
            batch_rows = [_localisation_row(r, float(p), spec.name, maps_np[i], lungs[i], lesions[i], markers[i],
                                            border, corners) for i, (r, p) in enumerate(zip(recs, probs, strict=True))]
            tick(f"{spec.name}: localisation", t)
            t = time.perf_counter()
            for row, st in zip(batch_rows, stability(model, x, target, fn, maps=maps, seed=seed), strict=True):
                row.update(st)
            if lo == 0:
                acc["sens"] = max_sensitivity(model, x, target, fn, n_samples=4, seed=seed, maps=maps).tolist()
            tick(f"{spec.name}: stability", t)
            t = time.perf_counter()
            room = faithfulness_images - acc["faith_n"]
            if room > 0:
                acc["faith"].append(_faithfulness(model, x, target, maps, room, road, seed + lo))
                acc["faith_n"] += min(room, len(recs))
            tick(f"{spec.name}: faithfulness", t)
            t = time.perf_counter()
            if lo == 0:
                k = min(sanity_images, len(recs))
                acc["sanity"] = randomisation_check(model, x[:k], target[:k], fn, seed=seed)
                acc["sanity_independent"] = randomisation_check(model, x[:k], target[:k], fn, seed=seed,
                                                                mode="independent")
            if shuffled is not None:
                other_maps = fn(shuffled, x, target).detach().float().numpy()
                acc["shuffled"] += [spearman(maps_np[i], other_maps[i]) for i in range(len(recs))]
            tick(f"{spec.name}: sanity", t)
            if other is not None:
                t = time.perf_counter()
                other_maps = fn(other, x, target).detach().float().numpy()
                between_models[spec.name] += [spearman(maps_np[i], other_maps[i]) for i in range(len(recs))]
                tick("agreement", t)
            rows += batch_rows
            for i, row in enumerate(batch_rows):
                if spec is specs[0] and row["lung_mass"] < 0.5 and len(thumbs) < 8:
                    thumbs.append((cache[i], maps_np[i], lungs[i], recs[i].file, float(probs[i])))
        t = time.perf_counter()
        names = list(maps_now)
        for ai, a in enumerate(names):
            for b in names[ai + 1:]:
                agreement.setdefault(f"{a} vs {b}", []).extend(
                    spearman(maps_now[a][i], maps_now[b][i]) for i in range(len(recs)))
        tick("agreement", t)
        t = time.perf_counter()
        _probe_batch(model, x, labels, lungs, recs, meta, root, size, probe_acc)
        tick("probes", t)

    bar.close()
    if not rows:
        raise UserError(f"no readable test image in '{root}'; check the dataset")
    summary = {spec.name: _summarise([r for r in rows if r["method"] == spec.name], per_method[spec.name])
               for spec in specs}
    for name, s in summary.items():
        log(f"{name}: {100 * s['lung_mass']:.0f}% of the saliency inside the lungs (they cover "
            f"{100 * s['lung_share']:.0f}%), marker {100 * s['marker_mass']:.1f}%, deletion AUC "
            f"{s['faithfulness']['deletion_blur']:.3f} vs random {s['faithfulness']['deletion_blur_random']:.3f}, "
            f"sanity {'passed' if s['sanity']['passed'] else 'failed' if s['sanity']['passed'] is False else 'n/a'}")
    result = {"run": str(run_dir), "data": str(root), "images": len(rows) // len(specs), "unreadable": unreadable,
              "methods": summary, "agreement_between_methods": {k: _nanmean(v) for k, v in agreement.items()},
              "agreement_between_models": {k: _nanmean(v) for k, v in between_models.items()} if other else {},
              "probes": _probe_summary(probe_acc), "seconds": {k: round(v, 3) for k, v in timings.items()},
              "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(out, result, rows, thumbs, specs[0].name)
    return result | {"out": str(out)}


def _marker(row: dict[str, str], size: int, src_size: int) -> np.ndarray | None:
    box = row.get("marker_box", "")
    if not box:
        return None
    return box_mask((size, size), tuple(round(int(v) * size / src_size) for v in box.split()), pad=1)


def _localisation_row(r: Record, prob: float, method: str, m: np.ndarray, lung: np.ndarray | None,
                      lesion: np.ndarray | None, marker: np.ndarray | None, border: np.ndarray,
                      corners: np.ndarray) -> dict[str, Any]:
    def score(fn: Callable[..., float], mask: np.ndarray | None) -> float:
        return _quiet(fn, m, mask) if mask is not None else math.nan

    return {"file": r.file, "label": int(r.label), "probability": round(prob, 6), "method": method,
            "lung_mass": score(mass_inside, lung), "lung_share": float(lung.mean()) if lung is not None else math.nan,
            "lung_pointing": score(pointing_game, lung), "border_mass": score(mass_inside, border),
            "corner_mass": score(mass_inside, corners), "lesion_mass": score(mass_inside, lesion),
            "lesion_pointing": score(pointing_game, lesion), "lesion_iou": score(otsu_iou, lesion),
            "marker_mass": score(mass_inside, marker),
            "marker_share": float(marker.mean()) if marker is not None else math.nan}


def _summarise(per: list[dict[str, Any]], acc: dict[str, Any]) -> dict[str, Any]:
    lung_mass, lung_share = _nanmean([r["lung_mass"] for r in per]), _nanmean([r["lung_share"] for r in per])
    faith: dict[str, list[float]] = {}
    for part in acc["faith"]:
        for k, v in part.items():
            faith.setdefault(k, []).extend(v)
    out = {
        "lung_mass": lung_mass, "lung_share": lung_share,
        "lung_ratio": lung_mass / lung_share if lung_share and math.isfinite(lung_share) else math.nan,
        **{key: _nanmean([r[key] for r in per]) for key in (
            "lung_pointing", "border_mass", "corner_mass", "lesion_mass", "lesion_pointing", "lesion_iou",
            "marker_mass", "marker_share", "noise_spearman", "noise_ssim", "shift_spearman", "shift_ssim")},
        "max_sensitivity": _nanmean(acc["sens"]),
        "faithfulness": {k: float(np.mean(v)) for k, v in faith.items()},
        "faithfulness_images": len(next(iter(faith.values()), [])),
        "sanity": acc["sanity"], "sanity_independent": acc.get("sanity_independent"),
        "flagged": [r["file"] for r in per if r["lung_mass"] < 0.5],
    }
    if acc["shuffled"]:
        out["data_randomisation_spearman"] = _nanmean(acc["shuffled"])
    return out


def _call(spec: MethodSpec, opts: dict[str, Any], model: torch.nn.Module, x: torch.Tensor,
          target: torch.Tensor) -> torch.Tensor:
    return spec.fn(model, x, target, **opts)


def _faithfulness(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor, k: int,
                  road: bool, seed: int) -> dict[str, list[float]]:
    """Per-image deletion / insertion areas, most and least relevant first, for the maps and random maps."""
    gen = torch.Generator().manual_seed(seed)
    fills = ["blur", "noisy_linear"] if road else ["blur"]
    out: dict[str, list[float]] = {}
    for i in range(min(k, len(x))):
        rand = torch.rand(maps[i].shape, generator=gen)
        for fill in fills:
            for mode in ("deletion", "insertion"):
                for name, m, order in (("", maps[i], "morf"), ("_random", rand, "morf"), ("_lerf", maps[i], "lerf")):
                    curve = removal_curve(model, x[i], target[i], m, mode=mode, fill=fill, order=order, steps=10,
                                          seed=seed)
                    out.setdefault(f"{mode}_{fill}{name}", []).append(area(curve))
    return out


def _other_model(other: str, clf: Any) -> torch.nn.Module:
    _, clf2, _ = load_run(other)
    if clf2.input_size != clf.input_size or clf2.channels != clf.channels:
        raise UserError(f"--compare {other}: that model takes {clf2.channels}x{clf2.input_size}, this one "
                        f"{clf.channels}x{clf.input_size}; compare models with the same input")
    return clf2.to("cpu").module.eval()


def _shuffled_label_model(run_dir: Path, cfg: dict[str, Any], log: Callable[[str], None]) -> torch.nn.Module:
    """Adebayo et al.'s data randomisation: the same training on shuffled labels (kept in RUN/shuffled)."""
    from saliencylab.train import TrainConfig, train

    fields = {k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__}
    fields["classes"] = tuple(fields.get("classes", ("Normal", "COVID")))
    fields["extra"] = {**fields.get("extra", {}), "shuffle_labels": True}
    out = run_dir / "shuffled"
    if not (out / "best.pt").is_file():
        log(f"data randomisation: training on shuffled labels into {out}")
        train(TrainConfig(**fields), out, progress=False, log=log)
    return load_run(out)[1].to("cpu").module.eval()


def _probe_batch(model: torch.nn.Module, x: torch.Tensor, labels: np.ndarray, lungs: list, recs: list[Record],
                 meta: dict[str, dict[str, str]], root: Path, size: int, acc: dict[str, list]) -> None:
    """Shortcut probes for one batch: predictions with the lungs blacked out (Maguolo & Nanni 2021,
    https://doi.org/10.1016/j.inffus.2021.04.008) and, on phantoms, with the marker added and removed."""
    from saliencylab.metrics.probes import blacked_out, positive_probability

    acc["labels"] += labels.tolist()
    acc["base"] += (positive_probability(model, x) >= 0.5).astype(int).tolist()
    have = [i for i, m in enumerate(lungs) if m is not None]
    if have:
        acc["blacked"] += positive_probability(model, blacked_out(x[have], [lungs[i] for i in have])).tolist()
        acc["blacked_labels"] += labels[have].tolist()
    seeds = [meta.get(r.file, {}).get("seed") for r in recs]
    if not meta or any(sd in (None, "") for sd in seeds):
        return
    from saliencylab.data.phantoms import draw

    settings = _phantom_settings(root)
    src = int(settings.get("size", Image.open(root / recs[0].file).size[0]))
    for flag, key in ((True, "with"), (False, "without")):
        arrs = []
        for r, sd in zip(recs, seeds, strict=True):
            ph = draw(int(sd), r.cls == "COVID", size=src, marker=flag,
                      exposure_shift=float(settings.get("exposure_shift", {}).get(r.cls, 0.0)),
                      lesion_scale=float(settings.get("lesion_scale", 1.0)))
            img = Image.fromarray((ph.image * 255 + 0.5).astype(np.uint8)).resize((size, size), Image.BILINEAR)
            arrs.append(np.asarray(img))
        batch = to_batch(np.stack(arrs), np.arange(len(arrs)), x.shape[1]).contiguous()
        acc[key] += positive_probability(model, batch).tolist()


def _phantom_settings(root: Path) -> dict[str, Any]:
    import json

    path = root / "phantoms.json"
    return json.loads(json.loads(path.read_text())["settings"]) if path.is_file() else {}


def _probe_summary(acc: dict[str, list]) -> dict[str, Any]:
    from saliencylab.metrics.classification import binary_metrics

    labels, base = np.array(acc["labels"]), np.array(acc["base"])
    out: dict[str, Any] = {"accuracy": float((labels == base).mean()) if len(labels) else math.nan}
    if acc["blacked"]:
        bl = np.array(acc["blacked_labels"])
        m = binary_metrics(bl, np.array(acc["blacked"], dtype=float), n_boot=200)
        # blacking out moves every probability, so besides accuracy at 0.5 the AUROC tells whether the rest of
        # the image still separates the classes (0.5: it does not)
        out["lungs_blacked_out"] = {"images": len(bl), "accuracy": m["accuracy"]["value"],
                                    "balanced_accuracy": m["balanced_accuracy"]["value"], "auroc": m["auroc"]["value"],
                                    "auroc_ci": [m["auroc"]["ci_low"], m["auroc"]["ci_high"]],
                                    "majority_baseline_accuracy": m["majority_baseline"]["accuracy"]}
    if acc["with"]:
        from saliencylab.metrics.probes import flips

        w, wo = np.array(acc["with"]), np.array(acc["without"])
        f = flips(w, wo)
        out["marker_swap"] = {
            "images": f["images"], "flips": f["flips"], "flip_rate": f["flip_rate"],
            "positive_rate_with_marker": f["positive_rate_a"], "positive_rate_without_marker": f["positive_rate_b"],
            "accuracy_with_marker": float(((w >= 0.5) == labels).mean()),
            "accuracy_without_marker": float(((wo >= 0.5) == labels).mean()),
        }
    return out


def _write_outputs(out: Path, result: dict[str, Any], rows: list[dict[str, Any]], thumbs: list, first: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from saliencylab.render import normalise, overlay

    write_json(out / "audit.json", result)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(out / "audit_images.csv", buf.getvalue())
    flagged = sorted({f for s in result["methods"].values() for f in s["flagged"]})
    write_text(out / "flagged.csv", "file,methods\n" + "".join(
        f"{f},{' '.join(m for m, s in result['methods'].items() if f in s['flagged'])}\n" for f in flagged))

    names = list(result["methods"])
    s = result["methods"]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.4))
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, [s[n]["lung_mass"] for n in names], 0.4, label="saliency inside the lungs")
    ax.bar(pos + 0.2, [s[n]["lung_share"] for n in names], 0.4, label="lungs' share of the image (chance)")
    ax.set_xticks(pos, names)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("localisation against anatomy")
    save_figure(fig, out / "localisation.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for n in names:
        steps = s[n]["sanity"]["steps"] if s[n]["sanity"] else []
        ax.plot(range(1, len(steps) + 1), [st["ssim"] for st in steps], "o-", label=n)
    base = [s[n]["sanity"]["baseline"]["ssim"] for n in names if s[n]["sanity"]]
    if base and np.isfinite(base).any():
        ax.axhline(float(np.nanmean(base)), color="gray", ls="--", label="unrelated images")
    ax.set(xlabel="layers randomised (from the output down)", ylabel="SSIM to the original map",
           title="cascading randomisation")
    ax.legend(fontsize=8)
    save_figure(fig, out / "sanity.png")

    if thumbs:
        fig, axes = plt.subplots(1, len(thumbs), figsize=(2.2 * len(thumbs), 2.6), squeeze=False)
        for ax, (img, m, lung, file, p) in zip(axes[0], thumbs, strict=True):
            rgb = overlay(img.astype(np.float32) / 255, normalise(np.abs(m), "percentile"))
            if lung is not None:
                rgb[find_boundaries(lung)] = (0, 255, 0)
            ax.imshow(rgb)
            ax.set_title(f"{Path(file).name}\np={p:.2f}", fontsize=7)
            ax.axis("off")
        fig.suptitle(f"flagged: most {first} saliency outside the lungs", fontsize=9)
        save_figure(fig, out / "flagged.png")


def audit_explain(folder: str | Path, *, n: int = 64, sanity_images: int = 8, faithfulness_images: int = 16,
                  seed: int = 0, out: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The checks that need no masks (sanity, faithfulness, stability, agreement) on an `explain` output
    folder: its model, images, targets, methods and method options, from its results.json."""
    import json

    from saliencylab.data.images import load_image
    from saliencylab.methods import get_method
    from saliencylab.models.registry import load_model

    folder = Path(folder)
    res = json.loads((folder / "results.json").read_text())
    args = res.get("model_args") or {"model": res["model"]["name"], "weights": None}
    clf = load_model(args["model"], weights=args.get("weights"), device="cpu")
    images = res["images"][:n]
    if not images:
        raise UserError(f"'{folder}/results.json' lists no images; run `saliencylab explain` again")
    try:
        x = torch.stack([clf.preprocess(load_image(im["source"]).pixels) for im in images])
    except UserError as err:
        raise UserError(f"cannot reload the images of '{folder}': {err}") from None
    target = torch.tensor([im["target"]["index"] for im in images])
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {}
    maps_by: dict[str, np.ndarray] = {}
    for name, info in res["methods"].items():
        spec = get_method(name)
        opts = {k: v for k, v in info.get("options", {}).items() if k in spec.options()
                and isinstance(v, (int, float, str, bool)) and not (isinstance(v, str) and v.startswith("<"))}
        fn = partial(_call, spec, opts)
        t = time.perf_counter()
        maps = torch.cat([fn(clf.module, x[lo:lo + 8], target[lo:lo + 8]) for lo in range(0, len(x), 8)]).float()
        maps_by[name] = maps.numpy()
        timings[f"{name}: maps"] = time.perf_counter() - t
        t = time.perf_counter()
        stab = stability(clf.module, x, target, fn, maps=maps, seed=seed)
        timings[f"{name}: stability"] = time.perf_counter() - t
        t = time.perf_counter()
        faith = _faithfulness(clf.module, x, target, maps, faithfulness_images, False, seed)
        timings[f"{name}: faithfulness"] = time.perf_counter() - t
        t = time.perf_counter()
        sanity = randomisation_check(clf.module, x[:sanity_images], target[:sanity_images], fn, seed=seed) \
            if spec.uses_model else None
        timings[f"{name}: sanity"] = time.perf_counter() - t
        summary[name] = {
            **{key: _nanmean([r[key] for r in stab]) for key in stab[0]},
            "faithfulness": {k: float(np.mean(v)) for k, v in faith.items()}, "sanity": sanity,
        }
        log(f"{name}: deletion AUC {summary[name]['faithfulness']['deletion_blur']:.3f} vs random "
            f"{summary[name]['faithfulness']['deletion_blur_random']:.3f}, noise Spearman "
            f"{summary[name]['noise_spearman']:.2f}, sanity "
            f"{'n/a' if not sanity or sanity['passed'] is None else 'passed' if sanity['passed'] else 'failed'}")
    names = list(maps_by)
    agreement = {f"{a} vs {b}": _nanmean([spearman(maps_by[a][i], maps_by[b][i]) for i in range(len(x))])
                 for ai, a in enumerate(names) for b in names[ai + 1:]}
    result = {"explain": str(folder), "model": args, "images": len(images), "methods": summary,
              "agreement_between_methods": agreement, "seconds": {k: round(v, 3) for k, v in timings.items()},
              "seed": seed}
    out = Path(out) if out else folder / "audit"
    write_json(out / "audit.json", result)
    return result | {"out": str(out)}
