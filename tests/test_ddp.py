"""`saliencylab train` and `evaluate` under torchrun (2 processes, Gloo on CPU, loopback only) against one process.

Each torchrun process runs tests/fixtures/ddp_worker.py, which records every file the rank writes.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from saliencylab.studies.cxr import evaluate
from saliencylab.train import TrainConfig, train

SRC = Path(__file__).resolve().parents[1] / "src"
WORKER = Path(__file__).resolve().parent / "fixtures" / "ddp_worker.py"
# Float32 gradients summed in another order differ by ~1e-7 relative; Adam's first step moves every weight by
# lr * g / (|g| + eps), so an element whose gradient is ~1e-8 can move by +lr on one run and -lr on the other.
# Measured on these runs: val loss within 2.1e-4, train loss within 1.9e-3 (2 epochs, lr 2e-3). The float64
# test below checks the mathematics itself to 1e-12.
VAL_TOL, TRAIN_TOL = 1e-3, 5e-3
EPOCHS, SIZE, BATCH, LR = 2, 64, 16, 2e-3


def _one_step(rank: int, world_size: int, port: int, queue) -> None:
    """One training step of cxr_cnn in float64 on rank/world_size, its slice of a global batch of 12 (dropout,
    batch norm, channels-last as in training); puts (gradients, running stats) on the queue."""
    import torch.distributed as tdist

    from saliencylab.dist import World, global_batch_layers, global_rows, row_bounds
    from saliencylab.models.zoo import CxrCNN

    torch.manual_seed(0)
    net = CxrCNN(1, 64).double().train()
    x = torch.rand(12, 1, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = (torch.arange(12) % 2).double()
    w = World(rank, world_size, rank)
    a, b = row_bounds(12, w)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        torch.set_num_threads(1)
        tdist.init_process_group("gloo", rank=rank, world_size=world_size)
        global_batch_layers(net)
        model = torch.nn.parallel.DistributedDataParallel(net)
    else:
        model = net
    torch.manual_seed(5)
    with global_rows(a, b, 12):
        logits = model(x[a:b].contiguous(memory_format=torch.channels_last))[:, 0]
    rows = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[a:b], reduction="none")
    (rows.sum() / 12 * world_size).backward()
    if rank == 0:
        queue.put(({k: p.grad.numpy().copy() for k, p in net.named_parameters()},  # numpy: no shared memory
                   {k: v.numpy().copy() for k, v in net.named_buffers()}))
    if world_size > 1:
        tdist.destroy_process_group()


def test_one_global_batch_gives_one_process_gradients_in_float64():
    """Two ranks with a slice each: the gradients, batch-norm running statistics and dropout masks of one
    process on the whole batch (the gradients are averaged by DDP; batch norm sees the global batch)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    one: list = []
    _one_step(0, 1, 0, types.SimpleNamespace(put=one.append))  # the reference, in this process
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_one_step, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [one[0], queue.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (g1, b1), (g2, b2) = results
    # Convolution and dense gradients agree to float64 rounding (measured <= 2e-15); torch's CPU batch-norm
    # kernel, the one-process reference, rounds its weight/bias gradients and running statistics at about 5e-8
    # relative even in float64 (measured <= 1.2e-9 absolute, 5.3e-8 on running_var).
    for k, g in g1.items():
        rel = 1e-6 if k in b1 or k.rsplit(".", 1)[0] + ".running_mean" in b1 else 1e-12
        err = float(abs(g2[k] - g).max())
        assert err <= rel * float(abs(g).max()), (k, err, float(abs(g).max()))
    for k, v in b1.items():
        err = float(abs(b2[k] - v).max())
        assert err <= 1e-6 * max(1.0, float(abs(v).max())), (k, err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp: Path, args: list[str], *, nproc: int = 2, stop_after: int | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc ddp_worker.py` on loopback; the writes of rank r land in tmp."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
           "TORCHELASTIC_ERROR_FILE": str(tmp / "error.json")}
    stop = ["--stop-after-epoch", str(stop_after)] if stop_after is not None else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--monitor-interval", "0.2",
           str(WORKER), str(tmp), *stop, "--", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def writes_under(tmp: Path, rank: int, folder: Path) -> list[str]:
    paths = json.loads((tmp / f"writes-rank{rank}.json").read_text())
    return sorted(p for p in paths if Path(p).resolve().is_relative_to(folder.resolve()))


def _cfg(data: Path) -> TrainConfig:
    return TrainConfig(data=str(data), epochs=EPOCHS, image_size=SIZE, batch_size=BATCH, lr=LR)


def _cli_train(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--epochs", str(EPOCHS), "--image-size", str(SIZE),
            "--batch-size", str(BATCH), "--lr", str(LR), "--device", "cpu", "--no-progress"]


def _history(out: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(open(out / "history.csv"))]


@pytest.fixture(scope="module")
def one_process(cxr_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "one"
    train(_cfg(cxr_data), out, progress=False, log=lambda *_: None)
    return out


def _assert_same_curve(a: Path, b: Path) -> None:
    ha, hb = _history(a), _history(b)
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb] == list(range(1, EPOCHS + 1))
    for x, y in zip(ha, hb, strict=True):
        assert abs(x["val_loss"] - y["val_loss"]) <= VAL_TOL, (x, y)
        assert abs(x["train_loss"] - y["train_loss"]) <= TRAIN_TOL, (x, y)


@pytest.mark.slow
def test_train_on_two_processes_matches_one(cxr_data, one_process, tmp_path):
    out = tmp_path / "two"
    res = torchrun(tmp_path, _cli_train(cxr_data, out))
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_curve(one_process, out)
    assert writes_under(tmp_path, 1, out) == []  # rank 1 wrote nothing
    written = {Path(p).name for p in writes_under(tmp_path, 0, out)}
    assert {"state.pt", "best.pt", "history.csv", "config.json"} <= written
    assert res.stdout.count(f"epoch {EPOCHS}/{EPOCHS}:") == 1  # rank 0 alone logs
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_process.iterdir())


@pytest.mark.slow
def test_a_two_process_run_resumes_on_one(cxr_data, one_process, tmp_path):
    out = tmp_path / "resumed"
    res = torchrun(tmp_path, _cli_train(cxr_data, out), stop_after=1)
    assert res.returncode != 0  # rank 0 stopped after epoch 1; torchrun ended rank 1
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1
    train(_cfg(cxr_data), out, resume=True, progress=False, log=lambda *_: None)
    _assert_same_curve(one_process, out)


@pytest.mark.slow
def test_evaluate_on_two_processes_writes_what_one_writes(cxr_run, tmp_path):
    args = ["--methods", "vanilla", "--per-side", "1", "--low", "0.5", "--high", "0.5", "--batch-size", "2"]
    evaluate(cxr_run, out=tmp_path / "one", methods="vanilla", n_per_side=1, low=0.5, high=0.5, batch_size=2,
             progress=False)
    two = tmp_path / "two"
    res = torchrun(tmp_path, ["evaluate", str(cxr_run), "--out", str(two), "--no-progress", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("predictions.csv", "metrics.json", "unreadable.json"):
        assert (two / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert writes_under(tmp_path, 1, two) == []
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
