"""Where models run: one place that turns `--device auto|cpu|cuda` into a torch.device."""

from __future__ import annotations

import torch
from torch import nn

from saliencylab.errors import UserError

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DEVICE_HELP = "auto (CUDA when available), cpu or cuda (cuda:N for one GPU)"


def choose_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:N' as named.

    Raises:
        UserError: one line with the fix, when CUDA is asked for and PyTorch sees no GPU, or the name is no device.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: saliencylab runs on cpu or cuda; use auto, cpu or cuda")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} GPU(s); use cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}")
    return device


def module_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without any)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")
