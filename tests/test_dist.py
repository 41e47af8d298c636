"""The torchrun contract: world from the environment, shard assignment independent of the world size."""

import pytest
import torch

from saliencylab.dist import (
    GlobalBatchDropout,
    GlobalBatchNorm,
    World,
    global_batch_layers,
    global_rows,
    local_device,
    my_shards,
    row_bounds,
    shard_bounds,
    world,
)
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


@pytest.mark.parametrize("n,size", [(16, 2), (15, 2), (7, 3), (1, 2), (0, 2)])
def test_row_bounds_cut_a_global_batch_into_contiguous_slices(n, size):
    bounds = [row_bounds(n, World(r, size, r)) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_global_batch_dropout_slices_are_one_process_mask():
    """Each rank's rows of the mask are the rows nn.Dropout draws for the whole batch (same seed)."""
    x = torch.randn(10, 64)
    torch.manual_seed(1)
    whole = torch.nn.Dropout(0.5).train()(x)
    drop = GlobalBatchDropout(0.5).train()
    parts = []
    for r in range(3):
        a, b = row_bounds(10, World(r, 3, r))
        torch.manual_seed(1)
        with global_rows(a, b, 10):
            parts.append(drop(x[a:b]))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    assert torch.equal(drop.eval()(x), x)


def test_global_batch_norm_alone_is_batch_norm():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.3))
    x = torch.randn(6, 1, 8, 8)
    ref = plain(x)
    import copy

    swapped, others = global_batch_layers(copy.deepcopy(plain))
    assert isinstance(swapped[1], GlobalBatchNorm) and isinstance(swapped[2], GlobalBatchDropout) and not others
    torch.manual_seed(0)
    torch.testing.assert_close(swapped[1](swapped[0](x)), plain[1](plain[0](x)), rtol=0, atol=0)
    assert set(swapped.state_dict()) == set(plain.state_dict())
    assert ref.shape == (6, 4, 6, 6)


def test_augment_rows_do_not_depend_on_the_batch():
    """A rank that applies its rows of one global draw gets those rows of the whole batch's augmentation."""
    from saliencylab.train import apply_augment, augment, draw_augment

    x = torch.rand(9, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    whole = augment(x, torch.Generator().manual_seed(3), hflip=True)
    draw = draw_augment(9, torch.Generator().manual_seed(3), hflip=True)
    parts = [apply_augment(x[a:b], {k: v[a:b] for k, v in draw.items()}) for a, b in ((0, 4), (4, 9))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)


def _torchrun_options() -> list[str]:
    from torch.distributed.run import get_args_parser

    return [s for a in get_args_parser()._actions for s in a.option_strings if s.startswith("--")]


def test_every_cli_option_has_a_spelling_that_torchrun_passes_on():
    """torchrun's argparse reads every '--x' after the script as a possible abbreviation of its own options
    and stops on an ambiguous one ('--n' could be --nnodes or --nproc-per-node): each option of ours needs one
    spelling that is not such a prefix, and `--n` / `--sign` have aliases for it."""
    import typer.main

    from saliencylab.cli import app

    theirs = _torchrun_options()

    def passes(opt: str) -> bool:
        return opt in theirs or sum(t.startswith(opt) for t in theirs) < 2

    assert not passes("--n") and not passes("--sign")  # the two that need their aliases
    blocked = [(name, p.name) for name, c in typer.main.get_command(app).commands.items() for p in c.params
               if p.opts and any(o.startswith("--") for o in p.opts + p.secondary_opts)
               and not any(passes(o) for o in p.opts + p.secondary_opts if o.startswith("--"))]
    assert blocked == []
