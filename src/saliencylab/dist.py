"""Running under torchrun: which process am I, which shards are mine, and one process group per run.

torchrun (PyTorch's own launcher) sets RANK, WORLD_SIZE and LOCAL_RANK in every process it starts; without
them we are the only process (rank 0 of 1) and nothing here talks to the network. Work is split into a fixed,
sorted list of shards that does not depend on the number of processes, and rank r takes shards r, r + world,
r + 2 world, ... so a job resumed with a different `--nproc-per-node` still finds every finished shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
    explicit 'cuda:N' is kept as given. Names are checked by `devices.choose_device` (one-line errors).
    """
    from saliencylab.devices import choose_device

    if isinstance(requested, torch.device):
        return requested
    device = choose_device(requested)
    if device.type == "cuda" and device.index is None:
        w = w or world()
        return torch.device("cuda", w.local_rank % max(1, torch.cuda.device_count()))
    return device


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


def local_workers(requested: int) -> int:
    """Worker processes for this rank: `requested`, or the CPUs shared among the ranks on this machine."""
    if requested:
        return requested
    return max(1, (os.cpu_count() or 1) // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))


def row_bounds(n_rows: int, w: World) -> tuple[int, int]:
    """(start, stop) of this rank's contiguous slice of a global batch of n_rows (sizes differ by at most one)."""
    base, extra = divmod(n_rows, w.size)
    start = w.rank * base + min(w.rank, extra)
    return start, start + base + (w.rank < extra)


def gather_shards(local: dict[int, Any], w: World) -> dict[int, Any]:
    """Every rank's {shard index: result} merged, on every rank (the local dict for one process)."""
    import torch.distributed as tdist

    if not w.distributed or not tdist.is_initialized():
        return dict(local)
    parts: list[Any] = [None] * w.size
    tdist.all_gather_object(parts, local)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    return merged


def all_reduce_sum(values: list[float], w: World, device: torch.device) -> list[float]:
    """Sum of each value over the ranks (float64; the values themselves for one process)."""
    import torch.distributed as tdist

    if not w.distributed or not tdist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def broadcast_flag(flag: bool, w: World, device: torch.device) -> bool:
    """Rank 0's flag on every rank (so that every rank takes the same branch, e.g. an early stop)."""
    import torch.distributed as tdist

    if not w.distributed or not tdist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    tdist.broadcast(t, src=0)
    return bool(t.item())


# ---- one global batch split over the ranks: batch norm and dropout that see the whole batch ----------------

class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of a sum that every rank uses is the sum of their
    gradients (what torch's SyncBatchNorm does, written for any backend, Gloo on CPU included)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        import torch.distributed as tdist

        t = t.clone()
        tdist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        import torch.distributed as tdist

        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, summed over the ranks.

    Two collectives per call: the sum (for the mean), then the sum of squared deviations (for the variance),
    which is as accurate as one process's two-pass statistics. Eval mode and one process behave like
    `nn.BatchNorm*d`; the state dict has the same keys. Works on Gloo (CPU), where torch's SyncBatchNorm does
    not run, and on NCCL.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as tdist

        if not (self.training and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n_local = torch.tensor([x.numel() / max(1, x.shape[1])], dtype=x.dtype, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), n_local]))  # [C + 1]: sums, then the count
        count = total[-1].detach()
        mean = total[:-1] / count
        dev = x - mean.view(shape)
        var = _AllReduceSum.apply((dev * dev).sum(dims)) / count  # biased, as batch norm normalises with
        y = dev * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        return y


_ROWS: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar("saliencylab_rows", default=None)


@contextlib.contextmanager
def global_rows(start: int, stop: int, n_rows: int) -> Iterator[None]:
    """Inside, a `GlobalBatchDropout` knows that its input holds rows [start, stop) of a batch of n_rows."""
    token = _ROWS.set((start, stop, n_rows))
    try:
        yield
    finally:
        _ROWS.reset(token)


class GlobalBatchDropout(torch.nn.Dropout):
    """Dropout that draws the mask of the whole global batch and keeps this rank's rows.

    Every rank seeds the same generator, so the masks are those one process would draw for the same global
    batch: on CPU, bit for bit what `nn.Dropout` draws (`bernoulli_(1 - p)` on a tensor of the batch's shape,
    then scaled by 1 / (1 - p)). Outside `global_rows` it is `nn.Dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _ROWS.get()
        if not self.training or self.p == 0 or rows is None:
            return super().forward(x)
        start, stop, n_rows = rows
        if self.p == 1:
            return x * 0
        noise = torch.empty((n_rows, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        noise.div_(1 - self.p)
        return x * noise[start:stop]  # [stop - start, ...]


_PLAIN_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def global_batch_layers(module: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """Swap, in place, plain batch norms for `GlobalBatchNorm` and dropouts for `GlobalBatchDropout`.

    Returns:
        The module, and the names of the other batch-norm layers (subclasses such as timm's BatchNormAct2d),
        which keep per-rank statistics.
    """
    others: list[str] = []
    for name, child in list(module.named_children()):
        if type(child) in _PLAIN_NORMS:
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(iter(child.state_dict().values())).device if child.state_dict() else "cpu")
            new.train(child.training)
            setattr(module, name, new)
        elif type(child) is torch.nn.Dropout:
            new_drop = GlobalBatchDropout(child.p, child.inplace)
            new_drop.train(child.training)
            setattr(module, name, new_drop)
        elif isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            others.append(name)
        else:
            _, inner = global_batch_layers(child)
            others += [f"{name}.{n}" for n in inner]
    return module, others
