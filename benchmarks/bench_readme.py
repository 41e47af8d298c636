"""Reproduce every timing figure the README states, on this machine, and write them to
benchmarks/results/readme_last_run.json (the README quotes that file's last run, with where it ran).

    PYTHONPATH=src python benchmarks/bench_readme.py                    # demo, demo --quick, phantoms, methods
    PYTHONPATH=src python benchmarks/bench_readme.py --pip              # also `pip install -e .` in a fresh venv
    PYTHONPATH=src python benchmarks/bench_readme.py --figures phantoms --phantoms-n 40   # a quick check

Figures (each runs the real command in a fresh process; wall seconds include startup):
  demo      `saliencylab demo` into an empty folder            README: "about 5 minutes on 2 cores"
  quick     `saliencylab demo --quick` into an empty folder    README: "about a minute"
  phantoms  `saliencylab phantoms` at 256 px, 2 workers: images/s as the command reports it
  methods   `benchmarks/bench_methods.py --rounds 5`: the per-method seconds table of the Speed section
  pip       `pip install -e .` in a fresh venv (--pip): seconds, the venv's size, and how much of it is
            CUDA libraries (nvidia/*); uses whatever index pip is configured with
Run it on an idle machine (the load average is recorded before and after each figure).
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "readme_last_run.json"
README_SAYS = {"demo": "about 5 minutes on 2 cores", "quick": "about a minute",
               "phantoms": "about 86 images/s on 2 processes at 256 px", "methods": "the Speed section's table",
               "pip": "about 75 s (torch 2.14.1 and torchvision 0.29.1 from local files)"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "saliencylab.cli", *args]


def run(argv: list[str], *, env: dict[str, str] | None = None, limit: float = 3600.0) -> dict[str, Any]:
    """Run `argv`; wall seconds, exit status and the load average before and after."""
    before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=limit)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"seconds": round(seconds, 2), "load_average_before": round(before, 2),
            "load_average_after": round(os.getloadavg()[0], 2), "stdout": proc.stdout}


def demo(tmp: Path, quick: bool) -> dict[str, Any]:
    args = ["demo", "--no-progress", "--out", str(tmp / ("quick" if quick else "demo"))]
    r = run(cli(*args, *(["--quick"] if quick else [])))
    return {"value": r.pop("seconds"), "unit": "s", "command": "saliencylab " + " ".join(
        [*args[:1], *(["--quick"] if quick else [])]), **{k: v for k, v in r.items() if k != "stdout"}}


def phantoms(tmp: Path, n: int) -> dict[str, Any]:
    out = tmp / "phantoms"
    args = ["phantoms", str(out), "--n-covid", str(n // 2), "--n-normal", str(n - n // 2), "--size", "256",
            "--workers", "2"]
    r = run(cli(*args))
    summary = json.loads((out / "phantoms.json").read_text())
    return {"value": summary["images_per_second"], "unit": "images/s", "images": summary["images"],
            "generation_seconds": summary["seconds"], "wall_seconds": r["seconds"],
            "command": "saliencylab " + " ".join(args).replace(str(out), "OUT"),
            "load_average_before": r["load_average_before"], "load_average_after": r["load_average_after"]}


def methods(tmp: Path, rounds: int) -> dict[str, Any]:
    path = tmp / "methods.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_methods.py"), "--rounds", str(rounds), "--json",
            str(path)]
    r = run(argv)
    table = json.loads(path.read_text())
    rows = {f"{row['method']} / {row['implementation']}": round(row["seconds"], 3) for row in table["rows"]}
    return {"value": rows, "unit": "s per call (median of rounds)", "raw": table,
            "command": f"python benchmarks/bench_methods.py --rounds {rounds}",
            "load_average_before": r["load_average_before"], "load_average_after": r["load_average_after"]}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def pip_install(tmp: Path) -> dict[str, Any]:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = run([str(venv / "bin" / "pip"), "install", "--no-cache-dir", "-e", str(ROOT)], env=env)
    site = next((venv / "lib").glob("python*/site-packages"))
    nvidia = site / "nvidia"
    torch_version = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, env=env).stdout.strip()
    return {"value": r["seconds"], "unit": "s", "venv_bytes": du(venv),
            "nvidia_bytes": du(nvidia) if nvidia.is_dir() else 0, "torch": torch_version,
            "command": "python3 -m venv .venv && .venv/bin/pip install --no-cache-dir -e .",
            "load_average_before": r["load_average_before"], "load_average_after": r["load_average_after"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--figures", default="demo,quick,phantoms,methods")
    ap.add_argument("--pip", action="store_true", help="also time `pip install -e .` in a fresh venv")
    ap.add_argument("--phantoms-n", type=int, default=2000, help="phantoms to draw for the images/s figure")
    ap.add_argument("--rounds", type=int, default=5, help="bench_methods.py rounds")
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--label", default="", help="where this ran, e.g. 'idle 2-core CPU machine'")
    args = ap.parse_args()

    import torch

    figures = [f for f in args.figures.split(",") if f] + (["pip"] if args.pip else [])
    unknown = set(figures) - set(README_SAYS)
    if unknown:
        raise SystemExit(f"--figures: unknown {', '.join(sorted(unknown))} (choose from {', '.join(README_SAYS)})")
    result: dict[str, Any] = {
        "label": args.label, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "command": " ".join(["python", "benchmarks/bench_readme.py", *sys.argv[1:]]), "figures": {}}
    with tempfile.TemporaryDirectory(prefix="bench_readme_") as tmp_name:
        tmp = Path(tmp_name)
        for name in figures:
            print(f"{name} ...", file=sys.stderr, flush=True)
            fig = {"demo": lambda: demo(tmp, False), "quick": lambda: demo(tmp, True),
                   "phantoms": lambda: phantoms(tmp, args.phantoms_n), "methods": lambda: methods(tmp, args.rounds),
                   "pip": lambda: pip_install(tmp)}[name]()
            result["figures"][name] = {"readme_says": README_SAYS[name], **fig}
            shown = fig["value"] if not isinstance(fig["value"], dict) else "(table)"
            print(f"{name}: {shown} {fig['unit']}", file=sys.stderr, flush=True)
    text = json.dumps(result, indent=1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    print(json.dumps({k: (v if k != "figures" else {n: {kk: vv for kk, vv in f.items() if kk != "raw"}
                                                     for n, f in v.items()}) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
