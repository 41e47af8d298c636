"""Side-by-side timing of our methods against Captum and pytorch-grad-cam on the same model and inputs.

Each round runs every contender once, in turn (interleaved), so machine noise hits all of them alike;
the table reports medians over rounds and the ratios that matter: peer time / our time (speed-up) and
our time / the floor (the number of plain gradient or forward passes the method needs).

    python benchmarks/bench_methods.py                 # efficientnet_lite0, batch 4, 224x224, CPU
    python benchmarks/bench_methods.py --rounds 7 --batch 4 --threads 2 --json bench.json

With --device, the device table of issue 10 instead: EfficientNet-Lite0 and VGG16 with random weights, 1 and 32
images, ours with automatic passes, ours with one pass of all samples, Captum batched, pytorch-grad-cam for
Grad-CAM, a sweep of pass sizes (ours-auto / best-of-sweep), and bf16 against fp32 (speed-up, Spearman per image):

    python benchmarks/bench_methods.py --device cuda --json benchmarks/results/methods_cuda.json
    python benchmarks/bench_methods.py --device cpu --quick       # tiny sizes: checks the script, not the speed
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--json", default=None, help="write the table here too")
    ap.add_argument("--only", default="", help="comma-separated groups: vanilla,smoothgrad,ig,occlusion,gradcam")
    ap.add_argument("--device", default=None, help="cuda or cpu: the device table of issue 10 (see above)")
    ap.add_argument("--quick", action="store_true", help="with --device: tiny sizes, to check the script")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        device_table(args)
        return

    from captum.attr import IntegratedGradients, LayerGradCam, NoiseTunnel, Occlusion, Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from saliencylab.methods import get_method, resolve_target
    from saliencylab.methods._common import layer_by_name
    from saliencylab.models import load_model

    clf = load_model(args.model, device="cpu")
    model = clf.module
    x = torch.rand(args.batch, clf.channels, *clf.input_size, generator=torch.Generator().manual_seed(0))
    t = resolve_target(model, x)
    layer = layer_by_name(model, clf.cam_layer)
    sigma = 0.15 * float(x.max() - x.min())
    n_sg, n_ig = 16, 32
    ours = {name: get_method(name).fn for name in ("vanilla", "smoothgrad", "integrated_gradients", "occlusion",
                                                   "gradcam")}
    n_windows = ((clf.input_size[0] - 32) // 16 + 1) * ((clf.input_size[1] - 32) // 16 + 1)

    def forward_only() -> None:  # the floor of perturbation methods: a plain forward pass, no tricks
        with torch.inference_mode():
            model(x)

    def plain_gradient() -> None:  # the floor of gradient methods: a plain torch gradient, no tricks
        xx = x.detach().requires_grad_(True)
        torch.autograd.grad(model(xx).gather(1, t.view(-1, 1)).sum(), xx)

    gcam = GradCAM(model=model, target_layers=[layer])
    groups: dict[str, dict[str, Callable[[], object]]] = {
        "vanilla": {
            "ours": lambda: ours["vanilla"](model, x, t),
            "captum Saliency": lambda: Saliency(model).attribute(x, target=t, abs=True),
        },
        "smoothgrad": {
            "ours": lambda: ours["smoothgrad"](model, x, t, n_samples=n_sg),
            "captum NoiseTunnel": lambda: NoiseTunnel(Saliency(model)).attribute(
                x, nt_type="smoothgrad", nt_samples=n_sg, stdevs=sigma, target=t, abs=True),
        },
        "ig": {
            "ours": lambda: ours["integrated_gradients"](model, x, t, n_steps=n_ig),
            "captum IntegratedGradients": lambda: IntegratedGradients(model).attribute(
                x, target=t, n_steps=n_ig, internal_batch_size=32),
        },
        "occlusion": {
            "ours": lambda: ours["occlusion"](model, x, t, window=32, stride=16),
            "captum Occlusion": lambda: Occlusion(model).attribute(
                x, sliding_window_shapes=(clf.channels, 32, 32), strides=(clf.channels, 16, 16), target=t),
        },
        "gradcam": {
            "ours": lambda: ours["gradcam"](model, x, t),
            "pytorch-grad-cam GradCAM": lambda: gcam(input_tensor=x, targets=[ClassifierOutputTarget(int(i))
                                                                             for i in t]),
            "captum LayerGradCam": lambda: LayerGradCam(model, layer).attribute(x, target=t),
        },
        "floor": {
            "one vanilla gradient": plain_gradient,
            "one forward pass": forward_only,
        },
    }
    if args.only:
        keep = set(args.only.split(",")) | {"floor"}
        groups = {k: v for k, v in groups.items() if k in keep}
    for fns in groups.values():  # warm up
        for fn in fns.values():
            fn()
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for g, fns in groups.items():
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times.setdefault((g, name), []).append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    grad1, fwd1 = med[("floor", "one vanilla gradient")], med[("floor", "one forward pass")]
    floors = {"vanilla": grad1, "smoothgrad": n_sg * grad1, "ig": n_ig * grad1, "occlusion": n_windows * fwd1,
              "gradcam": grad1}
    rows = []
    print(f"\n{args.model}, batch {args.batch}, {clf.input_size[0]}x{clf.input_size[1]}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print(f"{'method':<11} {'implementation':<27} {'seconds':>8} {'x floor':>8} {'peer / ours':>12}")
    for g, fns in groups.items():
        if g == "floor":
            continue
        our = med[(g, "ours")]
        for name in fns:
            s = med[(g, name)]
            row = {"method": g, "implementation": name, "seconds": s, "x_floor": s / floors[g],
                   "peer_over_ours": None if name == "ours" else s / our}
            rows.append(row)
            ratio = "" if name == "ours" else f"{s / our:>11.2f}x"
            print(f"{g:<11} {name:<27} {s:>8.3f} {s / floors[g]:>8.2f} {ratio:>12}")
    print(f"floors: one gradient {grad1:.3f}s, one forward {fwd1:.3f}s; smoothgrad {n_sg} gradients, "
          f"ig {n_ig} gradients, occlusion {n_windows} forwards")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "rounds": args.rounds, "rows": rows}, f, indent=2)


# ------------------------------------------------------------------------------------------ the device table


def timed(fn: Callable[[], object], device: torch.device, rounds: int) -> float:
    """Median seconds of `rounds` calls after one warm-up; CUDA is synchronised before and after each call."""
    fn()
    out = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def spearman_per_image(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Spearman rank correlation of two stacks of maps [B, H, W], image by image."""
    from scipy.stats import spearmanr

    a, b = a.detach().double().cpu().flatten(1).numpy(), b.detach().double().cpu().flatten(1).numpy()
    return [float(spearmanr(u, v)[0]) for u, v in zip(a, b, strict=True)]


def device_table(args: argparse.Namespace) -> None:
    """Issue 10's side-by-side table on one device (see the module's docstring); prints it and writes --json."""
    from saliencylab.devices import choose_device
    from saliencylab.models import load_model

    dev = choose_device(args.device)
    quick = args.quick
    if quick and not args.threads and dev.type == "cpu":
        torch.set_num_threads(1)  # a check of the script on a busy CPU: default threads spin (20x slower, measured)
    size = 32 if quick else 224
    batches = (1, 2) if quick else (1, 32)
    rounds = 1 if quick else args.rounds
    n_sg, n_ig, n_rise = (4, 4, 16) if quick else (16, 32, 1000)
    win, stride = (8, 8) if quick else (32, 16)
    n_windows = ((size - win) // stride + 1) ** 2
    rows: list[dict[str, object]] = []
    print(f"device table on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"{size}x{size}, median of {rounds}, fp32 = TF32 off{' (--quick: tiny sizes)' if quick else ''}",
          flush=True)
    cfg = {"n_sg": n_sg, "n_ig": n_ig, "n_rise": n_rise, "win": win, "stride": stride, "n_windows": n_windows,
           "rounds": rounds, "size": size}
    for model_name in ("efficientnet_lite0", "vgg16"):
        clf = load_model(model_name, weights="random", device=dev, input_size=size)
        for b in batches[:1] if quick and model_name == "vgg16" else batches:  # --quick: VGG16 at 1 image only
            for row in _setting(clf, model_name, b, dev, cfg):
                rows.append(row)
                print(_line(row), flush=True)
                if args.json:  # after every row: a run cut short keeps what it measured
                    _write(args.json, {"device": str(dev), "torch": torch.__version__, "quick": quick, "size": size,
                                       "rounds": rounds, "threads": torch.get_num_threads(), "rows": rows})
        clf = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _write(path: str, payload: dict[str, object]) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def _setting(clf: Any, model_name: str, b: int, dev: torch.device, cfg: dict[str, int]) -> list[dict[str, object]]:
    """The device table's rows for one model and batch size: every method, its peers, the sweep and bf16."""
    from captum.attr import IntegratedGradients, LayerGradCam, NoiseTunnel, Occlusion, Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from saliencylab.methods import get_method, resolve_target
    from saliencylab.methods._common import layer_by_name, record_passes
    from saliencylab.models import find_cam_layer
    from saliencylab.precision import precision

    model = clf.module.eval()
    size, rounds, win, stride, n_windows = cfg["size"], cfg["rounds"], cfg["win"], cfg["stride"], cfg["n_windows"]
    n_sg, n_ig, n_rise = cfg["n_sg"], cfg["n_ig"], cfg["n_rise"]
    x = torch.rand(b, clf.channels, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    layer = layer_by_name(model, clf.cam_layer or find_cam_layer(model, x))
    gcam = GradCAM(model=model, target_layers=[layer])
    with precision("fp32", dev):
        t = resolve_target(model, x)
    sigma = 0.15 * float(x.max() - x.min())
    work = {"smoothgrad": n_sg, "integrated_gradients": n_ig, "occlusion": n_windows, "rise": n_rise}
    opts = {"smoothgrad": {"n_samples": n_sg}, "integrated_gradients": {"n_steps": n_ig},
            "occlusion": {"window": win, "stride": stride}, "rise": {"n_masks": n_rise}, "gradcam": {}}
    peers: dict[str, dict[str, Callable[[], object]]] = {
        "smoothgrad": {"captum NoiseTunnel (batched)": lambda: NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=n_sg, nt_samples_batch_size=n_sg, stdevs=sigma, target=t, abs=True)},
        "integrated_gradients": {"captum IntegratedGradients (batched)": lambda: IntegratedGradients(
            model).attribute(x, target=t, n_steps=n_ig, internal_batch_size=n_ig * b)},
        "occlusion": {"captum Occlusion (batched)": lambda: Occlusion(model).attribute(
            x, sliding_window_shapes=(clf.channels, win, win), strides=(clf.channels, stride, stride), target=t,
            perturbations_per_eval=n_windows)},
        "rise": {},
        "gradcam": {"pytorch-grad-cam GradCAM": lambda: gcam(
            input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in t]),
            "captum LayerGradCam": lambda: LayerGradCam(model, layer).attribute(x, target=t)},
    }
    rows = []
    for method, peer in peers.items():
        fn, o = get_method(method).fn, opts[method]

        def ours(bs: int | None = None, fn: Callable = fn, o: dict = o) -> torch.Tensor:
            return fn(model, x, t, **o, **({"batch_size": bs} if bs else {}))

        row: dict[str, object] = {"device": str(dev), "model": model_name, "images": b, "method": method,
                                  "options": o}
        with precision("fp32", dev):
            with record_passes() as log:
                ours()
            row["auto_samples_per_pass"] = max(c.samples for c in log) if log else None
            row["ours_auto_s"] = timed(ours, dev, rounds)
            if method in work:
                n = work[method]
                row["ours_one_pass_s"] = timed(lambda n=n: ours(n * b), dev, rounds)
                sweep = sorted({min(n, 2 ** k) * b for k in range(0, n.bit_length() + 1)})
                row["sweep"] = {str(s): timed(lambda s=s: ours(s), dev, rounds) for s in sweep}
                row["auto_over_best_of_sweep"] = row["ours_auto_s"] / min(row["sweep"].values())
            for name, peer_fn in peer.items():
                row[name + "_s"] = timed(peer_fn, dev, rounds)
            ref = ours()
        with precision("bf16", dev):
            row["bf16_s"] = timed(ours, dev, rounds)
            low = ours()
        row["bf16_speedup"] = row["ours_auto_s"] / row["bf16_s"]
        row["bf16_spearman_per_image"] = spearman_per_image(ref, low)
        rows.append(row)
    return rows


def _line(row: dict[str, object]) -> str:
    peers = ", ".join(f"{k[:-2]} {v:.4f}s" for k, v in row.items() if k.endswith(")_s") or k.endswith("CAM_s"))
    parts = [f"{row['model']:<18} {row['images']:>2} img  {row['method']:<21}",
             f"auto {row['ours_auto_s']:.4f}s ({row['auto_samples_per_pass']} per pass)"]
    if "ours_one_pass_s" in row:
        parts.append(f"one pass {row['ours_one_pass_s']:.4f}s, auto/best-of-sweep "
                     f"{row['auto_over_best_of_sweep']:.2f}")
    if peers:
        parts.append(peers)
    rho = row["bf16_spearman_per_image"]
    parts.append(f"bf16 x{row['bf16_speedup']:.2f}, Spearman min {min(rho):.4f} median {statistics.median(rho):.4f}")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
