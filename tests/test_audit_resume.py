"""Large audits: cut into shards on disk, so that the shard size, a SIGKILL at a random point (then resumed,
with another number of processes) and torchrun change nothing in audit.json but its timings."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from saliencylab.cli import app

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")
N = 24
# every check that applies to phantoms runs: localisation, flags, stability, faithfulness, sanity, probes
JOB = ["--sample", str(N), "--methods", "vanilla,gradcam", "--sanity-images", "3", "--faithfulness-images", "5",
       "--batch-size", "4", "--no-progress", "--device", "cpu"]


def _model(path: Path) -> Path:
    from saliencylab.models import load_model
    from saliencylab.models._checkpoint import save_checkpoint

    torch.manual_seed(0)
    clf = load_model("cxr_cnn", weights="random", channels=1, image_size=32)
    save_checkpoint(clf, path, arch="cxr_cnn", arch_kwargs={"channels": 1, "image_size": 32})
    return path


def _invoke(*args: str):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses below (OMP_NUM_THREADS=1): the same floating-point sums
    try:
        return runner.invoke(app, list(args), catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def job(cxr_data, tmp_path_factory):
    """The model, and one uninterrupted single-process audit in one shard to compare against."""
    root = tmp_path_factory.mktemp("audit_resume")
    model = _model(root / "model.pt")
    args = ["audit", "--model", str(model), "--data", str(cxr_data), *JOB]
    _run(*args, "--out", str(root / "ref"))
    return {"root": root, "args": args, "ref": root / "ref"}


def _run(*args: str) -> subprocess.CompletedProcess:
    """`saliencylab ARGS` in a fresh process, as the killed and torchrun runs (the same libraries' threads)."""
    res = subprocess.run([sys.executable, "-m", "saliencylab.cli", *args], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _summary(out: Path) -> dict:
    """audit.json without what may differ between equal audits: timings and how the work was cut."""
    a = json.loads((out / "audit.json").read_text())
    return {k: v for k, v in a.items() if k not in ("seconds", "shards")}


def assert_same_audit(got: Path, ref: Path) -> None:
    assert _summary(got) == _summary(ref)
    for name in ("audit_images.csv", "flagged.csv", "unreadable.json"):
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name
    leftovers = [p.name for p in got.rglob("*") if ".tmp-" in p.name]
    assert not leftovers


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "saliencylab.cli"]


def test_the_shard_size_changes_nothing_and_a_rerun_reuses_every_shard(job):
    out = job["root"] / "small_shards"
    _run(*job["args"], "--out", str(out), "--shard-size", "4")
    assert_same_audit(out, job["ref"])
    a = json.loads((out / "audit.json").read_text())
    assert a["shards"] == {"count": N // 4, "images_per_shard": 4, "reused": 0}
    assert a["images"] == N and a["checks"][:3] == ["lungs", "border", "lesions"]
    assert a["probes"]["marker_swap"]["images"] == N  # the probes ran on every shard, not the first only
    assert a["methods"]["vanilla"]["sanity"] is not None and a["methods"]["vanilla"]["faithfulness_images"] == 5
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    res = _invoke(*job["args"], "--out", str(out), "--shard-size", "4", "--resume")
    assert res.exit_code == 0 and f"resumed: {N // 4} of {N // 4} shards" in res.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before  # nothing rewritten
    assert_same_audit(out, job["ref"])


def test_sigkill_at_a_random_point_then_resume_under_torchrun_gives_the_uninterrupted_audit(job):
    out = job["root"] / "killed"
    cmd = [*job["args"], "--out", str(out), "--shard-size", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "saliencylab.cli", *cmd], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at = random.Random(int.from_bytes(os.urandom(2), "little")).randrange(1, N // 4)
    deadline = time.monotonic() + 120
    while len(list((out / "shards").glob("shard-*.json"))) < at:
        assert proc.poll() is None, "the audit ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "audit.json").exists()
    done = len(list((out / "shards").glob("shard-*.json")))
    assert at <= done < N // 4
    # resumed with two processes (gloo over loopback): rank 1 takes shards 1, 3, 5; finished ones are kept
    res = subprocess.run([*_torchrun(2), *cmd], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed: {done} of {N // 4} shards" in res.stdout and res.stdout.count("wrote ") == 1
    assert_same_audit(out, job["ref"])


def test_two_torchrun_nodes_with_c10d_rendezvous_write_the_single_process_files(job):
    """README's two-node command, as two launchers on this machine: c10d rendezvous, every address loopback."""
    out = job["root"] / "two_nodes"
    port = _free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "audit-test",
            "--local-addr", "127.0.0.1", "-m", "saliencylab.cli", *job["args"], "--out", str(out),
            "--shard-size", "8"]
    env = {**_env(), "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in outs]
    assert sum(o.count("auditing ") for o, _ in outs) == 1  # rank 0 speaks for the job
    assert_same_audit(out, job["ref"])


def test_a_changed_image_recomputes_its_shard_only(job, cxr_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cxr_data, data)
    out = tmp_path / "out"
    args = ["audit", "--model", str(job["root"] / "model.pt"), "--data", str(data), *JOB, "--shard-size", "4",
            "--out", str(out)]
    args[args.index(str(N))] = "8"  # two shards
    _run(*args)
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.json")}
    rows = [json.loads(p.read_text())["rows"]["__images__"] for p in sorted((out / "shards").glob("*.json"))]
    victim = rows[1][0]["file"]  # an image of shard 1
    img = np.asarray(Image.open(data / victim))
    Image.fromarray(255 - img).save(data / victim)
    assert "resumed: 1 of 2 shards" in _run(*args).stdout
    after = {p.name: p.read_bytes() for p in (out / "shards").glob("*.json")}
    assert [n for n in sorted(before) if before[n] != after[n]] == ["shard-00001.json"]
    # fewer images: one shard left, the files of the others removed
    _run(*[a if a != "8" else "4" for a in args])
    assert {p.name.split(".")[0] for p in (out / "shards").iterdir()} == {"shard-00000"}


def test_resume_without_shards_and_an_unreadable_dataset_leave_nothing_behind(job, tmp_path):
    out = tmp_path / "new"
    res = _invoke(*job["args"], "--out", str(out), "--resume")
    assert res.exit_code == 2 and "--resume" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()
    bad = tmp_path / "bad"
    for cls in ("COVID", "Normal"):
        (bad / cls).mkdir(parents=True)
        for i in range(2):
            (bad / cls / f"x{i}.png").write_bytes(b"not a png")
    args = ["audit", "--model", str(job["root"] / "model.pt"), "--data", str(bad), "--methods", "vanilla",
            "--no-progress", "--out", str(out)]
    res = _invoke(*args)
    assert res.exit_code == 2 and "no readable image" in res.stderr and "(4 unreadable)" in res.stderr
    assert not out.exists()
