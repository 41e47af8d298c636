"""Shared fixtures: tiny hand-weighted models, a random-weight ResNet-18, seeded inputs. No network."""

from __future__ import annotations

import os

# Under pytest-xdist each worker gets its share of the cores: torch's default (every core per process) makes
# the workers' threads spin against each other, many times slower on a small or busy machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_threads))

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from torch import nn

from saliencylab.models import Normalized


class TinyCNN(nn.Module):
    """conv(3->4, 3x3) -> ReLU -> conv(4->4, 3x3) -> ReLU -> mean pool -> linear(4->3), weights from a seed.

    `act` may be Softplus for a smooth network (tight Integrated Gradients completeness).
    """

    def __init__(self, act: type[nn.Module] = nn.ReLU, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = act()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = act()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.cam_layer = "act2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))


class LinearModel(nn.Module):
    """logits[k] = sum(w[k] * x) + b[k]: gradients, IG and occlusion have closed forms."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(w)  # (K, C, H, W)
        self.b = nn.Parameter(torch.zeros(w.shape[0]) if b is None else b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", x, self.w) + self.b


@pytest.fixture
def tiny() -> TinyCNN:
    return TinyCNN().eval()


@pytest.fixture
def tiny_smooth() -> TinyCNN:
    return TinyCNN(act=nn.Softplus).eval()


@pytest.fixture(scope="session")
def resnet18() -> Normalized:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    return Normalized(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), cam_layer="net.layer4").eval()


@pytest.fixture
def x_small() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def x_resnet() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="session")
def lite0():
    from saliencylab.models import load_model

    return load_model("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def cxr_data(tmp_path_factory):
    """60 small phantoms (64 px, lesions twice as strong, markers on 90% of COVID-like and 10% of normal)."""
    from saliencylab.data.phantoms import PhantomConfig, generate

    root = tmp_path_factory.mktemp("cxr") / "phantoms"
    generate(PhantomConfig(n_covid=30, n_normal=30, size=64, seed=0, lesion_scale=2.0, workers=1,
                           marker_rate={"COVID": 0.9, "Normal": 0.1}), root, progress=False)
    return root


@pytest.fixture(scope="session")
def cxr_run(cxr_data, tmp_path_factory):
    """A cxr_cnn trained for 3 epochs on `cxr_data`."""
    from saliencylab.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(data=str(cxr_data), epochs=3, image_size=64, batch_size=8, lr=2e-3, workers=1)
    train(cfg, out, progress=False, log=lambda *_: None)
    return out


def headless_chromium(*flags: str, window: str = "1280,900", performance_log: bool = False):
    """Debian's Chromium under Selenium, headless, with the flags that keep it off the network (no background
    requests, no component updates); skips the test when chromium or chromedriver is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chrome
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={window}", *flags):
        opts.add_argument(flag)
    if performance_log:
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def edge_detector(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A 'method' that ignores the model: the input's gradient magnitude (an edge map), [B, H-1, W-1].
    Randomisation checks must fail it."""
    gx = x[..., :, 1:] - x[..., :, :-1]
    gy = x[..., 1:, :] - x[..., :-1, :]
    return (gx[..., :-1, :].abs() + gy[..., :, :-1].abs()).sum(1)


def normalised_reference(net: nn.Module, x: torch.Tensor, target: torch.Tensor, mean: tuple[float, ...],
                         std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The original net's logits on (x - mean) / std, and d logit[target] / d pixels by torch autograd: what a
    loaded copy with the normalisation inside must reproduce."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    x = x.clone().requires_grad_(True)
    logits = net.eval()((x - m) / s)
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), x)
    return logits.detach(), grad
