"""Running under torchrun: which process am I, which shards are mine, and one process group per run.

torchrun (PyTorch's own launcher) sets RANK, WORLD_SIZE and LOCAL_RANK in every process it starts; without
them we are the only process (rank 0 of 1) and nothing here talks to the network. Work is split into a fixed,
sorted list of shards that does not depend on the number of processes, and rank r takes shards r, r + world,
r + 2 world, ... so a job resumed with a different `--nproc-per-node` still finds every finished shard.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from saliencylab.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank in [0, size), local_rank on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes what is written once (merged manifest, summaries, checkpoints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer: launch with torchrun, "
                        "or unset it") from None


def world() -> World:
    """The World from torchrun's environment variables (rank 0 of 1 without them)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK={rank} and WORLD_SIZE={size} do not fit together: launch with torchrun, "
                        "or unset both")
    return World(rank=rank, size=size, local_rank=local)


def local_device(requested: str | torch.device, w: World | None = None) -> torch.device:
    """The device for this process: 'cuda' (or 'auto' with CUDA present) becomes cuda:<local_rank>.

    One process per GPU: under torchrun each rank takes the GPU of its local rank. 'cpu' stays 'cpu'; an
    explicit 'cuda:N' is kept as given.
    """
    w = w or world()
    if isinstance(requested, torch.device):
        return requested
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
        return torch.device("cuda", w.local_rank % max(1, torch.cuda.device_count()))
    try:
        return torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested}: use auto, cpu, cuda or cuda:N") from None


@contextlib.contextmanager
def process_group(w: World, device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the body (NCCL on CUDA, Gloo on CPU); leave it afterwards.

    A single process, or a group that is already initialised by the caller, is left alone.
    """
    import torch.distributed as tdist

    if not w.distributed or tdist.is_initialized():
        yield w
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend=backend, rank=w.rank, world_size=w.size)
    try:
        yield w
    finally:
        tdist.destroy_process_group()


def barrier(w: World) -> None:
    """Wait for every rank (no-op for one process)."""
    import torch.distributed as tdist

    if w.distributed and tdist.is_initialized():
        tdist.barrier()


def shard_bounds(n_items: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each shard of a sorted item list; the split depends only on n_items and shard_size."""
    shard_size = max(1, int(shard_size))
    return [(s, min(s + shard_size, n_items)) for s in range(0, n_items, shard_size)]


def my_shards(n_shards: int, w: World) -> range:
    """The shard indices rank w.rank works on: w.rank, w.rank + w.size, ..."""
    return range(w.rank, n_shards, w.size)
