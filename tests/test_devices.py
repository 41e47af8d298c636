"""Devices, precision and pass sizes: --device/--precision, the automatic pass size, the same map everywhere."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from typer.testing import CliRunner

from conftest import TinyCNN
from saliencylab.cli import app
from saliencylab.devices import choose_device
from saliencylab.errors import UserError
from saliencylab.methods import METHODS, _common
from saliencylab.methods._common import PassChoice, cuda_copies, describe_passes, passes, record_passes
from saliencylab.metrics.sanity import randomise
from saliencylab.precision import check_precision, precision, tf32_flags

CUDA = torch.cuda.is_available()
runner = CliRunner()


# ------------------------------------------------------------------------------------------------ devices


def test_choose_device_auto_and_cpu():
    assert choose_device("auto") == torch.device("cuda" if CUDA else "cpu")
    assert choose_device("CPU") == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="checks the error without a GPU")
def test_cuda_without_gpu_is_one_line_with_the_fix():
    with pytest.raises(UserError, match=r"--device cuda: no CUDA GPU .* use --device cpu or auto"):
        choose_device("cuda")


def test_not_a_device():
    for name in ("gpu0", "mps"):
        with pytest.raises(UserError, match="use auto, cpu or cuda"):
            choose_device(name)


@pytest.mark.skipif(CUDA, reason="checks the error without a GPU")
@pytest.mark.parametrize("command", [["evaluate", "--model", "cxr_cnn", "--data", "d"],
                                     ["audit", "--model", "cxr_cnn", "--data", "d"], ["demo"]])
def test_commands_refuse_cuda_without_gpu(tmp_path, command):
    res = runner.invoke(app, [*command, "--device", "cuda", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda: no CUDA GPU" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["classify"], ["explain"], ["evaluate", "--model", "cxr_cnn", "--data", "d"],
                                     ["audit", "--model", "cxr_cnn", "--data", "d"], ["demo"]])
def test_commands_refuse_an_unknown_precision(tmp_path, command):
    extra = [] if command[0] == "classify" else ["--out", str(tmp_path / "o")]
    res = runner.invoke(app, [*command, "--precision", "fp16", *extra])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--precision fp16: use one of fp32, tf32, bf16" in lines[0]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- precision


def _set_flags(matmul: bool, cudnn: bool, matmul_precision: str) -> None:
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


@pytest.mark.parametrize("name,inside", [("fp32", (False, False, "highest")), ("tf32", (True, True, "high")),
                                         ("bf16", (False, False, "highest"))])
def test_precision_sets_tf32_and_restores_it_also_on_error(name, inside):
    saved = tf32_flags()
    try:
        for start in [(False, True, "highest"), (True, False, "high")]:  # torch's default, and another
            _set_flags(*start)
            with precision(name):
                assert tf32_flags() == inside
                assert torch.is_autocast_enabled("cpu") == (name == "bf16")
            assert tf32_flags() == start and not torch.is_autocast_enabled("cpu")
            with pytest.raises(ZeroDivisionError), precision(name):
                1 / 0  # noqa: B018
            assert tf32_flags() == start and not torch.is_autocast_enabled("cpu")
    finally:
        _set_flags(*saved)


def test_precision_names():
    assert check_precision(" BF16 ") == "bf16"
    with pytest.raises(UserError, match="--precision fp16"):
        check_precision("fp16")


# Measured on CPU (this test's model and input, torch 2.14): Spearman of the bf16 map with the fp32 map per
# image, vanilla 0.980-0.993, SmoothGrad 0.994-0.996, IG 0.997, Grad-CAM 0.997-0.9996 (occlusion only
# 0.83-0.94: score differences lose bf16's few digits; see the README).
@pytest.mark.parametrize("method,opts,floor", [("vanilla", {}, 0.95), ("smoothgrad", {"n_samples": 8}, 0.98),
                                               ("integrated_gradients", {"n_steps": 8}, 0.98),
                                               ("gradcam", {}, 0.98)])
def test_bf16_maps_are_float32_and_rank_like_fp32(method, opts, floor):
    model = TinyCNN().eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = model(x).argmax(1)
    fn = METHODS[method].fn
    with precision("fp32"):
        ref = fn(model, x, target, **opts)
    with precision("bf16"):
        low = fn(model, x, target, **opts)
    assert low.dtype == torch.float32
    assert not torch.equal(low, ref)  # autocast did run in bf16
    for a, b in zip(ref, low, strict=True):
        assert spearmanr(a.flatten().numpy(), b.flatten().numpy())[0] >= floor


# -------------------------------------------------------------------------------------------- pass sizes


def test_cuda_rule_fills_half_the_free_memory_within_the_work_and_the_cap():
    gib = 2 ** 30
    assert cuda_copies(80 * gib, 2 * gib, work=100, cap=4096) == 20  # half of 80 GiB at 2 GiB a copy
    assert cuda_copies(80 * gib, 2 * gib, work=15, cap=4096) == 15  # no more than the work left
    assert cuda_copies(80 * gib, 1, work=10_000, cap=128) == 128  # the cap
    assert cuda_copies(1 * gib, 4 * gib, work=10, cap=4096) == 1  # at least one copy
    assert cuda_copies(0, 0, work=3, cap=4096) == 1


def test_cuda_passes_probe_one_copy_then_fill_the_budget(monkeypatch):
    """The CUDA branch of `passes` with a mocked memory budget: 1 copy, then copies of 100 MB in 1 GB free."""
    mb = 10 ** 6
    state = {"allocated": 50 * mb, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * mb, 80_000 * mb))

    def run(work: int, key: tuple | None = None, probe_peak: int = 150 * mb) -> list[tuple[int, int]]:
        got = []
        for rng in passes(work, None, 2, torch.device("cuda"), key=key):
            if not got:
                state["peak"] = probe_peak  # the probe pass took 100 MB above what was allocated before it
            got.append(rng)
        return got

    monkeypatch.setattr(_common, "_BYTES_PER_COPY", {})
    with record_passes() as log:
        got = run(40)
    assert got == [(0, 1), (1, 6), (6, 11), (11, 16), (16, 21), (21, 26), (26, 31), (31, 36), (36, 40)]
    assert log == [PassChoice("cuda-memory", 2, 5)] and log[0].samples == 10
    assert run(12, key=("model", "smoothgrad")) == [(0, 1), (1, 6), (6, 11), (11, 12)]  # probes, remembers
    # a probe now would say nothing fits: the remembered 100 MB per copy is used, with no probe pass
    assert run(12, key=("model", "smoothgrad"), probe_peak=10 ** 12) == [(0, 5), (5, 10), (10, 12)]
    monkeypatch.setattr(_common, "PASS_CAP", 6)  # 3 copies of 2 images
    assert run(7) == [(0, 1), (1, 4), (4, 7)]


def test_cpu_picks_the_cpu_rule_and_an_explicit_batch_size_wins(tiny, x_small):
    target = torch.tensor([0, 1])
    with record_passes() as log:
        METHODS["smoothgrad"].fn(tiny, x_small, target, n_samples=4)
        METHODS["smoothgrad"].fn(tiny, x_small, target, n_samples=4, batch_size=5)
        METHODS["rise"].fn(tiny, x_small, target, n_masks=4)
    assert log == [PassChoice("cpu", 2, 1), PassChoice("explicit", 2, 2), PassChoice("cpu", 2, 1)]
    assert describe_passes(log) == {"rule": ["cpu", "explicit"], "samples_per_pass": [2, 4]}
    assert describe_passes(log[:1]) == {"rule": "cpu", "samples_per_pass": [2]} and describe_passes([]) is None
    assert list(passes(5, None, 2, torch.device("cpu"))) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


# ------------------------------------------------------------------------------------- the same map anywhere


SEEDED = [("smoothgrad", {"n_samples": 6, "noise_level": 0.2, "seed": 3}),
          ("rise", {"n_masks": 24, "grid": 4, "seed": 3})]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))])
@pytest.mark.parametrize("method,opts", SEEDED)
def test_equal_seeds_give_equal_maps_on_any_device_and_pass_size(tiny_smooth, method, opts, device):
    """float32 on the device at several pass sizes against float64 on the CPU (a second code path)."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([0, 2])
    fn = METHODS[method].fn
    ref = fn(tiny_smooth.double(), x.double(), target, **opts).float()
    tiny_smooth.float()
    dev = choose_device(device)
    model = TinyCNN(act=torch.nn.Softplus).eval().to(dev)
    torch.manual_seed(1234)  # the global generators play no part
    if CUDA:
        torch.cuda.manual_seed_all(1234)
    scale = ref.abs().max()
    tol = 1e-4 if dev.type == "cpu" else 1e-3  # not measured on a GPU in this session
    for batch_size in (None, 2, 6, 1000):
        with precision("fp32", dev):
            got = fn(model, x.to(dev), target.to(dev), **opts, batch_size=batch_size).cpu()
        assert (got - ref).abs().max() <= tol * scale, (batch_size, float((got - ref).abs().max() / scale))
    one = fn(model, x[1:].to(dev), target[1:].to(dev), **opts).cpu()  # alone, not beside image 0
    assert (one - ref[1:]).abs().max() <= tol * scale


def test_randomise_draws_on_the_cpu_generator_and_leaves_the_global_state():
    a, b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3)
    state = torch.get_rng_state()
    randomise(a, 7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)
    randomise(b, 7)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    if CUDA:
        c = torch.nn.Conv2d(3, 4, 3).cuda()
        randomise(c, 7)
        assert c.weight.is_cuda and torch.equal(c.weight.cpu(), a.weight)
