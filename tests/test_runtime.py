"""CPU threads on a busy machine (issue 10) and Ctrl-C (issue 14): the core count from affinity and cgroup
files, the thread precedence, the CLI's settings before torch loads, single-threaded workers, and one line
with status 130 on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from multiprocessing import get_context
from pathlib import Path

import pytest

from saliencylab import runtime
from saliencylab.errors import UserError
from saliencylab.runtime import available_cores, cgroup_cpu_limit, choose_threads, threads_for

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "proc", "expected"), [
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5),
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),
    ({"cpu.max": "max 100000\n", "job/a/cpu.max": "50000 100000\n"}, "0::/job/a\n", 0.5),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu:/\n", 3.0),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, "", None),
    ({"cpu.max": "400000 100000", "cpu/cpu.cfs_quota_us": "250000", "cpu/cpu.cfs_period_us": "100000"}, "", 2.5),
    ({}, "", None),
])
def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path, files, proc, expected):
    assert cgroup_cpu_limit(_cgroup(tmp_path, files), proc) == expected


def test_available_cores_is_the_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5, 6}, raising=False)
    assert available_cores(quota=0) == 4.0  # 0: no quota lookup
    assert available_cores(quota=1.5) == 1.5
    assert available_cores(quota=16.0) == 4.0
    root = _cgroup(tmp_path, {"cpu.max": "200000 100000"})
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: cgroup_cpu_limit(root, "0::/\n"))
    assert available_cores() == 2.0
    assert [threads_for(c) for c in (0.5, 1.0, 1.5, 2.0, 3.99)] == [1, 1, 1, 2, 3]


@pytest.mark.parametrize(("flag", "env", "expected"), [
    (3, {"SALIENCYLAB_THREADS": "2", "OMP_NUM_THREADS": "4"}, (3, "flag")),
    (None, {"SALIENCYLAB_THREADS": "2", "OMP_NUM_THREADS": "4"}, (2, "SALIENCYLAB_THREADS")),
    (None, {"OMP_NUM_THREADS": "4,2"}, (4, "OMP_NUM_THREADS")),
    (None, {"SALIENCYLAB_THREADS": " ", "OMP_NUM_THREADS": ""}, (6, "cores")),
    (None, {}, (6, "cores")),
])
def test_thread_precedence_is_flag_then_environment_then_cores(flag, env, expected):
    choice = choose_threads(flag, env, cores=6.0)
    assert (choice.threads, choice.source) == expected


@pytest.mark.parametrize(("flag", "env", "names"), [
    (0, {}, "--threads"),
    (None, {"SALIENCYLAB_THREADS": "two"}, "SALIENCYLAB_THREADS"),
    (None, {"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS"),
])
def test_a_bad_thread_count_is_a_user_error_naming_its_source(flag, env, names):
    with pytest.raises(UserError, match=names):
        choose_threads(flag, env, cores=2.0)


_PROBE = textwrap.dedent("""
    import importlib.abc, json, os, sys

    seen = {}

    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in ("torch", "numpy") and name not in seen:  # both read the thread variables as they load
                seen[name] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            return None

    sys.meta_path.insert(0, Watch())
    sys.argv = ["saliencylab", *sys.argv[1:]]
    from saliencylab.cli import main
    try:
        main()
    except SystemExit:
        pass
    import torch
    sys.stderr.write(json.dumps({"at_import": seen, "threads": torch.get_num_threads()}) + "\\n")
""")


def _probe(args: list[str], env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                             "SALIENCYLAB_THREADS")}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], env=base | {"PYTHONPATH": SRC} | env,
                          capture_output=True, text=True, timeout=120)
    import json

    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_the_cli_sets_the_wait_policy_and_threads_before_torch_loads():
    """numpy's OpenBLAS and torch's OpenMP read OMP_* when they load: the CLI must not load either before its
    callback has set them (importing saliencylab.cli loads neither)."""
    got = _probe(["--threads", "3", "methods"], {"SALIENCYLAB_THREADS": "1"})
    want = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    assert got == {"at_import": {"numpy": want, "torch": want}, "threads": 3}
    got = _probe(["methods"], {"SALIENCYLAB_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"})
    want = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    assert got == {"at_import": {"numpy": want, "torch": want}, "threads": 1}


def _worker_state(_: int) -> tuple[int, bool, str | None]:
    import torch

    return torch.get_num_threads(), signal.getsignal(signal.SIGINT) == signal.SIG_IGN, os.environ.get(
        "OMP_NUM_THREADS")


def test_pool_workers_run_one_thread_and_leave_ctrl_c_to_the_parent():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with get_context("fork").Pool(1, initializer=runtime.worker_init) as pool:
            assert pool.map(_worker_state, [0]) == [(1, True, "1")]
    finally:
        torch.set_num_threads(before)


def _interrupt_when(cmd: list[str], ready, limit: float = 90.0) -> subprocess.CompletedProcess:
    """Start the CLI in its own process group, wait (bounded) until `ready()`, then SIGINT the whole group
    the way a terminal's Ctrl-C does; return its exit status and output."""
    env = {k: v for k, v in os.environ.items() if k != "SALIENCYLAB_DEBUG"} | {"PYTHONPATH": SRC}
    # as a terminal starts a foreground command: Ctrl-C raises KeyboardInterrupt. A test run started in the
    # background of a non-interactive shell (`pytest &`) hands its children SIGINT ignored, which Python keeps.
    cli = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "sys.argv[0] = 'saliencylab'; runpy.run_module('saliencylab.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", cli, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + limit
    try:
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the command ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_in_phantoms_prints_one_line_and_leaves_no_partial_file(tmp_path):
    out = tmp_path / "ph"
    images = out / "COVID" / "images"
    done = _interrupt_when(["phantoms", str(out), "--n-covid", "4000", "--n-normal", "4000", "--size", "64",
                            "--workers", "2"], lambda: images.is_dir() and len(os.listdir(images)) >= 8)
    assert done.returncode == 130
    assert done.stderr.splitlines() == ["interrupted; nothing partial was written"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not (out / "metadata.csv").exists() and not (out / "phantoms.json").exists()


def test_ctrl_c_in_training_prints_one_line(tmp_path):
    from saliencylab.data.phantoms import PhantomConfig, generate

    data = tmp_path / "data"
    generate(PhantomConfig(n_covid=40, n_normal=40, size=48, workers=1), data, progress=False)
    run = tmp_path / "run"
    done = _interrupt_when(["train", "--data", str(data), "--out", str(run), "--epochs", "1000", "--image-size",
                            "32", "--batch-size", "16"], lambda: (run / "config.json").exists())
    assert done.returncode == 130
    assert done.stderr.splitlines() == ["interrupted; nothing partial was written"]
    assert not [p for p in run.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
