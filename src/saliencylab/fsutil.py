"""Atomic file writes, staged output folders and up-front checks of output paths: an interrupted or
failed run never leaves a half file, and a path that cannot be written is refused before any work."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saliencylab.errors import UserError


def _first_existing(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists (the folder a new path would be made in)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_output_dir(path: str | os.PathLike, flag: str, *, beside: bool = False) -> Path:
    """Refuse, before any work, an output folder that cannot be created or written.

    Nothing is created. `beside`: the command also writes next to the folder (staging), so its parent
    must be writable too.

    Raises:
        UserError: one line naming `flag`, the path and the fix.
    """
    path = Path(path)
    if os.path.lexists(path):
        if path.is_symlink() and not path.exists():
            raise UserError(f"{flag} '{path}' is a broken or looping symbolic link; remove it or choose another "
                            "folder")
        if not path.is_dir():
            raise UserError(f"{flag} '{path}' is an existing file, not a folder; choose a folder path "
                            "(or move the file away)")
        if not _writable(path):
            raise UserError(f"{flag} '{path}' is a folder you cannot write to; choose another folder")
        if beside and not _writable(path.parent):
            raise UserError(f"{flag} '{path}': its parent folder '{path.parent}' is not writable (outputs are "
                            "staged beside the folder); choose a folder in a writable place")
        return path
    _check_creatable(path, flag)
    return path


def _check_creatable(path: Path, flag: str) -> None:
    """`path` does not exist: its nearest existing ancestor must be a writable folder."""
    base = _first_existing(path.parent)
    if not base.is_dir():
        kind = "a broken or looping symbolic link" if base.is_symlink() and not base.exists() else "a file"
        raise UserError(f"{flag} '{path}': '{base}' is {kind}, so nothing can be made below it; "
                        "choose another path")
    if not _writable(base):
        raise UserError(f"{flag} '{path}': cannot create it, '{base}' is not writable; choose a place you can "
                        "write to")


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output file path that is a folder or lies where nothing can be written.

    Raises:
        UserError: one line naming `flag`, the path and the fix.
    """
    path = Path(path)
    if os.path.lexists(path):
        if path.is_dir():
            raise UserError(f"{flag} '{path}' is a folder; give a file name, e.g. {path / 'out.json'}")
        if path.is_symlink() and not path.exists():
            raise UserError(f"{flag} '{path}' is a broken or looping symbolic link; remove it or choose another "
                            "file name")
    if str(path).endswith(os.sep) or path.name in ("", ".", ".."):
        raise UserError(f"{flag} '{path}' names a folder; give a file name, e.g. {path / 'out.json'}")
    parent = path.parent
    if os.path.lexists(parent) and parent.is_dir():
        if not _writable(parent):
            raise UserError(f"{flag} '{path}': its folder '{parent}' is not writable; choose a place you can "
                            "write to")
        return path
    _check_creatable(path, flag)
    return path


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _remove_stale(folder: Path, prefix: str) -> None:
    """Remove `<prefix><pid>.*` entries in `folder` whose process is gone (left by a killed run of ours)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _new_file_mode(path: Path) -> int:
    """The mode a plain `open(path, "w")` would give: the existing file's, or 0o666 less the umask."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return 0o666 & ~_umask()


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; return the folders that were created (outermost first)."""
    made = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made[::-1]


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets the mode an ordinary write would give (the umask, or the replaced file's mode). The
    temporary name carries our process id, so a later write cleans up what a killed process left.
    """
    path = Path(path)
    made = _make_parents(path.parent)
    prefix = f".{path.name}.tmp-"
    _remove_stale(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    ok = False
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
        ok = True
    finally:
        tmp.unlink(missing_ok=True)
        if not ok:
            _remove_empty(made)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Collect a command's outputs in a hidden folder and merge them into `final` only on success.

    If the block raises (a bad input, Ctrl-C), the staging folder is removed and `final` is untouched,
    so a failed run writes no partial output (nor the parent folders it had to make). The staging
    folder's name carries our process id: staging folders left beside `final` by a killed run (its
    process gone) are removed when the next run starts.
    """
    final = Path(final)
    made = _make_parents(final.parent)
    prefix = f".{final.name}.staging."
    _remove_stale(final.parent, prefix)
    ok = False
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", dir=final.parent))
        try:
            yield stage
            final.mkdir(parents=True, exist_ok=True)
            for root, _dirs, files in os.walk(stage):
                rel = Path(root).relative_to(stage)
                (final / rel).mkdir(parents=True, exist_ok=True)
                for name in files:
                    os.replace(Path(root) / name, final / rel / name)
            ok = True
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    finally:
        if not ok:
            _remove_empty(made)


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
