"""Plumbing shared by the methods: scoring a target, gradients w.r.t. the input, mode restoring, hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from saliencylab.ops import eval_mode  # noqa: F401  (re-exported: the methods' one mode guard)


def target_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The scalar each method explains, per sample: logits[B, K], target[B] -> [B].

    For a single-logit binary head (K = 1), target 1 is the logit itself and target 0 its negation
    (the logit of the negative class under a sigmoid).
    """
    if logits.ndim != 2:
        raise ValueError(f"the model must return logits [B, K]; got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        sign = torch.where(target.to(logits.device) == 1, 1.0, -1.0).to(logits.dtype)
        return logits[:, 0] * sign
    return logits.gather(1, target.to(logits.device).view(-1, 1))[:, 0]


def target_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax (or sigmoid, for one logit) probability of the target class: [B, K], [B] -> [B]."""
    if logits.shape[1] == 1:
        return torch.sigmoid(target_score(logits, target))
    return logits.softmax(dim=1).gather(1, target.to(logits.device).view(-1, 1))[:, 0]


def input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d target_score / d x for x[N, C, *spatial], on a detached copy: the caller's x and params stay untouched."""
    x = fast_layout(x.detach()).requires_grad_(True)
    with torch.enable_grad():
        score = target_score(model(x), target).sum()
        (grad,) = torch.autograd.grad(score, x)
    return grad


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last copy of a 4D batch (about 14% faster convolutions on CPU, measured); others unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(total) in steps of `size`."""
    size = max(1, int(size))
    for start in range(0, total, size):
        yield start, min(start + size, total)


def per_pass(batch_size: int | None, images: int) -> int:
    """How many perturbed copies of the whole batch fit in one forward pass of at most `batch_size` samples.

    None means one copy of the batch per pass: on a CPU, small passes were the fastest measured.
    """
    if batch_size is None:
        return 1
    return max(1, int(batch_size) // max(1, images))


def normal_draws(seed: int, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """Standard normal float32 tensors of `shape`, one per `next`, from a CPU generator seeded with `seed`.

    One draw per call, so the k-th tensor is the same however a caller groups the draws into passes, and
    the same on every device (move it there). Draw in sample order.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    while True:
        yield torch.randn(shape, generator=gen, dtype=torch.float32)


def spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes of x[B, C, *spatial]."""
    return tuple(range(2, x.ndim))


def layer_by_name(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        import difflib

        from saliencylab.errors import UserError

        close = difflib.get_close_matches(name, list(modules), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"the model has no layer '{name}'.{hint}")
    return modules[name]


@contextlib.contextmanager
def capture_output(layer: nn.Module, *, cut: bool = False, name: str = "") -> Iterator[dict[str, Any]]:
    """Record the layer's forward output in the yielded dict under 'out'; the hook is removed on exit.

    Args:
        cut: record a detached copy that requires grad (a leaf), so that a gradient w.r.t. the layer's
            output stops there (CAM methods need nothing below the layer). The rest of the network gets a
            clone of that leaf, not the leaf itself: its in-place operations (`F.relu(..., inplace=True)`,
            `out += identity`) act on the clone, and the recorded output stays the layer's true output
            (copied, so that not even a parent holding an alias of it can change it).
        name: the layer's name, for error messages.
    """
    from saliencylab.errors import UserError

    store: dict[str, Any] = {}
    label = f"the CAM layer '{name}'" if name else "the CAM layer"

    def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
        if "out" in store:
            raise UserError(f"{label} runs more than once per forward pass; name another layer "
                            "(e.g. --set gradcam.layer=NAME)")
        if not isinstance(out, torch.Tensor):
            raise UserError(f"{label} returns a {type(out).__name__}, not a tensor; name another layer "
                            "(e.g. --set gradcam.layer=NAME)")
        if not cut:
            store["out"] = out
            return out
        leaf = out.detach().clone().requires_grad_(True)
        store["out"] = leaf
        return leaf.clone()  # a non-leaf: in-place ops downstream must not touch the leaf

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
