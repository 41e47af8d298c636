"""SHA-256 keys of what a result depends on: JSON-able descriptions, file bytes and module weights.

One place for the hashes that decide whether finished work can be reused (explain's manifests, the audit's
shards) and for the report's file checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only where module weights are hashed (the report's checksums do not need it)
    import torch


def digest(obj: Any) -> str:
    """SHA-256 of a JSON-able description (keys sorted; anything else by its str())."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def update_with_file(h: Any, path: str | os.PathLike) -> None:
    """Feed a file's bytes to hash object `h`, 1 MiB at a time (OSError when it cannot be read)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def file_digest(path: str | os.PathLike | None) -> str:
    """SHA-256 of a file's bytes; '' for no file or an unreadable one."""
    if not path:
        return ""
    h = hashlib.sha256()
    try:
        update_with_file(h, path)
    except OSError:
        return ""
    return h.hexdigest()


def update_with_state(h: Any, module: torch.nn.Module) -> None:
    """Feed every tensor of a module's state (weights and buffers) with its name, dtype and shape to `h`."""
    import torch

    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (see `update_with_state`)."""
    h = hashlib.sha256()
    update_with_state(h, module)
    return h.hexdigest()
