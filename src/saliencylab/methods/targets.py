"""Resolve what the user asked to explain into a class index per image."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch
from torch import nn

from saliencylab.errors import UserError
from saliencylab.methods._common import eval_mode

Target = str | int | Sequence[int] | torch.Tensor


def resolve_target(model: nn.Module, x: torch.Tensor, target: Target = "predicted",
                   class_names: Sequence[str] | None = None) -> torch.Tensor:
    """Turn a target spec into a LongTensor[B].

    Args:
        target: 'predicted' (argmax in eval mode; for one logit, logit > 0), a class index, a class name
            (case-insensitive; or words of exactly one class name, see `class_matches`), 'positive' /
            'negative' for a single-logit binary model, or one index per image.
        class_names: the model's class names, for names and range checks.
    """
    b = x.shape[0]
    if isinstance(target, torch.Tensor):
        return target.to(device=x.device, dtype=torch.long).reshape(b)
    if isinstance(target, Sequence) and not isinstance(target, str):
        return torch.as_tensor(list(target), dtype=torch.long, device=x.device).reshape(b)
    if target == "predicted":
        with eval_mode(model), torch.no_grad():
            logits = model(x)
        if logits.shape[1] == 1:
            return (logits[:, 0] > 0).long()
        return logits.argmax(dim=1)
    k = len(class_names) if class_names is not None else None
    if isinstance(target, int) or (isinstance(target, str) and target.lstrip("-").isdigit()):
        idx = int(target)
        if k is not None and not 0 <= idx < k:
            raise UserError(f"--target {idx} is out of range: the model has classes 0..{k - 1}")
        return torch.full((b,), idx, dtype=torch.long, device=x.device)
    if target in ("positive", "negative"):
        if k != 2:
            raise UserError(f"--target {target} needs a binary model; this one has {k} classes")
        return torch.full((b,), int(target == "positive"), dtype=torch.long, device=x.device)
    if class_names is None:
        raise UserError(f"--target '{target}': class names are unknown for this model; give a class index")
    lowered = [c.lower() for c in class_names]
    if target.lower() in lowered:
        return torch.full((b,), lowered.index(target.lower()), dtype=torch.long, device=x.device)
    found = class_matches(target, class_names)
    if len(found) == 1:
        return torch.full((b,), found[0], dtype=torch.long, device=x.device)
    if found:
        listed = ", ".join(f"'{class_names[i]}' ({i})" for i in found[:12])
        more = f" and {len(found) - 12} more" if len(found) > 12 else ""
        raise UserError(f"--target '{target}' matches {len(found)} classes: {listed}{more}; give one of these "
                        "names (quoted) or its index")
    close = difflib.get_close_matches(target.lower(), lowered, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(class_names[lowered.index(c)]) for c in close)}?" if close else ""
    raise UserError(f"unknown class name '{target}'.{hint} Use 'predicted', a class index or an exact class name")


def _words(text: str) -> list[str]:
    return re.findall(r"[0-9a-z]+", text.lower())


def class_matches(name: str, class_names: Sequence[str]) -> list[int]:
    """Indices of the classes that contain every word of `name` as a word ('cat' -> 'tiger cat', 'Egyptian
    cat', ...); if none, those that contain `name` inside a word ('cat' -> 'polecat'); case-insensitive."""
    words = _words(name)
    if not words:
        return []
    whole = [i for i, c in enumerate(class_names) if set(words) <= set(_words(c))]
    if whole:
        return whole
    part = name.strip().lower()
    return [i for i, c in enumerate(class_names) if part in c.lower()]
