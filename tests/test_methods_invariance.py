"""A map depends on the image, the model, the target and the options only: not on the pass size, not on the
other images of the batch, not on the input's dtype, and not on the model's train/eval state. For every
registered method, seeded ones included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TinyCNN
from saliencylab.methods import METHODS

# options that keep sampling methods fast (and windows that fit 13 px)
FAST = {"smoothgrad": {"n_samples": 5}, "integrated_gradients": {"n_steps": 5},
        "occlusion": {"window": 6, "stride": 5}, "rise": {"n_masks": 12, "grid": 3}}
# methods that need a vision transformer (family 'attention') are tested on one elsewhere
ON_CNN = [n for n, s in METHODS.items() if s.family != "attention"]
SEEDED = [n for n in ON_CNN if "seed" in METHODS[n].options()]
TARGET = torch.tensor([0, 2, 1])


def _run(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, **extra) -> torch.Tensor:
    return METHODS[name].fn(model, x, target, **{**FAST.get(name, {}), **extra})


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """Equal up to `rtol` of the larger map's scale (maps of different methods differ by orders of magnitude)."""
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def model64() -> nn.Module:
    """A smooth network in float64: any difference beyond rounding is a real dependence."""
    return TinyCNN(act=nn.Softplus).double().eval()


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    # 15 x 13: not square, and not a multiple of 16 values (torch's normal sampler works in blocks of 16)
    return torch.rand(3, 3, 15, 13, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@pytest.mark.parametrize("name", [n for n in ON_CNN if "batch_size" in METHODS[n].options()])
def test_map_does_not_depend_on_pass_size(name, model64, x64):
    ref = _run(name, model64, x64, TARGET)
    assert ref.abs().max() > 0
    for batch_size in (1, 2, 7, 1000):
        _close(_run(name, model64, x64, TARGET, batch_size=batch_size), ref, 1e-10)


@pytest.mark.parametrize("name", ON_CNN)
def test_map_of_an_image_does_not_depend_on_the_other_images(name, model64, x64):
    together = _run(name, model64, x64, TARGET)
    order = [2, 0, 1]
    shuffled = _run(name, model64, x64[order], TARGET[order])
    for i in range(3):
        alone = _run(name, model64, x64[i:i + 1], TARGET[i:i + 1])
        assert alone.abs().max() > 0
        _close(together[i:i + 1], alone, 1e-10)
        _close(shuffled[order.index(i)][None], alone, 1e-10)


@pytest.mark.parametrize("name", ON_CNN)
def test_float32_and_float64_inputs_give_the_same_map(name, x64):
    """The CPU stand-in for 'the same map on every device': the two code paths must make the same random
    draws, so their maps differ by float32 rounding only (a different draw differs by O(1))."""
    m64 = TinyCNN(act=nn.Softplus).double().eval()
    m32 = TinyCNN(act=nn.Softplus).eval()
    a = _run(name, m64, x64, TARGET)
    b = _run(name, m32, x64.float(), TARGET)
    assert a.dtype == torch.float64 and b.dtype == torch.float32
    _close(b.double(), a, 1e-4)


@pytest.mark.parametrize("name", SEEDED)
def test_seed_fixes_the_map_and_changes_it(name, model64, x64):
    a = _run(name, model64, x64, TARGET, seed=11)
    torch.testing.assert_close(_run(name, model64, x64, TARGET, seed=11), a, rtol=0, atol=0)
    other = _run(name, model64, x64, TARGET, seed=12)
    assert (other - a).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("name", SEEDED)
def test_seeded_draws_do_not_touch_the_global_generator(name, model64, x64):
    state = torch.random.get_rng_state()
    _run(name, model64, x64, TARGET)
    assert torch.equal(torch.random.get_rng_state(), state)


class BNNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> Dropout -> conv -> ReLU -> mean pool -> linear, with non-trivial BN stats."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.bn.running_mean.copy_(torch.randn(6, generator=g) * 0.2)
            self.bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
        self.cam_layer = "act2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act1(self.bn(self.conv1(x))))
        return self.fc(self.act2(self.conv2(h)).mean((2, 3)))


@pytest.mark.parametrize("name", ON_CNN)
def test_train_mode_model_with_frozen_batchnorm(name, x64):
    """Fine-tuning setups keep BatchNorm frozen (eval) inside a model in train mode. Every method computes in
    eval mode (no dropout, running stats) and hands back every submodule's own mode and every buffer."""
    model = BNNet().double()
    reference = _run(name, BNNet().double().eval(), x64, TARGET)
    model.train()
    model.bn.eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    out = _run(name, model, x64, TARGET)
    _close(out, reference, 1e-10)
    modes = {n: m.training for n, m in model.named_modules()}
    assert modes == {n: n != "bn" for n in modes}, modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    if name == "gradcam":  # without a named CAM layer the method searches for one: also mode-neutral
        model.cam_layer = None
        _close(_run(name, model, x64, TARGET), reference, 1e-10)
        assert {n: m.training for n, m in model.named_modules()} == modes


def test_spectral_residual_keeps_float64():
    """Against a float64 reference with NumPy's FFT and SciPy's filter for the spectral steps."""
    from scipy.ndimage import uniform_filter

    from saliencylab.methods.spectral import spectral_residual
    from saliencylab.ops import gaussian_blur, resize

    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = spectral_residual(None, x, None, scale=32, sigma=2.0)
    assert out.dtype == torch.float64
    small = resize(x.mean(1, keepdim=True), (32, 27)).numpy()
    spec = np.fft.fft2(small, axes=(2, 3))
    log_amp = np.log(np.maximum(np.abs(spec), 1e-8))
    residual = log_amp - uniform_filter(log_amp, size=(1, 1, 3, 3), mode="nearest")
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spec)), axes=(2, 3))) ** 2
    ref = resize(gaussian_blur(torch.from_numpy(sal), 2.0), (48, 40))[:, 0]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ON_CNN)
def test_same_map_on_cpu_and_cuda(name, x64):
    """Issue 10: one seed, the same map on every device (float64 on both: no TF32, rounding only)."""
    cpu = _run(name, TinyCNN(act=nn.Softplus).double().eval(), x64, TARGET)
    gpu = _run(name, TinyCNN(act=nn.Softplus).double().eval().cuda(), x64.cuda(), TARGET.cuda())
    assert gpu.device.type == "cuda"
    _close(gpu.cpu(), cpu, 1e-9)
