"""A bounded loopback load test of `saliencylab serve` on the embedded EfficientNet-Lite0.

It starts the server in a subprocess on 127.0.0.1, sends a fixed number of requests at a fixed
concurrency for Grad-CAM and for SmoothGrad, then fills the model queue and checks that an over-limit
upload and a request beyond the queue are refused quickly while /api/health and a normal request keep
being served. It stops by itself and prints one table (and writes it as JSON).

    python benchmarks/bench_serve.py                          # 24 Grad-CAM at 3, 8 SmoothGrad at 2, queue 2
    python benchmarks/bench_serve.py --gradcam 48 --smoothgrad 16 --concurrency 3 --json serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_png() -> bytes:
    from saliencylab.data.images import load_image
    from saliencylab.render.maps import to_uint8
    from saliencylab.web.core import png_bytes

    return png_bytes(to_uint8(load_image("sample:chelsea").pixels))


def start_server(port: int, queue: int, max_upload_mb: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "saliencylab.cli", "serve", "--port", str(port), "--queue", str(queue),
           "--max-upload-mb", str(max_upload_mb), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; run `{' '.join(cmd)}` to see why")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not come up within 180 s")


def explain(client: httpx.Client, base: str, image: bytes, fields: dict[str, Any]) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = client.post(f"{base}/api/explain", files={"image": ("chelsea.png", image, "image/png")}, data=fields,
                    timeout=600)
    return r.status_code, time.perf_counter() - t0


def load(base: str, image: bytes, fields: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    """n requests, `concurrency` at a time; latency percentiles and requests per second."""
    with httpx.Client() as client, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda _: explain(client, base, image, fields), range(n)))
        wall = time.perf_counter() - t0
    lat = sorted(s for code, s in results if code == 200)
    codes: dict[str, int] = {}
    for code, _ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [lat[0]] * 19
    return {"requests": n, "concurrency": concurrency, "status": codes, "seconds": round(wall, 2),
            "requests_per_second": round(len(lat) / wall, 3), "p50_s": round(statistics.median(lat), 3),
            "p95_s": round(q[18], 3)}


def refusals(base: str, image: bytes, queue: int, max_upload_mb: float) -> dict[str, Any]:
    """Fill the model (1 running + `queue` waiting), then time the refusals and the requests still served."""
    slow = {"methods": "smoothgrad", "set": "smoothgrad.n_samples=64"}
    out: dict[str, Any] = {}
    with httpx.Client() as client:
        fillers = [threading.Thread(target=explain, args=(client, base, image, slow)) for _ in range(1 + queue)]
        for t in fillers:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = client.get(f"{base}/api/health").json()["queue"]
            if state["running"] == 1 and state["waiting"] == queue:
                break
            time.sleep(0.05)
        out["queue_while_full"] = state
        busy = [explain(client, base, image, {"methods": "gradcam"}) for _ in range(5)]
        out["beyond_queue"] = {"status": sorted({c for c, _ in busy}), "max_s": round(max(s for _, s in busy), 4)}
        big = b"\0" * int((max_upload_mb + 1) * 1024 * 1024)
        t0 = time.perf_counter()
        r = client.post(f"{base}/api/explain", files={"image": ("big.png", big, "image/png")}, timeout=60)
        out["over_limit"] = {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 4),
                             "bytes": len(big)}

        def chunks():
            for _ in range(int(max_upload_mb) + 2):
                yield b"\0" * (1024 * 1024)

        t0 = time.perf_counter()
        try:
            r = client.post(f"{base}/api/explain", content=chunks(), timeout=60,
                            headers={"content-type": "multipart/form-data; boundary=x"})
            status: int | str = r.status_code
        except httpx.HTTPError as err:  # the server may close while the client is still sending
            status = f"connection closed ({type(err).__name__})"
        out["over_limit_chunked"] = {"status": status, "seconds": round(time.perf_counter() - t0, 4)}
        t0 = time.perf_counter()
        health = client.get(f"{base}/api/health")
        out["health_while_full"] = {"status": health.status_code, "seconds": round(time.perf_counter() - t0, 4)}
        for t in fillers:
            t.join()
        code, secs = explain(client, base, image, {"methods": "gradcam"})
        out["after"] = {"status": code, "seconds": round(secs, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gradcam", type=int, default=24, help="Grad-CAM requests")
    ap.add_argument("--smoothgrad", type=int, default=8, help="SmoothGrad requests (n_samples 16, its default)")
    ap.add_argument("--concurrency", type=int, default=3, help="clients at a time (at most 1 + --queue)")
    ap.add_argument("--queue", type=int, default=2, help="the server's --queue")
    ap.add_argument("--max-upload-mb", type=float, default=5.0)
    ap.add_argument("--json", default=str(Path(__file__).with_name("serve_last_run.json")))
    args = ap.parse_args()
    if args.concurrency > 1 + args.queue:
        raise SystemExit("--concurrency above 1 + --queue would measure refusals, not throughput")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    image = sample_png()
    t0 = time.perf_counter()
    proc = start_server(port, args.queue, args.max_upload_mb)
    startup = time.perf_counter() - t0
    try:
        explain(httpx.Client(), base, image, {"methods": "gradcam,smoothgrad"})  # warm up
        result = {
            "machine": {"cpus": os.cpu_count(), "torch_threads": _torch_threads(), "load_average": os.getloadavg()},
            "startup_s": round(startup, 2), "image": "sample:chelsea (451x300 PNG)", "model": "efficientnet_lite0",
            "gradcam": load(base, image, {"methods": "gradcam"}, args.gradcam, args.concurrency),
            "smoothgrad": load(base, image, {"methods": "smoothgrad"}, args.smoothgrad, min(2, args.concurrency)),
            "refusals": refusals(base, image, args.queue, args.max_upload_mb),
        }
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{'method':<12} {'requests':>8} {'conc.':>5} {'req/s':>7} {'p50 s':>7} {'p95 s':>7}  status")
    for name in ("gradcam", "smoothgrad"):
        r = result[name]
        print(f"{name:<12} {r['requests']:>8} {r['concurrency']:>5} {r['requests_per_second']:>7.2f} "
              f"{r['p50_s']:>7.3f} {r['p95_s']:>7.3f}  {r['status']}")
    ref = result["refusals"]
    print(f"queue full ({ref['queue_while_full']}): beyond the queue {ref['beyond_queue']['status']} in at most "
          f"{ref['beyond_queue']['max_s']} s; over-limit upload {ref['over_limit']['status']} in "
          f"{ref['over_limit']['seconds']} s (chunked: {ref['over_limit_chunked']['status']} in "
          f"{ref['over_limit_chunked']['seconds']} s); health {ref['health_while_full']['status']} in "
          f"{ref['health_while_full']['seconds']} s; afterwards {ref['after']['status']} in "
          f"{ref['after']['seconds']} s")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
