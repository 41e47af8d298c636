"""How close the phantoms are to the real data they are drawn from, and how fast they are drawn.

    PYTHONPATH=src python benchmarks/bench_phantoms.py [--n 600] [--speed 400] [--figure docs/phantoms_vs_real.png]

1. Lung shape: the phantoms' lung area fraction, bounding-box width/height and left/right area ratio against
   the real V7 Labs masks (torchxrayvision's wheel), two-sample Kolmogorov-Smirnov statistic per measure.
2. Findings: each phantom lesion's box (centre x, centre y, width, height, in units of the side) against
   the real RSNA and NIH opacity boxes, KS per measure.
3. Speed: `generate` at 256 px with 2 workers (images/s), with the load average at the time.
4. The side-by-side figure: phantoms, real lung outlines, the real opacity-box density.

Needs the `[anatomy]` extra. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from saliencylab.data import anatomy
from saliencylab.data.phantoms import PhantomConfig, draw, generate, image_seed


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(a), np.asarray(b)).statistic)


def lung_measures(lungs: np.ndarray) -> tuple[float, float, float]:
    """(area fraction, width/height, left/right area ratio) of a phantom's lung mask, split at the gap
    between the two largest components."""
    from scipy import ndimage

    lab, k = ndimage.label(lungs)
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:2] + 1
    a, b = lab == order[0], lab == order[-1]
    left, right = (a, b) if np.nonzero(a)[1].mean() < np.nonzero(b)[1].mean() else (b, a)
    if k < 2:
        left, right = lungs & False, lungs
    area, wh, _ = anatomy.lung_stats(left | right, np.zeros_like(lungs))
    lr = right.sum() / max(1, left.sum())
    return area, wh, float(lr)


def box_measures(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) boxes x0, y0, x1, y1 -> (n, 4) centre x, centre y, width, height."""
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                     boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)


def shape_and_lesions(n: int, size: int = 256, seed: int = 0) -> dict:
    real = anatomy.load()
    ours, boxes = [], []
    for i in range(1, n + 1):
        ph = draw(image_seed(seed, "COVID", i), True, size=size, anatomy="real")
        ours.append(lung_measures(ph.lungs))
        boxes += [np.array(b, float) / size for b in ph.lesion_boxes]
    ours_arr = np.array(ours)
    names = ("area_fraction", "width_height", "left_right")
    lung = {k: {"ks": round(ks(ours_arr[:, j], real.stats[:, j]), 4),
                "phantom_median": round(float(np.median(ours_arr[:, j])), 4),
                "real_median": round(float(np.median(real.stats[:, j])), 4)} for j, k in enumerate(names)}
    mine, theirs = box_measures(np.array(boxes)), box_measures(real.boxes.astype(float))
    les = {k: {"ks": round(ks(mine[:, j], theirs[:, j]), 4), "phantom_median": round(float(np.median(mine[:, j])), 4),
               "real_median": round(float(np.median(theirs[:, j])), 4)}
           for j, k in enumerate(("centre_x", "centre_y", "width", "height"))}
    return {"phantoms": n, "real_masks": len(real.names), "real_boxes": len(real.boxes), "lesions": len(boxes),
            "lungs": lung, "lesion_boxes": les}


def speed(n: int, size: int = 256, workers: int = 2) -> dict:
    """Wall-clock images/s of `generate` with `workers` processes, and the CPU seconds the workers spent per
    image (user + system), from which the rate on `workers` otherwise idle cores is estimated: on a shared
    machine the wall clock measures the neighbours as much as the generator."""
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        cfg = PhantomConfig(n_covid=n // 2, n_normal=n - n // 2, size=size, workers=workers)
        load = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = generate(cfg, Path(tmp) / "p", progress=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        per = cpu / max(1, out["images"])
        return {"images": out["images"], "seconds": out["seconds"], "images_per_second": out["images_per_second"],
                "workers": workers, "size": size, "cpu_ms_per_image": round(1000 * per, 1),
                "images_per_second_on_idle_cores_estimate": round(workers / per, 1) if per else None,
                "load_average_1_5_15": [round(x, 2) for x in load],
                "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def figure(path: Path, size: int = 256) -> None:
    """The README's figure: `saliencylab.render.figures.phantoms_vs_real`, kept small for the repository."""
    from saliencylab.render.figures import phantoms_vs_real

    phantoms_vs_real(path, size=size, colours=128)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="phantoms for the KS comparisons")
    ap.add_argument("--speed", type=int, default=400, help="images for the speed test (0: skip)")
    ap.add_argument("--figure", type=Path, default=None, help="write the side-by-side figure here")
    args = ap.parse_args(argv)
    if not anatomy.available():
        print("needs the [anatomy] extra: pip install 'saliencylab[anatomy]'", file=sys.stderr)
        return 2
    t = time.perf_counter()
    result = {"shape": shape_and_lesions(args.n)}
    result["shape"]["seconds"] = round(time.perf_counter() - t, 1)
    if args.speed:
        result["speed"] = speed(args.speed)
    if args.figure:
        figure(args.figure)
        result["figure"] = str(args.figure)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
