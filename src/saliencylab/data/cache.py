"""A decoded image cache: every image read once, resized, and kept as uint8, so that training, evaluation
and the audit feed the model from memory (`to_batch`) without decoding twice."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from saliencylab.data.datasets import Dataset, Record
from saliencylab.errors import UserError

_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def decode_cache(ds: Dataset, records: Sequence[Record], size: int, workers: int = 0,
                 progress: bool | None = None, *, channels: int = 1) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode every image once, resized to (size, size), into uint8 (N, size, size) (grey, `channels` 1) or
    (N, size, size, 3) (colour, `channels` 3; grey images are repeated).

    Unreadable files are listed as (file, reason) instead of stopping the run; their rows stay zero.
    """
    from multiprocessing import get_context

    from tqdm import tqdm

    shape = (len(records), size, size) if channels == 1 else (len(records), size, size, 3)
    out = np.zeros(shape, dtype=np.uint8)
    bad: list[tuple[str, str]] = []
    jobs = [(str(Path(ds.root) / r.file), size, channels) for r in records]

    n_workers = workers or os.cpu_count() or 1
    with tqdm(total=len(jobs), unit="img", desc="decode", disable=None if progress is None else not progress) as bar:
        if n_workers == 1 or len(jobs) < 64:
            for i, (arr, err) in enumerate(map(_decode_one, jobs)):
                _store(out, bad, i, arr, err, records)
                bar.update()
        else:
            from saliencylab.runtime import worker_init

            with get_context("fork").Pool(n_workers, initializer=worker_init) as pool:
                for i, (arr, err) in enumerate(pool.imap(_decode_one, jobs, chunksize=32)):
                    _store(out, bad, i, arr, err, records)
                    bar.update()
    return out, bad


def _store(out: np.ndarray, bad: list, i: int, arr: np.ndarray | None, err: str | None,
           records: Sequence[Record]) -> None:
    if arr is None:
        bad.append((records[i].file, err or "unreadable"))
    else:
        out[i] = arr


def _decode_one(job: tuple[str, int, int]) -> tuple[np.ndarray | None, str | None]:
    from PIL import Image

    from saliencylab.data.images import load_image

    path, size, channels = job
    try:
        px = load_image(path).pixels
    except UserError as err:
        return None, str(err)
    except OSError as err:  # a file that vanished or cannot be opened after listing
        return None, f"{type(err).__name__}: {err}"
    if px.ndim == 3 and channels == 1:
        px = px @ _GREY
    elif px.ndim == 2 and channels != 1:
        px = np.repeat(px[..., None], 3, axis=2)
    img = Image.fromarray((np.clip(px, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8), None


def to_batch(cache: np.ndarray, idx: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 cache rows -> float x[B, channels, H, W] in [0, 1] (grey rows are repeated for 3 channels,
    colour rows are averaged to grey for 1)."""
    x = torch.from_numpy(cache[idx]).float().div_(255.0)
    if x.ndim == 4:  # (B, H, W, 3) colour
        x = x.permute(0, 3, 1, 2)
        return x if channels == 3 else (x * torch.from_numpy(_GREY).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = x.unsqueeze(1)
    return x.expand(-1, channels, -1, -1) if channels > 1 else x
