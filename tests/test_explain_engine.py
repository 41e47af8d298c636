"""`explain --engine ray`: the shards go through a picklable runner (`streaming.ShardRunner`) in Ray's actor pool.

The runner and the wiring are tested in CI with a stand-in for Ray that pickles the runner and calls it per
shard in another order (what Ray's actors do); Ray itself listens on every network interface, so the test with
a real Ray runs only by hand (SALIENCYLAB_RAY_TEST=1, Ray installed).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from saliencylab.cli import app
from test_explain_resume import _model, _phantoms, assert_same_files

runner = CliRunner()
METHODS = ["--methods", "vanilla,integrated_gradients", "--set", "integrated_gradients.n_steps=2"]
JOB = ["--shard-size", "4", "--batch-size", "2", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    data, model = _phantoms(root / "data", 10, seed=5), _model(root / "model.pt")
    ref = root / "ref"
    res = runner.invoke(app, ["explain", str(data), "--model", str(model), *METHODS, *JOB, "--out", str(ref)])
    assert res.exit_code == 0, res.output
    return {"data": data, "model": model, "ref": ref}


def test_shards_through_a_pickled_runner_give_the_local_files(small, tmp_path, monkeypatch):
    import saliencylab.engines.ray_engine as ray_engine

    calls: list[int] = []

    def fake_run_shards(ids, fn, **kw):  # what Ray does: a copy of the function per worker, shards in any order
        fn = pickle.loads(pickle.dumps(fn))
        fn.setup()
        done = [fn(i) for i in reversed(list(ids))]
        calls.extend(ids)
        return {"shards": len(done), "skipped": sum(d["skipped"] for d in done), "ran": len(done),
                "computed": sum(d["computed"] for d in done)}

    monkeypatch.setattr(ray_engine, "run_shards", fake_run_shards)
    out = tmp_path / "ray"
    args = ["explain", str(small["data"]), "--model", str(small["model"]), *METHODS, *JOB, "--out", str(out),
            "--engine", "ray", "--actors", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert calls == [0, 1, 2]  # 10 images in shards of 4
    assert_same_files(out, small["ref"])
    calls.clear()
    again = runner.invoke(app, args)  # a second run: every shard is done, nothing is rewritten
    assert again.exit_code == 0, again.output
    assert calls == [0, 1, 2]
    assert_same_files(out, small["ref"])


def test_engine_flags_are_checked_and_a_missing_ray_is_named(small, tmp_path):
    base = ["explain", str(small["data"]), "--model", str(small["model"]), *METHODS, *JOB]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--engine", "spark"])
    assert res.exit_code != 0 and "--engine spark: use local or ray" in res.output
    try:
        import ray  # noqa: F401
    except ImportError:
        res = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--engine", "ray"])
        assert res.exit_code != 0 and "pip install 'saliencylab[ray]'" in res.output, res.output
        assert "Traceback" not in res.output


@pytest.mark.skipif(os.environ.get("SALIENCYLAB_RAY_TEST") != "1",
                    reason="Ray listens on all interfaces: run by hand with SALIENCYLAB_RAY_TEST=1")
def test_real_ray_gives_the_local_files(small, tmp_path):
    out = tmp_path / "ray"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "saliencylab.cli", "explain", str(small["data"]), "--model", str(small["model"]),
           *METHODS, *JOB, "--out", str(out), "--engine", "ray", "--actors", "2", "--cpus-per-actor", "0.5"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_files(out, small["ref"])
