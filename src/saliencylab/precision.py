"""Numeric precision of our model calls: `--precision fp32|tf32|bf16` as one context manager.

- fp32: full float32. PyTorch's default lets cuDNN convolutions use TF32 on Ampere and later GPUs (a 10-bit
  mantissa), which made the vanilla gradient on an H200 correlate only 0.990 with the CPU's (issue 10); inside
  `precision("fp32")` TF32 is off for matmuls and convolutions.
- tf32: the same calls with TF32 on for matmuls and convolutions (faster on a GPU; no effect on a CPU).
- bf16: `torch.autocast` with bfloat16 for the forward pass (the backward pass follows the forward's types);
  inputs, gradients w.r.t. the input and the maps the methods return stay float32.

The global flags are restored on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from saliencylab.errors import UserError

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
PRECISION_HELP = "fp32 (full float32, TF32 off), tf32 (TF32 matmuls/convolutions on a GPU) or bf16 (autocast)"


def check_precision(name: str) -> str:
    """The name, lower-cased, or a one-line UserError naming --precision and the choices."""
    key = str(name).strip().lower()
    if key not in PRECISIONS:
        raise UserError(f"--precision {name}: use one of {', '.join(PRECISIONS)}")
    return key


def tf32_flags() -> tuple[bool, bool, str]:
    """(matmul allow_tf32, cuDNN allow_tf32, float32 matmul precision): the global state we change."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


def _set_tf32(flags: tuple[bool, bool, str]) -> None:
    matmul, cudnn, matmul_precision = flags
    torch.set_float32_matmul_precision(matmul_precision)  # also sets the matmul flag: set that one after it
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def precision(name: str = "fp32", device: torch.device | str = "cpu") -> Iterator[str]:
    """Run the body at a precision; yields the checked name.

    Args:
        name: 'fp32', 'tf32' or 'bf16' (see the module's docstring).
        device: where the model runs; autocast is set up for its type ('cpu' or 'cuda').
    """
    key = check_precision(name)
    kind = torch.device(device).type
    saved = tf32_flags()
    tf32 = key == "tf32"
    try:
        _set_tf32((tf32, tf32, "high" if tf32 else "highest"))
        autocast = (torch.autocast(kind, dtype=torch.bfloat16) if key == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            yield key
    finally:
        _set_tf32(saved)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """float32 for a bfloat16 / float16 tensor (an autocast output); other dtypes (float64 included) unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
