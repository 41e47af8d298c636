"""Does the CLI hold up on a busy machine? The same commands idle and under a fixed background load (busy-loop
processes), with our thread settings against torch's defaults (issue 10: at most 3x slower loaded than idle).

    PYTHONPATH=src python benchmarks/bench_load.py                                   # full: demo --quick, training
    PYTHONPATH=src python benchmarks/bench_load.py --size small --workloads train,explain   # a quick check

Configs (each runs the real `saliencylab` CLI in a fresh process; wall seconds, startup included):
  ours   the CLI as shipped: OMP_WAIT_POLICY=PASSIVE, threads from the available cores
  torch  the CLI with our thread settings switched off and OMP_* unset: torch's defaults
  one    `saliencylab --threads 1`
Workloads: demo (`demo --quick`), train (`train` on phantoms made once beforehand), explain (SmoothGrad on
one bundled photo). Prints one JSON object (also written to --json) with every run and the ratios
loaded/idle per config and workload, and ours/torch under load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # phantoms per class, phantom side, training epochs, training input side
    "small": {"n": 32, "side": 64, "epochs": 1, "image_size": 64},
    "full": {"n": 1000, "side": 256, "epochs": 2, "image_size": 128},
}
# the CLI with runtime.configure switched off: what a user got before issue 10 (torch's own defaults)
TORCH_DEFAULTS = ("import sys, saliencylab.runtime as r; r.configure = lambda flag=None: None; "
                  "sys.argv[0] = 'saliencylab'; from saliencylab.cli import main; main()")


def command(config: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run `saliencylab ARGS` under `config` (ours, torch or one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                            "SALIENCYLAB_THREADS", "MKL_NUM_THREADS")}
    if config == "torch":
        return [sys.executable, "-c", TORCH_DEFAULTS, *args], env
    flags = ["--threads", "1"] if config == "one" else []
    return [sys.executable, "-m", "saliencylab.cli", *flags, *args], env


def workload_args(name: str, data: Path, out: Path, size: dict[str, int]) -> list[str]:
    if name == "demo":
        return ["demo", "--quick", "--no-progress", "--out", str(out)]
    if name == "train":
        return ["train", "--data", str(data), "--out", str(out), "--epochs", str(size["epochs"]),
                "--image-size", str(size["image_size"]), "--no-progress"]
    if name == "explain":
        return ["explain", "sample:chelsea", "--methods", "smoothgrad", "--out", str(out), "--no-progress"]
    raise SystemExit(f"--workloads: unknown workload {name!r} (demo, train, explain)")


def timed(argv: list[str], env: dict[str, str], limit: float) -> dict[str, float | int | None]:
    """Wall seconds of one run (None when it did not finish within `limit`), with its exit status."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "rc": None}
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
    return {"seconds": round(time.perf_counter() - start, 2), "rc": proc.returncode}


class Load:
    """`n` busy-loop processes for the duration of a `with` block (killed by their own ids afterwards)."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> Load:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.5)  # let the scheduler see them
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="demo,train")
    ap.add_argument("--configs", default="ours,torch,one")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--load", type=int, default=2, help="busy-loop processes for the loaded runs")
    ap.add_argument("--limit", type=float, default=900.0, help="seconds before a run counts as not finished")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--label", default="", help="a note stored with the result (e.g. 'idle machine')")
    args = ap.parse_args()

    from saliencylab.data.phantoms import PhantomConfig, generate
    from saliencylab.runtime import available_cores, choose_threads

    size = SIZES[args.size]
    configs = args.configs.split(",")
    workloads = args.workloads.split(",")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        data = Path(tmp) / "phantoms"
        if "train" in workloads:
            generate(PhantomConfig(n_covid=size["n"], n_normal=size["n"], size=size["side"]), data, progress=False)
        for loaded in (False, True):
            for workload in workloads:
                for config in configs:
                    out = Path(tempfile.mkdtemp(dir=tmp))
                    argv, env = command(config, workload_args(workload, data, out / "run", size))
                    load_avg = os.getloadavg()[0]
                    if loaded:
                        with Load(args.load):
                            row = timed(argv, env, args.limit)
                    else:
                        row = timed(argv, env, args.limit)
                    runs.append({"workload": workload, "config": config, "loaded": loaded,
                                 "load_average_before": round(load_avg, 2), **row})
                    print(f"{workload:<8} {config:<6} {'loaded' if loaded else 'idle':<7} {row['seconds']} s "
                          f"(rc {row['rc']}, load average before {load_avg:.2f})", file=sys.stderr, flush=True)

    def secs(w: str, c: str, loaded: bool) -> float | None:
        return next((r["seconds"] for r in runs if (r["workload"], r["config"], r["loaded"]) == (w, c, loaded)),
                    None)

    ratios = {w: {c: {"loaded_over_idle": ratio(secs(w, c, True), secs(w, c, False))} for c in configs}
              for w in workloads}
    for w in workloads:
        ratios[w]["ours_over_torch_loaded"] = ratio(secs(w, "ours", True), secs(w, "torch", True))
    result = {"label": args.label, "size": args.size, "sizes": size, "busy_loops": args.load,
              "cpus": os.cpu_count(), "available_cores": available_cores(),
              "our_threads": choose_threads(None, {}).threads, "python": platform.python_version(),
              "command": " ".join(["python", "benchmarks/bench_load.py", *sys.argv[1:]]),
              "runs": runs, "ratios": ratios, "goal": "loaded at most 3x idle"}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
