"""Dataset-scale explain: images per second end to end against the methods' compute alone, and peak memory.

Runs `saliencylab explain` as a user would (a fresh process per run, so model loading and start-up count) over
N chest X-ray phantoms with four methods on a small CNN, with the local engine and under torchrun with two
processes; reads the methods' own seconds from results.json (summed from every manifest row); and measures the
peak resident memory of each run at 1/10 of N and at N (it must not grow with N).

    python benchmarks/bench_scale.py                 # 2,000 phantoms (and 200)
    python benchmarks/bench_scale.py --small         # 200 phantoms (and 20): a quick check
    python benchmarks/bench_scale.py --nproc 2       # torchrun with 2 processes too (default)

Writes benchmarks/scale_last_run.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["--methods", "vanilla,smoothgrad,integrated_gradients,gradcam", "--set", "smoothgrad.n_samples=8",
           "--set", "integrated_gradients.n_steps=16"]


def _env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MASTER_ADDR": "127.0.0.1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in MB (the largest process of the run, children included)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def _explain(files: list[str] | str, model: Path, out: Path, *, nproc: int, workers: int,
             batch: int) -> dict[str, Any]:
    args = ["explain", *([files] if isinstance(files, str) else files), "--model", str(model), *METHODS,
            "--out", str(out), "--no-progress", "--workers", str(workers), "--batch-size", str(batch)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "saliencylab.cli", *args]
        env = _env(max(1, (os.cpu_count() or 2) // nproc))
    else:
        cmd, env = [sys.executable, "-m", "saliencylab.cli", *args], _env()
    print(f"running {nproc} process(es), {len(files) if isinstance(files, list) else 'all'} inputs ...",
          file=sys.stderr, flush=True)
    wall, rss = _run(cmd, env)
    res = json.loads((out / "results.json").read_text())
    n = res["summary"]["images"]
    compute = sum(m["seconds"] for m in res["methods"].values()) / nproc  # ranks compute side by side
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"images": n, "processes": nproc, "workers": workers, "wall_s": round(wall, 2),
            "images_per_s_end_to_end": round(n / wall, 2),
            "methods_compute_s": round(compute, 2), "images_per_s_methods_alone": round(n / compute, 2),
            "ratio_end_to_end_to_methods": round(compute / wall, 3), "peak_rss_mb": round(rss, 1),
            "bytes_written": out_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="phantoms (default 2000)")
    ap.add_argument("--no-workers0", action="store_true", help="skip the --workers 0 comparison run")
    ap.add_argument("--small", action="store_true", help="200 phantoms: a quick check")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes (0 or 1: skip torchrun)")
    ap.add_argument("--workers", type=int, default=2, help="--workers of explain")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="phantom side and model input (multiple of 32)")
    ap.add_argument("--label", default="", help="a note stored with the numbers (machine, load)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "scale_last_run.json")
    a = ap.parse_args()
    n = 200 if a.small else a.n
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from saliencylab.data.phantoms import PhantomConfig, generate
    from saliencylab.models import load_model
    from saliencylab.models._checkpoint import save_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        t = time.perf_counter()
        generate(PhantomConfig(n_covid=n // 2, n_normal=n - n // 2, size=a.size, seed=0), work / "data",
                 progress=False)
        gen_s = time.perf_counter() - t
        torch.manual_seed(0)
        clf = load_model("cxr_cnn", weights="random", channels=1, image_size=a.size)
        model = work / "cxr_cnn.pt"
        save_checkpoint(clf, model, arch="cxr_cnn", arch_kwargs={"channels": 1, "image_size": a.size})
        files = sorted(str(p) for p in (work / "data").rglob("images/*.png"))
        runs = {}
        runs[f"local_{n // 10}"] = _explain(files[: n // 10], model, work / "o1", nproc=1, workers=a.workers,
                                            batch=a.batch_size)
        runs[f"local_{n}"] = _explain(files, model, work / "o2", nproc=1, workers=a.workers,
                                      batch=a.batch_size)
        if not a.no_workers0:
            runs[f"local_{n}_workers0"] = _explain(files, model, work / "o3", nproc=1, workers=0,
                                                   batch=a.batch_size)
        if a.nproc > 1:
            runs[f"torchrun{a.nproc}_{n}"] = _explain(files, model, work / "o4", nproc=a.nproc,
                                                      workers=a.workers, batch=a.batch_size)
        report = {
            "label": a.label or "measured on a loaded shared machine",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
            "phantoms": n, "phantom_size": a.size, "phantom_generation_s": round(gen_s, 1),
            "methods": METHODS[1], "runs": runs,
        }
        a.json.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
