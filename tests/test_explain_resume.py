"""Large `explain` runs: killed at a random point (also one torchrun rank) and resumed, they end with exactly
the files of an uninterrupted run; stale folders are refused; maps are stored small; workers change nothing."""

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
N_IMAGES = 240
METHODS = ["--methods", "vanilla,gradcam,integrated_gradients", "--set", "integrated_gradients.n_steps=2"]
JOB = ["--shard-size", "16", "--batch-size", "8", "--no-progress"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _model(path: Path, seed: int = 0) -> Path:
    from saliencylab.models import load_model
    from saliencylab.models._checkpoint import save_checkpoint

    torch.manual_seed(seed)
    clf = load_model("cxr_cnn", weights="random", channels=1, image_size=32)
    save_checkpoint(clf, path, arch="cxr_cnn", arch_kwargs={"channels": 1, "image_size": 32})
    return path


def _phantoms(folder: Path, n: int, seed: int = 0) -> Path:
    """n small grey 'radiographs': two dark lung fields, a bright spot, noise (24-40 px, varying shapes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = rng.integers(24, 41, 2)
        yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
        img = 0.7 - 0.4 * (np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) * 20) + np.exp(-((xx - 0.7) ** 2 + (yy - 0.5)
                                                                                         ** 2) * 20))
        img += 0.5 * np.exp(-((xx - rng.random()) ** 2 + (yy - rng.random()) ** 2) * 200) + 0.05 * rng.random((h, w))
        Image.fromarray((255 * np.clip(img, 0, 1)).astype(np.uint8)).save(folder / f"img{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The phantoms, the model, and one uninterrupted run to compare against."""
    root = tmp_path_factory.mktemp("stream")
    data, model = _phantoms(root / "data", N_IMAGES), _model(root / "model.pt")
    ref = root / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses below run with OMP_NUM_THREADS=1 (torchrun's default) too
    try:
        res = runner.invoke(app, ["explain", str(data), "--model", str(model), *METHODS, *JOB, "--out", str(ref),
                                  "--workers", "0"], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    return {"root": root, "data": data, "model": model, "ref": ref}


def _invoke(*args: str):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return runner.invoke(app, list(args), catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def assert_same_files(got: Path, ref: Path) -> None:
    """The same files; byte-identical maps and overlays; manifest rows equal but for their timings."""
    a, b = _files(got), _files(ref)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    for rel, p in a.items():
        if rel.endswith((".npy", ".png")) and rel != "figure.png":
            assert p.read_bytes() == b[rel].read_bytes(), rel
        elif rel.startswith("manifest/"):
            assert _rows(p) == _rows(b[rel]), rel


def assert_same_run(got: Path, ref: Path) -> None:
    """`assert_same_files`, and the same images and summary in results.json (all of the job's images)."""
    assert_same_files(got, ref)
    ra, rb = (json.loads((f / "results.json").read_text()) for f in (got, ref))
    assert ra["images"] == rb["images"] and ra["summary"] == rb["summary"]
    assert len(ra["images"]) == N_IMAGES


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}


def _rows_written(out: Path) -> int:
    n = 0
    for p in (out / "manifest").glob("shard-*.jsonl"):
        try:
            n += len(p.read_bytes().splitlines())
        except FileNotFoundError:  # replaced while we looked
            pass
    return n


def _kill_when(proc: subprocess.Popen, out: Path, rows: int, pid_of=lambda p: p.pid, shards=()) -> None:
    deadline = time.monotonic() + 120
    while _rows_written(out) < rows or not all((out / "manifest" / f"shard-{s:05d}.jsonl").is_file() for s in shards):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(pid_of(proc), signal.SIGKILL)
    proc.wait(timeout=60)


def test_sigkill_at_a_random_point_then_resume_gives_the_uninterrupted_run(job):
    out = job["root"] / "killed"
    seed = int.from_bytes(os.urandom(2), "little")
    at = random.Random(seed).randrange(1, N_IMAGES * 3 - 48)
    cmd = [sys.executable, "-m", "saliencylab.cli", "explain", str(job["data"]), "--model", str(job["model"]),
           *METHODS, *JOB, "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, out, at)
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}"
    res = _invoke(*cmd[3:])
    assert res.exit_code == 0, res.output
    assert "kept from the earlier run" in res.output
    assert_same_run(out, job["ref"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (a child of the launcher)."""
    for _ in range(500):
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            with open(f"/proc/{child}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return int(child)
        time.sleep(0.02)
    raise AssertionError(f"no rank {rank} under {parent}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's process through /proc")
def test_torchrun_rank_killed_then_resumed_with_one_process(job):
    out = job["root"] / "torchrun"
    cmd = ["explain", str(job["data"]), "--model", str(job["model"]), *METHODS, *JOB, "--out", str(out),
           "--workers", "1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "saliencylab.cli"]
    proc = subprocess.Popen([*launcher, *cmd], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at = random.Random(int.from_bytes(os.urandom(2), "little")).randrange(6, N_IMAGES)
    _kill_when(proc, out, at, pid_of=lambda p: _rank_pid(p.pid, 1), shards=(0, 1))
    assert proc.returncode != 0
    shards = {p.name for p in (out / "manifest").glob("*.jsonl")}
    assert {"shard-00000.jsonl", "shard-00001.jsonl"} <= shards  # both ranks wrote their own shards
    res = _invoke(*cmd)
    assert res.exit_code == 0, res.output
    assert_same_run(out, job["ref"])


def test_changed_option_recomputes_only_that_method(job, tmp_path):
    data = _phantoms(tmp_path / "data", 12)
    out = tmp_path / "out"
    base = ["explain", str(data), "--model", str(job["model"]), *JOB, "--out", str(out), "--methods",
            "vanilla,integrated_gradients"]
    assert _invoke(*base, "--set", "integrated_gradients.n_steps=2").exit_code == 0
    before = {rel: (p.stat().st_mtime_ns, p.read_bytes()) for rel, p in _files(out).items()}
    res = _invoke(*base, "--set", "integrated_gradients.n_steps=3")
    assert res.exit_code == 0 and "resumed: 12 maps written, 12 kept" in res.output
    after = _files(out)
    for rel, (mtime, data_) in before.items():
        if "/vanilla." in rel:
            assert after[rel].stat().st_mtime_ns == mtime  # not rewritten
        elif rel.endswith("integrated_gradients.npy"):
            assert after[rel].read_bytes() != data_
    # a changed input recomputes that image only
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(data / "img0003.png")
    res = _invoke(*base, "--set", "integrated_gradients.n_steps=3")
    assert "resumed: 2 maps written, 22 kept" in res.output
    # dropping a method and an image removes their files: the folder holds exactly this run
    (data / "img0005.png").unlink()
    assert _invoke(*base[:-1], "vanilla").exit_code == 0
    names = {rel for rel in _files(out)}
    assert not any("integrated_gradients" in n or n.startswith("img0005/") for n in names)
    assert len(json.loads((out / "results.json").read_text())["images"]) == 11


def test_folder_of_another_job_is_refused_unless_force(job, tmp_path):
    data = _phantoms(tmp_path / "data", 3)
    out = tmp_path / "out"
    other = _model(tmp_path / "other.pt", seed=1)
    args = ["explain", str(data), *JOB, "--out", str(out), "--methods", "vanilla"]
    assert _invoke(*args, "--model", str(job["model"])).exit_code == 0
    res = _invoke(*args, "--model", str(other))
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "--force" in lines[0] and "another model" in lines[0]
    (out / "stray.txt").write_text("from before")
    res = _invoke(*args, "--model", str(other), "--force")
    assert res.exit_code == 0
    assert not (out / "stray.txt").exists()
    assert json.loads((out / "job.json").read_text())["model_args"]["model"] == str(other)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text("{}")
    res = _invoke(*args[:-5], "--out", str(foreign), "--model", str(other), "--methods", "vanilla")
    assert res.exit_code == 2 and "earlier explain run" in res.stderr and "--force" in res.stderr
    res = _invoke(*args, "--model", str(other), "--resume", "--out", str(tmp_path / "new"))
    assert res.exit_code == 2 and "--resume" in res.stderr


def test_output_sizes_maps_at_model_resolution_and_small_overlays(job, tmp_path):
    from saliencylab.ops import resize
    from saliencylab.studies.streaming import load_map

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (900, 1200), np.uint8)).save(tmp_path / "big.png")
    out = tmp_path / "out"
    res = _invoke("explain", str(tmp_path / "big.png"), "--model", str(job["model"]), "--methods",
                  "vanilla,gradcam", "--out", str(out), "--map-dtype", "float16", "--no-progress")
    assert res.exit_code == 0, res.output
    raw = np.load(out / "big" / "vanilla.npy")
    assert raw.dtype == np.float16 and raw.shape == (32, 32)
    assert (out / "big" / "vanilla.npy").stat().st_size == 128 + 32 * 32 * 2
    assert Image.open(out / "big" / "gradcam.png").size == (512, 384)  # long side capped, aspect kept
    assert not [p for p in _files(out) if p.endswith(("image.png", "big.png"))]  # the input is not copied
    full = load_map(out / "big", "vanilla")
    expected = resize(torch.from_numpy(raw.astype(np.float32))[None, None], (900, 1200))[0, 0].numpy()
    assert full.shape == (900, 1200) and full.dtype == np.float32
    np.testing.assert_array_equal(full, expected)
    np.testing.assert_array_equal(load_map(out, "vanilla", image="big"), expected)


def test_workers_give_the_same_files_as_the_main_thread(job, tmp_path):
    data = _phantoms(tmp_path / "data", 20, seed=3)
    outs = []
    for workers in ("0", "3"):
        out = tmp_path / f"w{workers}"
        res = _invoke("explain", str(data), "--model", str(job["model"]), *METHODS, "--shard-size", "8",
                      "--batch-size", "3", "--no-progress", "--out", str(out), "--workers", workers)
        assert res.exit_code == 0, res.output
        outs.append(out)
    a, b = (_files(o) for o in outs)
    assert sorted(a) == sorted(b)
    for rel, p in a.items():
        if rel.endswith((".npy", ".png")):
            assert p.read_bytes() == b[rel].read_bytes(), rel
        elif rel.startswith("manifest/"):
            assert _rows(p) == _rows(b[rel])


def test_grid_notice_and_summary_from_all_rows(job):
    res = json.loads((job["ref"] / "results.json").read_text())
    assert res["summary"]["images"] == N_IMAGES and res["summary"]["grid_images"] == 8
    assert sum(res["summary"]["targets"].values()) == N_IMAGES
    assert res["job"]["shards"] == N_IMAGES // 16
    rows = [r for p in sorted((job["ref"] / "manifest").glob("*.jsonl")) for r in _rows(p)]
    assert len(rows) == 3 * N_IMAGES
    ig = [abs(r["ig_completeness_error"]) for r in rows if r["method"] == "integrated_gradients"]
    assert res["summary"]["ig_abs_completeness_error_mean"] == pytest.approx(np.mean(ig), rel=1e-12)


def test_hdf5_store_matches_the_npy_maps(job, tmp_path):
    pytest.importorskip("h5py")
    from saliencylab.studies.streaming import load_map

    data = _phantoms(tmp_path / "data", 10, seed=5)
    out = tmp_path / "h5"
    res = _invoke("explain", str(data), "--model", str(job["model"]), *METHODS, *JOB, "--out", str(out),
                  "--outputs", "hdf5")
    assert res.exit_code == 0, res.output
    ref = tmp_path / "npy"
    assert _invoke("explain", str(data), "--model", str(job["model"]), *METHODS, *JOB, "--out", str(ref),
                   "--outputs", "npy").exit_code == 0
    assert sorted(_files(out)) == ["figure.png", "job.json", "manifest/shard-00000.jsonl", "maps/shard-00000.h5",
                                   "results.json"]
    for i in range(10):
        for m in ("vanilla", "gradcam", "integrated_gradients"):
            np.testing.assert_array_equal(load_map(out, m, image=f"img{i:04d}"), load_map(ref / f"img{i:04d}", m))


def test_hdf5_without_h5py_names_the_extra(job, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    res = _invoke("explain", "sample:coffee", "--model", str(job["model"]), "--out", str(tmp_path / "o"),
                  "--outputs", "hdf5")
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "pip install saliencylab[hdf5]" in lines[0]
    assert not (tmp_path / "o").exists()
