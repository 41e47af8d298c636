"""How many samples each sampler (iid, antithetic, sobol) needs for the same SmoothGrad and RISE map.

For each image, a reference map is made with i.i.d. draws and its own seed (512 samples for SmoothGrad by
default); each sampler then runs with `--seeds` other seeds, and its map after n = 4, 8, ... samples is
compared with the reference (Spearman rank correlation over pixels). "needed" is the smallest n whose
Spearman, averaged over seeds and images, reaches `--target` (0.95). The maps are the library's own
(`smoothgrad_sums` / `rise_sums`, cut into shares ending at 4, 8, 16, ... samples and summed up), so the
prefix of n samples is exactly what `smoothgrad(..., n_samples=n)` would give for antithetic and Sobol
draws (and for i.i.d. SmoothGrad noise); i.i.d. RISE masks are drawn all at once, so its prefix is an
i.i.d. sample of n masks.

Two subjects: the bundled photos with the embedded EfficientNet-Lite0 (at `--photo-size` px: the model's
224 px is too slow for a 512-sample reference on a loaded 2-core machine), and chest X-ray phantoms
with a randomly initialised `cxr_cnn` (seed 0; random weights, not trained).

    python benchmarks/bench_samplers.py                       # the committed run (see --help for sizes)
    python benchmarks/bench_samplers.py --photo-size 224 --reference 512 --rise-reference 2048  # full size

RISE needs large references: where the target probability moves little under the masks, an i.i.d. map is
mostly the masks' coverage (`--diagnose` measures both). The RISE study of the README
(benchmarks/results/samplers_rise_large_reference.json) ran

    python benchmarks/bench_samplers.py --subjects photos --methods rise --photo-size 224 --rise-reference 4096 \
        --rise-min 64 --rise-max 512 --rise-literal 512 --diagnose --seeds 2 --threads 1 --batch 16 --json FILE
    python benchmarks/bench_samplers.py --subjects phantoms --methods rise --phantom-model RUN/best.pt \
        --rise-reference 32768 [--rise-reference-sampler antithetic] --rise-min 64 --rise-max 4096 \
        --rise-literal 512 --diagnose --seeds 2 --threads 1 --json FILE

`--rise-literal 512` also compares with the first 512 masks of the reference (the issue's criterion);
`--merge A.json,B.json --json FILE` merges result files without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLERS = ("iid", "antithetic", "sobol")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy())[0])


def cumulative_maps(method: str, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, n: int, seed: int,
                    sampler: str, opts: dict[str, Any], first: int = 4,
                    ends: list[int] | None = None) -> dict[int, torch.Tensor]:
    """{k: map of the first k samples} for k = first, 2 first, 4 first, ..., n (or the given `ends`, the last
    one n); maps [B, *spatial] on the CPU."""
    from saliencylab.methods.gradient import smoothgrad_sums
    from saliencylab.methods.perturbation import rise_sums

    ends = ends or [first * 2 ** i for i in range(int(math.log2(n // first)) + 1)]
    if method == "smoothgrad":
        sums = smoothgrad_sums(model, x, t, n_samples=n, seed=seed, sampler=sampler, parts=ends, **opts)
    else:
        sums = rise_sums(model, x, t, n_masks=n, seed=seed, sampler=sampler, parts=ends, **opts)
    out, total = {}, torch.zeros_like(sums[0])
    for k, s in zip(ends, sums, strict=True):
        total = total + s
        m = total / k
        out[k] = (m.amax(1) if method == "smoothgrad" else m).detach().cpu()
    return out


class Recorder(torch.nn.Module):
    """The wrapped model, keeping every output it returns (in call order) on the CPU."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.outputs = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        self.outputs.append(y.detach().float().cpu())
        return y


class Constant(torch.nn.Module):
    """K equal logits whatever the input: RISE's map is then the masks' coverage alone."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.k)


def rise_diagnostics(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ref: dict[int, torch.Tensor],
                     logits: torch.Tensor, seed: int, opts: dict[str, Any], sampler: str = "iid") -> dict[str, Any]:
    """Why a RISE map does (not) converge: how much the target probability moves under the masks.

    RISE's map is sum_n P_n M_n / (N p) = mean(P) coverage / (N p) + sum_n (P_n - mean(P)) M_n / (N p): the
    first term only counts how often each pixel was kept (noise that does not depend on the model), the
    second is the signal. With P hardly moving (sd(P) << mean(P)) the first term dominates the map.

    Args:
        ref: the reference's maps {k masks: [B, *spatial]}; logits: [N, B, K] of the reference's masked copies.
    """
    from saliencylab.methods._common import target_probability
    from saliencylab.methods.perturbation import rise_sums

    n, b = logits.shape[:2]
    prob = target_probability(logits.flatten(0, 1), t.repeat(n)).view(n, b)  # (N, B)
    with torch.inference_mode():
        p0 = target_probability(model(x).float(), t)
    ends = sorted(ref)
    cov = rise_sums(Constant(logits.shape[2]), x, t, n_masks=n, seed=seed, sampler=sampler, parts=ends, **opts)
    coverage, total = {}, torch.zeros_like(cov[0])
    for k, c in zip(ends, cov, strict=True):
        total = total + c
        coverage[k] = total.detach().cpu()
    return {"p_unmasked": [round(float(v), 4) for v in p0],
            "p_masked_mean": [round(float(v), 4) for v in prob.mean(0)],
            "p_masked_sd": [round(float(v), 4) for v in prob.std(0)],
            "p_masked_quartiles": [[round(float(q), 4) for q in torch.quantile(prob[:, i].double(),
                                                                             torch.tensor([0.25, 0.5, 0.75],
                                                                                          dtype=torch.float64))]
                                   for i in range(b)],
            "spearman_map_vs_coverage": {str(k): [round(spearman(ref[k][i], coverage[k][i]), 4)
                                                  if float(coverage[k][i].std()) > 1e-6 * float(coverage[k][i].mean())
                                                  else None for i in range(b)]  # None: even coverage
                                         for k in ends}}


def study(name: str, method: str, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, *, reference: int,
          most: int, seeds: int, target: float, opts: dict[str, Any], log: Any, first: int = 4, literal: int = 0,
          diagnose: bool = False, ref_sampler: str = "iid") -> dict[str, Any]:
    t0 = time.perf_counter()
    half = reference // 2  # the reference's own noise: its halves are independent i.i.d. maps
    rec = Recorder(model) if diagnose else model
    ref = cumulative_maps(method, rec, x, t, reference, 10_000, ref_sampler, opts,
                          ends=sorted({literal, half, reference} - {0}))
    ref_map = ref[reference]
    ref_first = ref[half]
    ref_second = ref_map * 2 - ref_first
    ref_split = [spearman(ref_first[i], ref_second[i]) for i in range(x.shape[0])]
    # the reference's own variance (squared L2, per image): its two halves are independent i.i.d. maps
    ref_var = [float(((ref_first[i] - ref_second[i]) ** 2).sum()) / 4 for i in range(x.shape[0])]
    diag = None
    if diagnose:
        logits = torch.cat(rec.outputs).view(reference, x.shape[0], -1)  # (N, B, K) in mask order
        diag = rise_diagnostics(model, x, t, ref, logits, 10_000, opts, ref_sampler)
        log(f"{name:<9} {method:<10} diagnostics: {json.dumps(diag)}")
    curves: dict[str, dict[int, float]] = {}
    errors: dict[str, dict[int, float]] = {}
    lit_curves: dict[str, dict[int, float]] = {}  # vs the first `literal` masks of the reference (the issue's)
    for sampler in SAMPLERS:
        rows, sq, lit = [], [], []  # (seed, image) -> spearman per n, squared L2 distance per n
        for s in range(seeds):
            maps = cumulative_maps(method, model, x, t, most, s, sampler, opts, first=first)
            for i in range(x.shape[0]):
                rows.append([spearman(maps[k][i], ref_map[i]) for k in sorted(maps)])
                sq.append([float(((maps[k][i] - ref_map[i]) ** 2).sum()) - ref_var[i] for k in sorted(maps)])
                if literal:
                    lit.append([spearman(maps[k][i], ref[literal][i]) for k in sorted(maps)])
        ks = sorted(maps)
        curves[sampler] = {k: statistics.fmean(r[j] for r in rows) for j, k in enumerate(ks)}
        errors[sampler] = {k: statistics.fmean(r[j] for r in sq) for j, k in enumerate(ks)}
        if literal:
            lit_curves[sampler] = {k: statistics.fmean(r[j] for r in lit) for j, k in enumerate(ks)}
    needed = {s: next((k for k, v in c.items() if v >= target), None) for s, c in curves.items()}
    # variance at equal samples relative to i.i.d. (the squared L2 distance to the reference less the
    # reference's own variance): for a variance proportional to 1/n, the share of i.i.d.'s samples needed
    # for the same L2 error; the median over n = 4, 8, ...
    efficiency = {s: statistics.median(max(errors[s][k], 0.0) / errors["iid"][k] for k in ks
                                       if errors["iid"][k] > 0) for s in SAMPLERS}
    out = {"subject": name, "method": method, "options": opts, "images": x.shape[0], "input": list(x.shape[1:]),
           "reference_samples": reference, "reference_sampler": ref_sampler, "reference_seed": 10_000,
           "reference_split_half_spearman": ref_split, "max_samples": most, "seeds": seeds, "target": target,
           "spearman_vs_reference": {s: {str(k): round(v, 4) for k, v in c.items()} for s, c in curves.items()},
           "needed": needed, "variance_vs_iid_at_equal_samples": {k: round(v, 3) for k, v in efficiency.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    if first != 4:
        out["min_samples"] = first
    if literal:
        lit_split = [spearman(ref[literal][i], ref_map[i] * reference / (reference - literal)
                              - ref[literal][i] * literal / (reference - literal)) for i in range(x.shape[0])]
        out["literal_reference"] = {
            "samples": literal, "sampler": ref_sampler,
            "what": f"the first {literal} masks of the reference (with an i.i.d. reference: the issue's criterion)",
            "spearman_with_the_rest_of_the_reference": lit_split,
            "spearman_vs_reference": {s: {str(k): round(v, 4) for k, v in c.items()} for s, c in lit_curves.items()},
            "needed": {s: next((k for k, v in c.items() if v >= target), None) for s, c in lit_curves.items()},
            "best": {s: round(max(c.values()), 4) for s, c in lit_curves.items()}}
    if diag is not None:
        out["diagnostics"] = diag
    log(f"{name:<9} {method:<10} reference {reference} {ref_sampler} (split-half {statistics.fmean(ref_split):.3f}); "
        f"needed for {target}: " + ", ".join(f"{s} {v if v else '>' + str(most)}" for s, v in needed.items())
        + "; variance vs iid at equal samples: " + ", ".join(f"{k} {v:.2f}" for k, v in efficiency.items())
        + f"  [{out['seconds']}s]")
    for s, c in curves.items():
        log(f"    {s:<10} " + " ".join(f"{k}:{v:.3f}" for k, v in c.items()))
    for s, c in lit_curves.items():
        log(f"    vs {literal} {s:<10} " + " ".join(f"{k}:{v:.3f}" for k, v in c.items()))
    return out


def photos(size: int, names: str = "chelsea,coffee") -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from saliencylab.data import load_image
    from saliencylab.methods import resolve_target
    from saliencylab.models import load_model

    clf = load_model("efficientnet_lite0", device="cpu")
    x = torch.stack([clf.preprocess(load_image(f"sample:{n}").pixels) for n in names.split(",")])
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(0, 1)
    return clf.module, x, resolve_target(clf.module, x)


def phantoms(size: int, count: int, weights: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from saliencylab.data.phantoms import draw
    from saliencylab.methods import resolve_target
    from saliencylab.models import load_model

    torch.manual_seed(0)
    clf = load_model(weights, device="cpu") if weights != "random" else \
        load_model("cxr_cnn", weights="random", device="cpu", image_size=size)
    imgs = [draw(1000 + i, covid=bool(i % 2), size=size).image for i in range(count)]
    x = torch.from_numpy(np.stack(imgs)).float()[:, None]
    return clf.module, x, resolve_target(clf.module, x)


def command(args: argparse.Namespace) -> str:
    flags = []
    for k, v in vars(args).items():
        if k in ("json", "merge") or v is False:
            continue
        flags.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return "python benchmarks/bench_samplers.py " + " ".join(flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="photos,phantoms")
    ap.add_argument("--methods", default="smoothgrad,rise")
    ap.add_argument("--photo-size", type=int, default=64, help="photo input side in px (the model's own: 224)")
    ap.add_argument("--phantom-size", type=int, default=64)
    ap.add_argument("--phantoms", type=int, default=2, help="how many phantoms")
    ap.add_argument("--phantom-model", default="random",
                    help="a cxr_cnn checkpoint (run folder's best.pt), or 'random' (seeded random weights)")
    ap.add_argument("--reference", type=int, default=512, help="SmoothGrad reference samples (i.i.d.)")
    ap.add_argument("--rise-reference", type=int, default=512, help="RISE reference masks (i.i.d.)")
    ap.add_argument("--max", type=int, default=128, help="most samples per tested sampler")
    ap.add_argument("--rise-max", type=int, default=256)
    ap.add_argument("--rise-min", type=int, default=4, help="fewest masks per tested sampler (then doubling)")
    ap.add_argument("--rise-literal", type=int, default=0,
                    help="also compare with the first N masks of the RISE reference (the issue's 512); 0: off")
    ap.add_argument("--diagnose", action="store_true",
                    help="RISE: record how the target probability moves under the reference's masks and how "
                         "much of the map is the masks' coverage alone")
    ap.add_argument("--rise-reference-sampler", default="iid", choices=SAMPLERS,
                    help="sampler of the RISE reference (all are unbiased; use another where i.i.d. cannot "
                         "converge in the time there is, and check its split-half)")
    ap.add_argument("--photos", default="chelsea,coffee", help="bundled photos (skimage names)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--batch", type=int, default=64, help="samples per forward pass")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="benchmarks/results/samplers_last_run.json")
    ap.add_argument("--merge", default="",
                    help="comma-separated result files to merge into --json (runs nothing; verdicts recomputed)")
    args = ap.parse_args()
    if args.merge:
        for f in args.merge.split(","):
            old = json.loads(Path(f).read_text())
            write(Path(args.json), old["results"], old.get("runs", []))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    t0 = time.perf_counter()
    for subject in args.subjects.split(","):
        if subject == "photos":
            model, x, t = photos(args.photo_size, args.photos)
        else:
            model, x, t = phantoms(args.phantom_size, args.phantoms, args.phantom_model)
        bs = max(1, args.batch)
        for method in args.methods.split(","):
            extra: dict[str, Any] = {}
            if method == "smoothgrad":
                opts = {"noise_level": 0.15, "batch_size": bs}
                ref, most = args.reference, args.max
            else:
                opts = {"grid": 7, "p_keep": 0.5, "batch_size": bs}
                ref, most = args.rise_reference, args.rise_max
                extra = {"first": args.rise_min, "literal": args.rise_literal, "diagnose": args.diagnose,
                         "ref_sampler": args.rise_reference_sampler}
            results.append(study(subject, method, model, x, t, reference=ref, most=most, seeds=args.seeds,
                                 target=args.target, opts=opts, log=print, **extra))
    runs = [{"command": command(args), "seconds": round(time.perf_counter() - t0, 1),
             "studies": [key(r) for r in results]}]
    write(Path(args.json), results, runs)


def key(r: dict[str, Any]) -> str:
    """A study's name in a results file: subject/method, and the reference's sampler where not i.i.d."""
    ref = r.get("reference_sampler", "iid")
    return f"{r['subject']}/{r['method']}" + ("" if ref == "iid" else f"/{ref}-reference")


def at_half_the_samples(r: dict[str, Any]) -> dict[str, bool | None]:
    """Per sampler: does it reach, at every n tried, the Spearman that i.i.d. reaches at 2n (None: no such n)?"""
    iid = r["spearman_vs_reference"]["iid"]
    out: dict[str, bool | None] = {}
    for s, c in r["spearman_vs_reference"].items():
        pairs = [(v, iid[str(2 * int(k))]) for k, v in c.items() if str(2 * int(k)) in iid]
        out[s] = all(a >= b for a, b in pairs) if pairs else None
    return out


def verdicts(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method, over subjects: samples needed / i.i.d.'s, variance at equal samples, and the issue's rule."""
    out = {}
    for method in sorted({r["method"] for r in results}):
        # per subject, the study whose reference converged best (highest split-half Spearman)
        rows = [max((r for r in results if r["method"] == method and r["subject"] == subject),
                    key=lambda r: statistics.fmean(r["reference_split_half_spearman"]))
                for subject in dict.fromkeys(r["subject"] for r in results if r["method"] == method)]
        need = {s: [r["needed"][s] or 2 * r["max_samples"] for r in rows] for s in SAMPLERS}
        ratio = {s: math.exp(statistics.fmean(math.log(a / b) for a, b in zip(need[s], need["iid"], strict=True)))
                 for s in SAMPLERS}
        var = {s: math.exp(statistics.fmean(math.log(max(r["variance_vs_iid_at_equal_samples"][s], 1e-6))
                                            for r in rows)) for s in SAMPLERS}
        halves = {s: [at_half_the_samples(r)[s] for r in rows] for s in SAMPLERS}
        best = min(("antithetic", "sobol"), key=lambda s: (ratio[s], var[s]))
        # the issue's rule: at most half of i.i.d.'s samples for the same correlation, on every subject (where
        # i.i.d. never reached the target, the sampler must match at n what i.i.d. reaches at 2n)
        default = all(h if h is not None else False for h in halves[best]) or ratio[best] <= 0.5
        out[method] = {"needed_over_iid": {s: round(v, 3) for s, v in ratio.items()},
                       "variance_vs_iid_at_equal_samples": {s: round(v, 3) for s, v in var.items()},
                       "matches_iid_at_twice_the_samples": halves,
                       "studies": [key(r) for r in rows], "best": best, "make_default": default}
        print(f"{method}: samples needed / iid's (geometric mean over subjects): "
              + ", ".join(f"{s} {v:.2f}" for s, v in ratio.items()) + "; matches iid at twice the samples: "
              + ", ".join(f"{s} {h}" for s, h in halves.items())
              + f" -> {'make ' + best + ' the default' if default else 'keep iid (no sampler halves it)'}")
    return out


def write(path: Path, results: list[dict[str, Any]], runs: list[dict[str, Any]]) -> None:
    """Merge into `path` (the studies of earlier runs are kept unless redone), recompute verdicts, write."""
    if path.is_file():  # keep the studies of earlier runs (one run per subject keeps each run short)
        old = json.loads(path.read_text())
        done = {key(r) for r in results}
        results = [r for r in old["results"] if key(r) not in done] + results
        runs = [r for r in old.get("runs", []) if set(r["studies"]) - done] + runs
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "note": "measured on a loaded 2-core machine; a sampler that never reached the target counts as "
                   "twice the most samples tried", "runs": runs, "results": results, "verdicts": verdicts(results)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
