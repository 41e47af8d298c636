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

from saliencylab.data.datasets import Record, load_dataset, read_metadata, read_split
from saliencylab.errors import UserError
from saliencylab.fsutil import atomic_path, write_json, write_text
from saliencylab.methods import MethodSpec, parse_methods
from saliencylab.metrics.faithfulness import area, removal_curve
from saliencylab.metrics.localisation import border_mask, box_mask, corner_mask, mass_inside, otsu_iou, pointing_game
from saliencylab.metrics.sanity import randomisation_check
from saliencylab.metrics.similarity import spearman
from saliencylab.metrics.stability import max_sensitivity, stability
from saliencylab.studies.cxr import load_run
from saliencylab.train import decode_cache, evaluate_logits


def _mask(root: Path, rel: str | None, size: int) -> np.ndarray | None:
    if not rel:
        return None
    m = Image.open(root / rel).convert("L").resize((size, size), Image.NEAREST)
    return np.asarray(m) > 127


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
          road: bool = False, seed: int = 0, out: str | Path | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Audit a trained run's saliency maps on `n` seeded test images; write audit.json, audit_images.csv,
    flagged.csv and figures under `out` (default RUN/audit)."""
    run_dir, clf, cfg = load_run(run)
    specs = parse_methods(methods)
    out = Path(out) if out else run_dir / ("audit" if data is None else f"audit-{Path(data).name}")
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data or cfg.get("data", ""))
    ds = load_dataset(root, classes=tuple(cfg.get("classes", clf.class_names)))
    split = read_split(run_dir / "split.csv") if (run_dir / "split.csv").is_file() else {}
    pool = [r for r in ds.records if split.get(r.file) == "test"] or list(ds.records)
    rng = np.random.default_rng(seed)
    chosen: list[Record] = [pool[i] for i in sorted(rng.permutation(len(pool))[:n])]
    size = clf.input_size[0]
    clf.to("cpu")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cache, bad = decode_cache(ds, chosen, size, progress=False)
    keep = [i for i, r in enumerate(chosen) if r.file not in {f for f, _ in bad}]
    chosen, cache = [chosen[i] for i in keep], cache[keep]
    if not chosen:
        raise UserError(f"no readable test image in '{root}'; check the dataset")
    meta = read_metadata(root)
    src_size = Image.open(root / chosen[0].file).size[0]
    lungs = [_mask(root, r.mask, size) for r in chosen]
    lesions = [_mask(root, r.lesions, size) for r in chosen]
    markers = []
    for r in chosen:
        row = meta.get(r.file, {})
        box = row.get("marker_box", "")
        markers.append(box_mask((size, size), tuple(round(int(v) * size / src_size) for v in box.split()), pad=1)
                       if box else None)
    x_all = torch.from_numpy(cache).float().div(255).unsqueeze(1).expand(-1, clf.channels, -1, -1).contiguous()
    labels = np.array([r.label for r in chosen])
    logits = evaluate_logits(clf, cache, np.arange(len(chosen)))
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    target = torch.from_numpy((probs >= 0.5).astype(np.int64))  # explain what the model predicted
    timings["load"] = time.perf_counter() - t0
    log(f"auditing {len(chosen)} test images of {root} with {', '.join(s.name for s in specs)}")

    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    maps_by_method: dict[str, np.ndarray] = {}
    border, corners = border_mask((size, size), 0.1), corner_mask((size, size), 0.2)
    for spec in specs:
        fn = partial(_call, spec)
        t = time.perf_counter()
        maps = torch.cat([fn(clf.module, x_all[lo:lo + 16], target[lo:lo + 16]) for lo in range(0, len(chosen), 16)])
        maps_np = maps.detach().float().numpy()
        maps_by_method[spec.name] = maps_np
        timings[f"{spec.name}: maps"] = time.perf_counter() - t

        t = time.perf_counter()
        per = []
        for i, r in enumerate(chosen):
            m = maps_np[i]
            lung = lungs[i]
            row = {"file": r.file, "label": int(r.label), "probability": round(float(probs[i]), 6),
                   "method": spec.name,
                   "lung_mass": _quiet(mass_inside, m, lung) if lung is not None else math.nan,
                   "lung_share": float(lung.mean()) if lung is not None else math.nan,
                   "lung_pointing": _quiet(pointing_game, m, lung) if lung is not None else math.nan,
                   "border_mass": _quiet(mass_inside, m, border), "corner_mass": _quiet(mass_inside, m, corners),
                   "lesion_mass": _quiet(mass_inside, m, lesions[i]) if lesions[i] is not None else math.nan,
                   "lesion_pointing": _quiet(pointing_game, m, lesions[i]) if lesions[i] is not None else math.nan,
                   "lesion_iou": _quiet(otsu_iou, m, lesions[i]) if lesions[i] is not None else math.nan,
                   "marker_mass": _quiet(mass_inside, m, markers[i]) if markers[i] is not None else math.nan}
            per.append(row)
        timings[f"{spec.name}: localisation"] = time.perf_counter() - t

        t = time.perf_counter()
        stab = []
        for lo in range(0, len(chosen), 16):
            stab += stability(clf.module, x_all[lo:lo + 16], target[lo:lo + 16], fn, maps=maps[lo:lo + 16], seed=seed)
        sens = max_sensitivity(clf.module, x_all[:16], target[:16], fn, n_samples=4, seed=seed, maps=maps[:16])
        for row, st in zip(per, stab, strict=True):
            row.update({k: round(v, 6) if isinstance(v, float) and math.isfinite(v) else v for k, v in st.items()})
        timings[f"{spec.name}: stability"] = time.perf_counter() - t

        t = time.perf_counter()
        faith = _faithfulness(clf.module, x_all, target, maps, faithfulness_images, road, seed)
        timings[f"{spec.name}: faithfulness"] = time.perf_counter() - t

        t = time.perf_counter()
        k = min(sanity_images, len(chosen))
        sanity = randomisation_check(clf.module, x_all[:k], target[:k], fn, seed=seed)
        timings[f"{spec.name}: sanity"] = time.perf_counter() - t
        rows += per

        lung_mass = _nanmean([r["lung_mass"] for r in per])
        lung_share = _nanmean([r["lung_share"] for r in per])
        summary[spec.name] = {
            "lung_mass": lung_mass, "lung_share": lung_share,
            "lung_ratio": lung_mass / lung_share if lung_share and math.isfinite(lung_share) else math.nan,
            **{key: _nanmean([r[key] for r in per]) for key in (
                "lung_pointing", "border_mass", "corner_mass", "lesion_mass", "lesion_pointing", "lesion_iou",
                "marker_mass", "noise_spearman", "noise_ssim", "shift_spearman", "shift_ssim")},
            "marker_mass_chance": _nanmean([float(mk.mean()) for mk in markers if mk is not None]),
            "max_sensitivity": float(np.mean(sens)) if len(sens) else math.nan,
            "faithfulness": faith, "sanity": sanity,
            "flagged": [r["file"] for r in per if r["lung_mass"] < 0.5],
        }
        log(f"{spec.name}: {100 * lung_mass:.0f}% of the saliency inside the lungs (they cover "
            f"{100 * lung_share:.0f}%), marker {100 * summary[spec.name]['marker_mass']:.1f}%, deletion AUC "
            f"{faith['deletion_blur']:.3f} vs random {faith['deletion_blur_random']:.3f}, sanity "
            f"{'passed' if sanity['passed'] else 'failed' if sanity['passed'] is False else 'n/a'}")

    t = time.perf_counter()
    agreement = {f"{a} vs {b}": _nanmean([spearman(maps_by_method[a][i], maps_by_method[b][i])
                                          for i in range(len(chosen))])
                 for ai, a in enumerate(maps_by_method) for b in list(maps_by_method)[ai + 1:]}
    models = _compare_models(compare, specs, x_all, target, maps_by_method) if compare else {}
    timings["agreement"] = time.perf_counter() - t

    t = time.perf_counter()
    probes = _probes(clf, x_all, labels, lungs, chosen, meta, root, size, cfg)
    timings["probes"] = time.perf_counter() - t

    result = {"run": str(run_dir), "data": str(root), "images": len(chosen), "unreadable": len(bad),
              "methods": summary, "agreement_between_methods": agreement, "agreement_between_models": models,
              "probes": probes, "seconds": {k: round(v, 3) for k, v in timings.items()}, "seed": seed}
    _write_outputs(out, result, rows, chosen, cache, maps_by_method, lungs, probs)
    return result | {"out": str(out)}


def _call(spec: MethodSpec, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return spec.fn(model, x, target)


def _faithfulness(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor, k: int,
                  road: bool, seed: int) -> dict[str, float]:
    """Mean deletion / insertion areas (most relevant first) for the maps and for random maps."""
    gen = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    fills = ["blur", "noisy_linear"] if road else ["blur"]
    out: dict[str, list[float]] = {}
    for i in range(k):
        rand = torch.rand(maps[i].shape, generator=gen)
        for fill in fills:
            for mode in ("deletion", "insertion"):
                for name, m in (("", maps[i]), ("_random", rand)):
                    curve = removal_curve(model, x[i], target[i], m, mode=mode, fill=fill, steps=10, seed=seed)
                    out.setdefault(f"{mode}_{fill}{name}", []).append(area(curve))
            lerf = removal_curve(model, x[i], target[i], maps[i], mode="deletion", fill=fill, order="lerf", steps=10)
            out.setdefault(f"deletion_{fill}_lerf", []).append(area(lerf))
    return {key: float(np.mean(v)) for key, v in out.items()}


def _compare_models(other: str, specs: list[MethodSpec], x: torch.Tensor, target: torch.Tensor,
                    maps: dict[str, np.ndarray]) -> dict[str, float]:
    _, clf2, _ = load_run(other)
    if clf2.input_size != tuple(x.shape[2:]) or clf2.channels != x.shape[1]:
        raise UserError(f"--compare {other}: that model takes {clf2.channels}x{clf2.input_size}, this one "
                        f"{x.shape[1]}x{tuple(x.shape[2:])}; compare models with the same input")
    out = {}
    for spec in specs:
        other_maps = torch.cat([spec.fn(clf2.module, x[lo:lo + 16], target[lo:lo + 16])
                                for lo in range(0, len(x), 16)]).detach().numpy()
        out[spec.name] = _nanmean([spearman(maps[spec.name][i], other_maps[i]) for i in range(len(x))])
    return out


def _probes(clf: Any, x: torch.Tensor, labels: np.ndarray, lungs: list, chosen: list[Record],
            meta: dict[str, dict[str, str]], root: Path, size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Accuracy with the lungs blacked out (Maguolo & Nanni 2021, https://doi.org/10.1016/j.inffus.2021.04.008)
    and, on phantoms, prediction flips when the marker is added or removed."""
    from saliencylab.metrics.classification import binary_metrics

    def predict(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([(clf.module.eval()(batch[lo:lo + 64])[:, 0] > 0).numpy()
                                   for lo in range(0, len(batch), 64)]).astype(int)

    base = predict(x)
    out: dict[str, Any] = {"accuracy": float((base == labels).mean())}
    have = [i for i, m in enumerate(lungs) if m is not None]
    if have:
        blacked = x[have].clone()
        for j, i in enumerate(have):
            blacked[j, :, torch.from_numpy(lungs[i])] = 0.0
        pred = predict(blacked)
        m = binary_metrics(labels[have], pred.astype(float), n_boot=200)
        out["lungs_blacked_out"] = {"images": len(have), "accuracy": m["accuracy"]["value"],
                                    "balanced_accuracy": m["balanced_accuracy"]["value"],
                                    "majority_baseline_accuracy": m["majority_baseline"]["accuracy"]}
    seeds = [meta.get(r.file, {}).get("seed") for r in chosen]
    if meta and all(s not in (None, "") for s in seeds):
        from saliencylab.data.phantoms import draw

        settings = {}
        ph_json = root / "phantoms.json"
        if ph_json.is_file():
            import json

            settings = json.loads(json.loads(ph_json.read_text())["settings"])
        src = int(settings.get("size", Image.open(root / chosen[0].file).size[0]))
        with_m, without_m = [], []
        for r, s in zip(chosen, seeds, strict=True):
            covid = r.cls == "COVID"
            shift = float(settings.get("exposure_shift", {}).get(r.cls, 0.0))
            scale = float(settings.get("lesion_scale", 1.0))
            for flag, bucket in ((True, with_m), (False, without_m)):
                ph = draw(int(s), covid, size=src, marker=flag, exposure_shift=shift, lesion_scale=scale)
                img = Image.fromarray((ph.image * 255 + 0.5).astype(np.uint8)).resize((size, size), Image.BILINEAR)
                bucket.append(np.asarray(img))
        def batch(arrs: list) -> torch.Tensor:
            return torch.from_numpy(np.stack(arrs)).float().div(255).unsqueeze(1).expand(
                -1, x.shape[1], -1, -1).contiguous()

        p_with, p_without = predict(batch(with_m)), predict(batch(without_m))
        out["marker_swap"] = {
            "images": len(chosen), "flips": int((p_with != p_without).sum()),
            "flip_rate": float((p_with != p_without).mean()),
            "positive_rate_with_marker": float(p_with.mean()), "positive_rate_without_marker": float(p_without.mean()),
            "accuracy_with_marker": float((p_with == labels).mean()),
            "accuracy_without_marker": float((p_without == labels).mean()),
        }
    return out


def _write_outputs(out: Path, result: dict[str, Any], rows: list[dict[str, Any]], chosen: list[Record],
                   cache: np.ndarray, maps: dict[str, np.ndarray], lungs: list, probs: np.ndarray) -> None:
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

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

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
    save(fig, "localisation.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for n in names:
        steps = s[n]["sanity"]["steps"]
        ax.plot(range(1, len(steps) + 1), [st["ssim"] for st in steps], "o-", label=n)
    base = [s[n]["sanity"]["baseline"]["ssim"] for n in names]
    if base and math.isfinite(np.nanmean(base)):
        ax.axhline(float(np.nanmean(base)), color="gray", ls="--", label="unrelated images")
    ax.set(xlabel="layers randomised (from the output down)", ylabel="SSIM to the original map",
           title="cascading randomisation")
    ax.legend(fontsize=8)
    save(fig, "sanity.png")

    if flagged:
        show = [i for i, r in enumerate(chosen) if r.file in flagged][:8]
        first = names[0]
        fig, axes = plt.subplots(1, len(show), figsize=(2.2 * len(show), 2.6), squeeze=False)
        for ax, i in zip(axes[0], show, strict=False):
            img = cache[i].astype(np.float32) / 255
            rgb = overlay(img, normalise(np.abs(maps[first][i]), "percentile"))
            if lungs[i] is not None:
                rgb[find_boundaries(lungs[i])] = (0, 255, 0)
            ax.imshow(rgb)
            ax.set_title(f"{Path(chosen[i].file).name}\np={probs[i]:.2f}", fontsize=7)
            ax.axis("off")
        fig.suptitle(f"flagged: most {first} saliency outside the lungs", fontsize=9)
        save(fig, "flagged.png")
