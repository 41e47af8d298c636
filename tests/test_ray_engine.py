"""The optional Ray engine: a toy shard function in a Ray Data actor pool gives what a plain loop gives, and a
second run skips every finished shard.

Ray's processes listen on all interfaces (measured with Ray 2.60: gcs_server, raylet and the workers bind
'*'), so this test stays out of the default run: `SALIENCYLAB_RAY_TEST=1` runs it (tested by hand, see the
README). Without Ray installed, the engine's error is checked instead.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from saliencylab.engines import ray_engine
from saliencylab.errors import UserError


def toy_shard(shard: int, folder: str) -> dict:
    """Writes shard-<id>.json (atomically) unless it exists; returns whether it skipped."""
    path = Path(folder) / f"shard-{shard}.json"
    if path.is_file():
        return {"skipped": True}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"shard": shard, "rows": [shard * 10 + k for k in range(3)]}))
    os.replace(tmp, path)
    return {"skipped": False}


class LoadsOnce:
    """A shard function with per-actor state: setup() runs once per actor (where a model would load)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.state: dict | None = None

    def setup(self) -> None:
        self.state = {"pid": os.getpid()}

    def __call__(self, shard: int) -> dict:
        assert self.state is not None, "setup() was not called"
        return toy_shard(shard, self.folder)


def test_missing_ray_gives_one_line_with_the_install_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UserError, match=r"pip install 'saliencylab\[ray\]'"):
        ray_engine.run_shards([0, 1], functools.partial(toy_shard, folder="."), actors=1)


def test_no_shards_starts_nothing():
    assert ray_engine.run_shards([], functools.partial(toy_shard, folder="."), actors=2) == \
        {"shards": 0, "skipped": 0, "ran": 0}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SALIENCYLAB_RAY_TEST") != "1",
                    reason="Ray listens on all interfaces: run by hand with SALIENCYLAB_RAY_TEST=1")
def test_ray_actor_pool_equals_a_plain_loop_and_resumes(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    # Ray's workers unpickle the shard functions by module name: they need this folder on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    plain, pooled = tmp_path / "plain", tmp_path / "ray"
    plain.mkdir()
    pooled.mkdir()
    for i in range(7):
        toy_shard(i, str(plain))
    (pooled / "shard-3.json").write_text((plain / "shard-3.json").read_text())  # finished before a "crash"
    try:
        first = ray_engine.run_shards(range(7), LoadsOnce(str(pooled)), actors=2, cpus_per_actor=0.5)
        assert first == {"shards": 7, "skipped": 1, "ran": 6}
        again = ray_engine.run_shards(range(7), functools.partial(toy_shard, folder=str(pooled)), actors=2)
        assert again == {"shards": 7, "skipped": 7, "ran": 0}
    finally:
        ray.shutdown()
    assert sorted(p.name for p in pooled.iterdir()) == sorted(p.name for p in plain.iterdir())
    for p in plain.iterdir():
        assert (pooled / p.name).read_bytes() == p.read_bytes()
