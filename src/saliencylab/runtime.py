"""CPU threads that survive a busy machine: how many cores this process may really use, how many intra-op
threads to run, and the settings the CLI applies before torch is imported.

Why: with torch's defaults (OpenMP threads that spin while they wait) a 2-core machine with other work on it
trained at 10 images/s against 476 images/s single-threaded (issue 10). OpenMP's passive wait policy puts
the waiting threads to sleep instead; the thread count follows the CPUs the process may use (affinity and
the cgroup quota), not the machine's core count.

Precedence for the intra-op thread count: `--threads N` > `SALIENCYLAB_THREADS` > `OMP_NUM_THREADS` >
computed from the available cores. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import math
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saliencylab.errors import UserError

THREADS_ENV = "SALIENCYLAB_THREADS"
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count and where it came from (`flag`, `SALIENCYLAB_THREADS`, `OMP_NUM_THREADS`,
    `cores`), with the available cores it was judged against."""

    threads: int
    source: str
    cores: float


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for no limit) -> CPUs allowed, or None."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` -> CPUs allowed, or None (quota -1: no limit)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _own_cgroup_v2(root: Path, proc_cgroup: str | None) -> list[Path]:
    """The v2 folders that may hold this process's cpu.max: the namespace root and the process's own path."""
    folders = [root]
    for line in (proc_cgroup or "").splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip().lstrip("/")
            if rel:
                folders.append(root / rel)
    return folders


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota this process's cgroup sets (v2 `cpu.max`, v1 CFS quota), in CPUs; None if none.

    Args:
        root: the cgroup mount (a folder laid out like /sys/fs/cgroup; tests pass a temporary one).
        proc_cgroup: the text of /proc/self/cgroup (read when None and `root` is the real mount).
    """
    if proc_cgroup is None and root == CGROUP_ROOT:
        proc_cgroup = _read(Path("/proc/self/cgroup"))
    limits = []
    for folder in _own_cgroup_v2(root, proc_cgroup):
        text = _read(folder / "cpu.max")
        if text is not None and (cpus := parse_cpu_max(text)) is not None:
            limits.append(cpus)
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota, period = _read(root / name / "cpu.cfs_quota_us"), _read(root / name / "cpu.cfs_period_us")
        if quota is not None and period is not None and (cpus := parse_cfs(quota, period)) is not None:
            limits.append(cpus)
    return min(limits) if limits else None


def available_cores(affinity: set[int] | None = None, quota: float | None = None) -> float:
    """CPUs this process may use: the CPUs in its affinity mask, capped by the cgroup quota.

    Args:
        affinity: the CPU set (default: `os.sched_getaffinity(0)`, or `os.cpu_count()` where unsupported).
        quota: CPUs allowed by the cgroup (default: `cgroup_cpu_limit()`; pass 0 to skip the lookup).
    """
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = set(range(os.cpu_count() or 1))
    cores = float(max(1, len(affinity)))
    if quota is None:
        quota = cgroup_cpu_limit()
    return min(cores, quota) if quota else cores


def threads_for(cores: float) -> int:
    """Intra-op threads for `cores` available CPUs: whole CPUs only (a 1.5-CPU quota gets 1), at least 1."""
    return max(1, math.floor(cores + 1e-9))


def _parse_count(value: str, name: str) -> int:
    first = value.split(",")[0].strip()  # OMP_NUM_THREADS may list nested levels: "4,2"
    try:
        n = int(first)
    except ValueError:
        raise UserError(f"{name}={value!r}: give a whole number of threads, at least 1 (or unset it)") from None
    if n < 1:
        raise UserError(f"{name}={value!r}: give a whole number of threads, at least 1 (or unset it)")
    return n


def choose_threads(flag: int | None = None, env: Mapping[str, str] | None = None,
                   cores: float | None = None) -> ThreadChoice:
    """The intra-op thread count: `flag` > `SALIENCYLAB_THREADS` > `OMP_NUM_THREADS` > the available cores.

    Raises:
        UserError: a thread count below 1 or not a number, naming where it came from.
    """
    env = os.environ if env is None else env
    cores = available_cores() if cores is None else cores
    if flag is not None:
        if flag < 1:
            raise UserError(f"--threads {flag}: give at least 1")
        return ThreadChoice(flag, "flag", cores)
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        if env.get(name, "").strip():
            return ThreadChoice(_parse_count(env[name], name), name, cores)
    return ThreadChoice(threads_for(cores), "cores", cores)


def configure(flag: int | None = None) -> ThreadChoice:
    """Apply the thread settings to this process; call before torch is imported (the CLI does, first thing).

    Sets OMP_WAIT_POLICY=PASSIVE unless the user set a policy (waiting threads sleep instead of spinning on
    a core another process needs), and OMP_NUM_THREADS to the chosen count so that torch, MKL and OpenMP
    start with it. If torch is already imported (a library caller, a test runner), its intra-op thread
    count is set directly; the wait policy then only reaches processes started afterwards.
    """
    choice = choose_threads(flag)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.get_num_threads() != choice.threads:
            torch.set_num_threads(choice.threads)
    elif not any(isinstance(f, _SetThreadsOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _SetThreadsOnImport(choice.threads))
    return choice


class _SetThreadsOnImport(importlib.abc.MetaPathFinder):
    """Calls `torch.set_num_threads(n)` right after torch is first imported, wherever that happens.

    OMP_NUM_THREADS alone is not enough: torch caps its default at the physical cores, so `--threads 3` on two
    cores would silently run 2. Commands import torch lazily (help stays fast), hence a hook, not an import.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, threads = spec.loader.exec_module, self.threads

        def exec_module(module: Any) -> None:
            run(module)
            module.set_num_threads(threads)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def worker_init() -> None:
    """Initializer for worker processes (multiprocessing pools): one thread each, and Ctrl-C left to the parent.

    The parent is interrupted by the terminal's SIGINT and stops the pool itself; a worker that also took the
    signal would print its own traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy's BLAS keeps its threads; the workers here do little linear algebra
        return
    threadpool_limits(limits=1)
