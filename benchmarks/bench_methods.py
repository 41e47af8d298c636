"""Side-by-side timing of our methods against Captum and pytorch-grad-cam on the same model and inputs.

Each round runs every contender once, in turn (interleaved), so machine noise hits all of them alike;
the table reports medians over rounds and the ratios that matter: peer time / our time (speed-up) and
our time / the floor (the number of plain gradient or forward passes the method needs).

    python benchmarks/bench_methods.py                 # efficientnet_lite0, batch 4, 224x224, CPU
    python benchmarks/bench_methods.py --rounds 7 --batch 4 --threads 2 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--json", default=None, help="write the table here too")
    ap.add_argument("--only", default="", help="comma-separated groups: vanilla,smoothgrad,ig,occlusion,gradcam")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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


if __name__ == "__main__":
    main()
