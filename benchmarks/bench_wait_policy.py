"""Why the CLI sets OMP_WAIT_POLICY=PASSIVE: training steps of a small CNN in fresh processes with torch's
default OpenMP settings, with the passive wait policy, and with one thread, interleaved round by round.

    PYTHONPATH=src python benchmarks/bench_wait_policy.py [--rounds 3] [--steps 30] [--load 0]

On an idle machine the three should be close; on a busy one (other processes, or `--load N` busy loops) the
default spins on cores that other work holds. Prints images/s per setting and round, and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"torch defaults": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}

CHILD = """
import sys, time, torch, torch.nn as nn, torch.nn.functional as F
steps = int(sys.argv[1])
torch.manual_seed(0)
m = nn.Sequential(nn.Conv2d(1, 16, 5, 2, 2), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1))
opt = torch.optim.Adam(m.parameters())
x, y = torch.rand(32, 1, 64, 64), torch.rand(32)
def step():
    loss = F.binary_cross_entropy_with_logits(m(x)[:, 0], y)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
print(steps * 32 / (time.perf_counter() - t), torch.get_num_threads())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes to run meanwhile")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    try:
        time.sleep(0.5 if busy else 0)
        for r in range(args.rounds):
            for name, env in SETTINGS.items():
                load = os.getloadavg()[0]
                out = subprocess.run([sys.executable, "-c", CHILD, str(args.steps)], env=base | env,
                                     capture_output=True, text=True, check=True, timeout=600).stdout.split()
                rates[name].append(round(float(out[0]), 1))
                print(f"round {r}: {name:<24} {float(out[0]):8.1f} images/s ({out[1]} threads, load average "
                      f"{load:.2f})", file=sys.stderr, flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(json.dumps({"steps": args.steps, "busy_loops": args.load, "cpus": os.cpu_count(), "images_per_second": rates,
                      "median": {k: statistics.median(v) for k, v in rates.items()}}, indent=1))


if __name__ == "__main__":
    main()
