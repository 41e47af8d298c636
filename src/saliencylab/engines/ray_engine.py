"""Ray Data as an optional engine: the same shard function as torchrun, in a pool of Ray actors.

For clusters that already run Ray (`pip install saliencylab[ray]`). The work is a fixed list of shard ids;
each actor calls `shard_fn(shard_id)` for the ids it receives, one id per batch. Resumption comes from the
shard function, which skips shards whose outputs are already complete (Ray's own checkpointing restarted
whole tasks in our tests, so it is not used). Without a cluster address, Ray starts a local one bound to
127.0.0.1 with no dashboard.

A shard function is any picklable callable `shard_fn(shard_id: int) -> dict | None` (a module-level function,
a `functools.partial` of one, or an instance of a picklable class). An instance with a `setup()` method gets it
called once per actor before its first shard: the place to load a model once per actor, not once per shard.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from saliencylab.errors import UserError

INSTALL_HINT = "the Ray engine needs Ray: pip install 'saliencylab[ray]' (or pip install 'ray[data]')"


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"--engine ray: {INSTALL_HINT}") from None
    return ray


class _ShardActor:
    """Ray actor state: one copy of the shard function per actor, set up once, then called per batch of ids."""

    def __init__(self, shard_fn: Callable[[int], Any]) -> None:
        self.fn = copy.copy(shard_fn)
        setup = getattr(self.fn, "setup", None)
        if callable(setup):
            setup()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        ids = [int(i) for i in batch["shard"]]
        done, computed = [], []
        for i in ids:
            result = self.fn(i)
            result = result if isinstance(result, dict) else {}
            done.append(bool(result.get("skipped", False)))
            computed.append(int(result.get("computed", 0)))
        return {"shard": ids, "skipped": done, "computed": computed}


def ensure_ray(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None) -> Any:
    """ray.init once: `address` joins a running cluster; without it a local Ray bound to 127.0.0.1."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus,
                 log_to_driver=False, configure_logging=False)
    return ray


def run_shards(shard_ids: Sequence[int], shard_fn: Callable[[int], Any], *, actors: int = 1,
               num_gpus_per_actor: float = 0.0, cpus_per_actor: float = 0.5,
               address: str | None = None) -> dict[str, Any]:
    """Run `shard_fn` over `shard_ids` in a Ray Data actor pool of `actors` actors; return when all are done.

    Args:
        shard_ids: the shards to run (all of them: the function skips finished ones).
        shard_fn: picklable `shard_fn(shard_id) -> dict | None`; a returned {'skipped': True} is counted, and
            so is {'computed': n} (e.g. the maps an explain shard wrote).
        actors: actor pool size (`ActorPoolStrategy(size=actors)`).
        num_gpus_per_actor: GPUs each actor reserves (1 on GPU nodes: one model per GPU).
        cpus_per_actor: CPUs each actor reserves; fractional by default, so that actors do not starve Ray's
            own read and write stages on a small node.
        address: a running cluster ('auto' or 'ray://...'); None starts a local Ray on 127.0.0.1.

    Returns:
        {'shards': n, 'skipped': k, 'ran': n - k, 'computed': the sum of the functions' 'computed' counts}.
    """
    if actors < 1:
        raise UserError(f"--actors {actors}: use 1 or more")
    ids = [int(i) for i in shard_ids]
    if not ids:
        return {"shards": 0, "skipped": 0, "ran": 0}
    ray = ensure_ray(address)
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items([{"shard": i} for i in ids], override_num_blocks=len(ids))
    done = ds.map_batches(_ShardActor, fn_constructor_args=(shard_fn,), batch_size=1, batch_format="numpy",
                          compute=ActorPoolStrategy(size=min(actors, len(ids))), num_gpus=num_gpus_per_actor,
                          num_cpus=cpus_per_actor)
    rows = done.take_all()
    skipped = sum(bool(r["skipped"]) for r in rows)
    if sorted(int(r["shard"]) for r in rows) != sorted(ids):
        raise RuntimeError("the Ray engine lost shards: some shard ids came back missing or twice")
    return {"shards": len(ids), "skipped": skipped, "ran": len(ids) - skipped,
            "computed": sum(int(r.get("computed", 0)) for r in rows)}
