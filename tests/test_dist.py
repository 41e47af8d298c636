"""The torchrun contract: world from the environment, shard assignment independent of the world size."""

import pytest
import torch

from saliencylab.dist import World, local_device, my_shards, shard_bounds, world
from saliencylab.errors import UserError


def test_world_defaults_to_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world() == World(0, 1, 0)
    assert world().main and not world().distributed


def test_world_reads_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == World(3, 4, 1)


@pytest.mark.parametrize("rank,size", [("4", "4"), ("-1", "2"), ("x", "2")])
def test_world_rejects_inconsistent_environment(monkeypatch, rank, size):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", size)
    with pytest.raises(UserError, match="RANK"):
        world()


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_every_shard_is_taken_exactly_once_for_any_world_size(size):
    bounds = shard_bounds(103, 10)
    assert bounds[0] == (0, 10) and bounds[-1] == (100, 103) and len(bounds) == 11
    taken = sorted(i for r in range(size) for i in my_shards(len(bounds), World(r, size, r)))
    assert taken == list(range(len(bounds)))


def test_cpu_device_stays_cpu():
    assert local_device("cpu", World(1, 2, 1)) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert local_device("auto", World(1, 2, 1)) == torch.device("cpu")
        with pytest.raises(UserError, match="--device cuda"):
            local_device("cuda", World())
