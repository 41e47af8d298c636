"""Dataset-scale `explain`: fixed shards, per-image atomic outputs, a manifest per shard, resume, torchrun.

The input list is cut into fixed shards of `shard_size` images (the cut depends only on the list, never on
the number of processes). Each image's maps and overlays are written atomically as soon as the image is done,
and its rows (one per method) are appended to the shard's manifest (`manifest/shard-NNNNN.jsonl`). A row's
key hashes everything that produced its files: the model's weights, the method and its options, the target,
the input file's bytes and the output settings. Re-running the same command skips every row whose key is in
the manifest and whose files exist; a changed input or option recomputes only those rows. Batches are fixed
slices of a shard, so a resumed batch is computed on exactly the same tensor as in an uninterrupted run
(bit-identical maps). Under torchrun, rank r takes shards r, r + world, ... (`saliencylab.dist`) and rank 0
writes the summaries from the manifests once every rank is done.

Layout of an output folder::

    job.json                      what the folder holds (model, methods, options, shard size)
    manifest/shard-00000.jsonl    one row per image and method (or per skipped input)
    <name>/image.json             source, image size, map grid and target of one image
    <name>/<method>.npy           the raw map at the model's input resolution (load_map() resizes it)
    <name>/<method>.png           the overlay, at most `overlay_side` pixels on the long side
    maps/shard-00000.h5           instead of the .npy/.png files with --outputs hdf5
    figure.png, results.json      summaries written from the manifests
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliencylab import dist
from saliencylab.data.images import LoadedImage, load_image, split_frame
from saliencylab.errors import UserError
from saliencylab.fsutil import _json_default, _remove_stale, atomic_path, write_json, write_npy, write_png, write_text
from saliencylab.hashing import digest, update_with_file, update_with_state
from saliencylab.methods import MethodSpec, resolve_target
from saliencylab.models.registry import Classifier
from saliencylab.ops import resize

JOB_KIND = "saliencylab-explain"
JOB_VERSION = 2
OUTPUTS = ("npy,png", "npy", "hdf5")
MAP_DTYPES = ("float32", "float16")
HDF5_HINT = "pip install saliencylab[hdf5]"


@dataclass(frozen=True)
class StreamConfig:
    """How a large explain run is cut, written and resumed.

    Attributes:
        shard_size: images per shard (the unit of work per rank and of the manifest files).
        outputs: 'npy,png' (maps and overlays), 'npy' (maps only) or 'hdf5' (one chunked store per shard).
        map_dtype: 'float32' or 'float16' for the stored maps.
        workers: threads that decode, render and write beside the model (0: all on the main thread).
        grid: images shown in figure.png (a spread sample of the run).
        force: replace the folder's contents when it holds another job (or anything else).
        resume: the folder must already hold this job (otherwise the same as a fresh run).
        overlay_side: longest side of an overlay PNG in pixels.
        engine: 'local' (this process, or each torchrun rank) or 'ray' (the shards in a Ray Data actor pool).
        actors, gpus_per_actor, cpus_per_actor, ray_address: the Ray pool (see `engines.ray_engine.run_shards`).
    """

    shard_size: int = 64
    outputs: str = "npy,png"
    map_dtype: str = "float32"
    workers: int = 0
    grid: int = 8
    force: bool = False
    resume: bool = False
    overlay_side: int = 512
    engine: str = "local"
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.5
    ray_address: str | None = None

    def check(self) -> None:
        """Raise a one-line UserError for an option out of range."""
        if self.outputs not in OUTPUTS:
            raise UserError(f"--outputs {self.outputs}: use one of {', '.join(OUTPUTS)}")
        if self.map_dtype not in MAP_DTYPES:
            raise UserError(f"--map-dtype {self.map_dtype}: use float32 or float16")
        if self.shard_size < 1:
            raise UserError(f"--shard-size {self.shard_size}: use a positive number of images")
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: use 0 (main thread only) or more")
        if self.outputs == "hdf5":
            require_h5py()
        if self.engine not in ("local", "ray"):
            raise UserError(f"--engine {self.engine}: use local or ray")
        if self.actors < 1 or self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise UserError("--actors must be 1 or more, --gpus-per-actor 0 or more and --cpus-per-actor above 0")


def require_h5py() -> Any:
    """The h5py module, or the one-line error that names the extra to install."""
    try:
        import h5py
    except ImportError:
        raise UserError(f"--outputs hdf5 needs h5py: {HDF5_HINT}") from None
    return h5py


# ----------------------------------------------------------------------------------------------- hashing


def input_hash(source: str) -> str:
    """SHA-256 of the input file's bytes (a bundled sample's file for `sample:<name>`); '' when unreadable."""
    from saliencylab.data.images import _sample_path, split_frame

    try:
        text, frame = split_frame(source)
        path = _sample_path(source.removeprefix("sample:")) if source.startswith("sample:") else Path(text)
        h = hashlib.sha256(b"" if frame is None else f"frame={frame}:".encode())
        update_with_file(h, path)
        return h.hexdigest()
    except (OSError, UserError):
        return ""


def model_hash(clf: Classifier) -> str:
    """SHA-256 of the model's metadata and every tensor of its state (weights and buffers)."""
    h = hashlib.sha256(json.dumps(clf.describe(), sort_keys=True, default=str).encode())
    h.update(json.dumps(list(clf.class_names)).encode())
    update_with_state(h, clf.module)
    return h.hexdigest()


def safe_names(sources: Sequence[str]) -> list[str]:
    """A unique, file-system safe folder name per source, in order (the file stem, then _2, _3...)."""
    taken: set[str] = set()
    out = []
    for s in sources:
        text, frame = split_frame(s)
        stem = s.removeprefix("sample:") if s.startswith("sample:") else Path(text).stem
        stem = stem if frame is None else f"{stem}_frame{frame}"  # as load_image names a frame
        base = re.sub(r"[^\w.-]+", "_", stem).strip("._") or "image"
        if base in ("manifest", "maps"):
            base = f"{base}_image"
        name, i = base, 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        out.append(name)
    return out


# ----------------------------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Job:
    """Everything that decides the outputs of one explain job (the row keys hash parts of it)."""

    model: dict[str, Any]
    model_hash: str
    model_args: dict[str, Any]
    methods: dict[str, dict[str, Any]]  # name -> resolved options
    target: str
    top: int
    display: dict[str, Any]
    outputs: str
    map_dtype: str
    overlay_side: int
    shard_size: int
    batch_size: int
    n_inputs: int
    precision: str = "fp32"
    convergence: dict[str, Any] = field(default_factory=dict)  # asdict(ConvergenceRule): IG steps, checks

    def row_key(self, name: str, method: str | None, ihash: str) -> str:
        """The hash that says a manifest row (image `name`, `method`; None: a skipped input) is current."""
        common = [self.model_hash, self.target, self.top, self.outputs, self.map_dtype, name, ihash,
                  *([] if self.precision == "fp32" else [self.precision])]
        if method is None:
            return digest(["skipped", *common])[:32]
        draw = [self.display, self.overlay_side] if "png" in self.outputs else []
        return digest([*common, method, self.methods[method], draw, self.convergence])[:32]


def manifest_path(out: Path, shard: int) -> Path:
    return out / "manifest" / f"shard-{shard:05d}.jsonl"


def h5_path(out: Path, shard: int) -> Path:
    return out / "maps" / f"shard-{shard:05d}.h5"


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a manifest (a line cut by a kill is dropped)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def _cut(path: Path) -> bool:
    """Whether the file holds a line that a kill cut short (it does not parse, or lacks its newline)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        return True
    try:
        for line in data.splitlines():
            json.loads(line)
    except ValueError:
        return True
    return False


def _append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows with one write() call, so a kill leaves whole lines or none (a cut last line is ignored)."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(_line(r) for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.lseek(fd, 0, os.SEEK_END) > 0:  # a kill mid-line: start a new line so whole rows stay parseable
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_manifest(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_text(path, "".join(_line(r) for r in rows))


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, default=_json_default) + "\n"


def prepare_folder(out: Path, job: Job, cfg: StreamConfig, w: dist.World) -> Job:
    """Check `out` against the job (refuse another job unless --force), write job.json; return the job to run.

    A folder holding this model's explain job is resumed (its shard size is kept so its shards line up); a
    folder holding anything else is refused with one line unless `force`, which empties it first.
    """
    old = _read_job(out)
    kind = _folder_kind(out, old, job.model_hash)
    if kind == "other" and not cfg.force:
        raise UserError(f"--out {out} already holds {_describe_other(out, old)}; pass --force to replace its "
                        "contents, or choose another --out (runs are never mixed in one folder)")
    if cfg.resume and kind != "same":
        raise UserError(f"--resume: '{out}' holds no explain job of this model to resume; drop --resume to "
                        "start one")
    if kind == "same" and old is not None and int(old.get("shard_size", job.shard_size)) != job.shard_size:
        job = Job(**{**asdict(job), "shard_size": int(old["shard_size"])})
    if w.main:
        if kind == "other":
            _empty_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "job.json", {"kind": JOB_KIND, "version": JOB_VERSION, **asdict(job)})
    return job


def _read_job(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / "job.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == JOB_KIND else None


def _folder_kind(out: Path, old: dict[str, Any] | None, model: str) -> str:
    """'fresh' (absent or empty), 'same' (this model's explain job, whatever its options) or 'other'."""
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    same = old is not None and old.get("version") == JOB_VERSION and old.get("model_hash") == model
    return "same" if same else "other"


def _describe_other(out: Path, old: dict[str, Any] | None) -> str:
    if old is not None:
        return f"an explain job of another model ({old.get('model', {}).get('name', '?')})"
    if (out / "results.json").is_file():
        return "the output of an earlier explain run"
    return "other files"


def _empty_folder(out: Path) -> None:
    if not out.is_dir():
        return
    for entry in os.scandir(out):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# ----------------------------------------------------------------------------------------------- outputs


def map_grid_row(img_size: tuple[int, int], map_size: tuple[int, ...]) -> dict[str, Any]:
    """How a stored map lies on the image: bilinear resize, half-pixel centres, from map_size to size."""
    return {"size": list(img_size), "map_size": list(map_size), "resize": "bilinear, align_corners=False"}


def to_image_grid(m: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A stored map (h, w) -> (H, W) float32 on the image grid (bilinear, half-pixel centres)."""
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return resize(t, tuple(int(s) for s in size))[0, 0].numpy()


def load_map(folder: str | os.PathLike, method: str, image: str | None = None) -> np.ndarray:
    """A map of an explain run on its image's full pixel grid, float32 (H, W).

    Args:
        folder: an image's folder (`runs/explain/chelsea`), or the run folder with `image`.
        method: the method name.
        image: the image's folder name, when `folder` is the run folder (required for --outputs hdf5).
    """
    folder = Path(folder)
    if image is not None and (folder / image / "image.json").is_file():
        folder = folder / image
    meta_file = folder / "image.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        return to_image_grid(np.load(folder / f"{method}.npy"), meta["size"])
    if image is not None and (folder / "maps").is_dir():
        h5py = require_h5py()
        for store in sorted((folder / "maps").glob("shard-*.h5")):
            with h5py.File(store, "r") as f:
                if f"{image}/{method}" in f:
                    return to_image_grid(f[f"{image}/{method}"][()], f[image].attrs["size"])
    raise UserError(f"no {method} map for '{image or folder}' in '{folder}'; pass an image folder of an explain "
                    "run (or the run folder and the image's name)")


@dataclass(frozen=True)
class Work:
    """One image's outputs to write (built on the main thread, written on a worker)."""

    index: int
    name: str
    source: str
    ihash: str
    img: LoadedImage
    maps: dict[str, np.ndarray]  # method -> (h, w) float32 at the model's resolution
    seconds: dict[str, float]
    passes: dict[str, Any]  # method -> describe_passes() of its batch (None: not a sampling method)
    keys: dict[str, str]
    base: dict[str, Any]  # the row fields shared by the image's methods


def _thumbnail(a: np.ndarray, longest: int) -> np.ndarray:
    h, w = a.shape[:2]
    if max(h, w) <= longest:
        return a
    size = (max(1, round(h * longest / max(h, w))), max(1, round(w * longest / max(h, w))))
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return (t[0] if a.ndim == 2 else t.permute(1, 2, 0)).clamp(0, 1).numpy()


def write_image(out: Path, job: Job, specs: dict[str, MethodSpec], display: Any, work: Work) -> list[dict[str, Any]]:
    """Write one image's maps (and overlays) atomically; return its manifest rows in method order."""
    from saliencylab.render import overlay

    folder = out / work.name
    dtype = np.float16 if job.map_dtype == "float16" else np.float32
    thumb = _thumbnail(work.img.pixels, job.overlay_side) if "png" in job.outputs else None
    if job.outputs != "hdf5":
        first = next(iter(work.maps.values()))
        meta = {"source": work.source, "name": work.name, "input_hash": work.ihash,
                **map_grid_row(work.img.size, first.shape), **{k: work.base[k] for k in ("target", "top")}}
        write_json(folder / "image.json", meta)
    rows = []
    for method, m in work.maps.items():
        row = {**work.base, "key": work.keys[method], "method": method, "map_size": list(m.shape),
               "seconds": round(work.seconds[method], 6), "passes": work.passes.get(method)}
        if job.outputs == "hdf5":
            row["h5"] = f"{h5_path(Path('.'), row['shard']).as_posix()}#{work.name}/{method}"
        else:
            write_npy(folder / f"{method}.npy", m.astype(dtype))
            row["npy"] = f"{work.name}/{method}.npy"
        if thumb is not None:
            shown = display.render(to_image_grid(m, thumb.shape[:2]), specs[method].display)
            write_png(folder / f"{method}.png", overlay(thumb, shown, alpha=display.alpha, cmap=display.cmap))
            row["png"] = f"{work.name}/{method}.png"
        rows.append(row)
    return rows


def _row_files(out: Path, row: dict[str, Any]) -> list[Path]:
    return [out / row[k] for k in ("npy", "png") if k in row]


# ----------------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Item:
    """One input of a shard: its place in the sorted list, folder name and content hash."""

    index: int
    source: str
    name: str
    ihash: str


def _decode(items: Sequence[Item], skip_bad: bool) -> list[tuple[Item, LoadedImage | None, str]]:
    out = []
    for it in items:
        try:
            out.append((it, load_image(it.source), ""))
        except UserError as err:
            if not skip_bad:
                raise
            out.append((it, None, str(err)))
    return out


def run_shard(clf: Classifier, job: Job, specs: Sequence[MethodSpec], out: Path, shard: int,
              items: Sequence[Item], *, display: Any, skip_bad: bool, pool: ThreadPoolExecutor | None,
              tick: Callable[[int], None]) -> int:
    """Compute and write every missing row of one shard; return how many maps were written.

    Batches are fixed slices of the shard (`job.batch_size` images): a method with any missing row in a batch
    runs on the whole batch, so its tensor is the same as in an uninterrupted run (bit-identical maps whatever
    the kernels' batch-size dependence), and only the missing rows are written.
    """
    from saliencylab.methods.convergence import ConvergenceRule

    by_name = {s.name: s for s in specs}
    rule = ConvergenceRule(**job.convergence) if job.convergence else ConvergenceRule(adapt=False)
    mpath = manifest_path(out, shard)
    old = read_manifest(mpath)
    want = {(it.index, m): job.row_key(it.name, m, it.ihash) for it in items for m in (*by_name, None)}
    valid: dict[tuple[int, str | None], dict[str, Any]] = {}
    for row in old:
        k = (row.get("index"), row.get("method"))
        if want.get(k) == row.get("key") and all(p.is_file() for p in _row_files(out, row)):  # type: ignore[arg-type]
            valid[k] = row  # type: ignore[index]
    if job.outputs == "hdf5":
        valid = _h5_valid(out, shard, valid)

    def done(it: Item) -> bool:
        return (it.index, None) in valid or all((it.index, m) in valid for m in by_name)

    bs = max(1, job.batch_size)
    batches = [list(items[i:i + bs]) for i in range(0, len(items), bs)]
    todo = [b for b in batches if not all(done(it) for it in b)]
    tick(sum(len(by_name) for b in batches if b not in todo for it in b))
    computed = 0
    pending: deque[tuple[Future | None, list[dict[str, Any]] | None]] = deque()
    h5_maps: dict[tuple[str, str], np.ndarray] = {}
    h5_attrs: dict[str, dict[str, Any]] = {}

    def drain(limit: int) -> None:
        nonlocal computed
        while len(pending) > limit:
            fut, rows = pending.popleft()
            rows = fut.result() if fut is not None else rows
            assert rows is not None
            computed += sum(r.get("method") is not None for r in rows)
            for r in rows:
                valid[(r["index"], r.get("method"))] = r
            if job.outputs != "hdf5":
                _append_rows(mpath, rows)

    next_decoded: Future | None = None
    for bi, batch in enumerate(todo):
        if next_decoded is not None:
            decoded = next_decoded.result()
        else:
            decoded = _decode(batch, skip_bad)
        if pool is not None and bi + 1 < len(todo):
            next_decoded = pool.submit(_decode, todo[bi + 1], skip_bad)
        else:
            next_decoded = None
        skipped_rows = [{"key": want[(it.index, None)], "shard": shard, "index": it.index, "source": it.source,
                         "name": it.name, "method": None, "skipped": reason, "input_hash": it.ihash}
                        for it, img, reason in decoded if img is None and (it.index, None) not in valid]
        if skipped_rows:
            pending.append((None, skipped_rows))
        good = [(it, img) for it, img, _ in decoded if img is not None]
        if not good:
            tick(len(batch) * len(by_name))
            continue
        x = torch.stack([clf.preprocess(img.pixels) for _, img in good]).to(clf.device)
        from saliencylab.studies.photos import probabilities, run_method, top_k

        probs = probabilities(clf, x)
        tops = top_k(clf, probs, job.top)
        tgt = resolve_target(clf.module, x, job.target, clf.class_names)
        need = [m for m in by_name if any((it.index, m) not in valid for it, _ in good)]
        maps: dict[str, np.ndarray] = {}
        secs: dict[str, float] = {}
        pas: dict[str, Any] = {}
        extras: dict[str, list[float]] = {}
        for m in need:
            raw, sec, extra, pas[m] = run_method(clf, by_name[m], x, tgt, job.methods[m]["call"], rule,
                                                 names=[it.source for it, _ in good])
            secs[m] = sec / len(good)
            if "convergence" in extra:
                extras[f"convergence.{m}"] = extra.pop("convergence")
            extras.update(extra)
            maps[m] = raw.detach().float().cpu().numpy()
        for i, (it, img) in enumerate(good):
            mine = [m for m in need if (it.index, m) not in valid]
            if not mine:
                continue
            t = int(tgt[i])
            base = {"shard": shard, "index": it.index, "source": it.source, "name": it.name,
                    "input_hash": it.ihash, "size": list(img.size), "decoded": img.meta, "top": tops[i],
                    "target": {"index": t, "class": clf.class_names[t], "probability": float(probs[i, t])},
                    "map_dtype": job.map_dtype}
            extra = {k: v[i] for k, v in extras.items()}
            work = Work(it.index, it.name, it.source, it.ihash, img, {m: maps[m][i] for m in mine},
                        secs, pas, {m: want[(it.index, m)] for m in mine}, base)
            if job.outputs == "hdf5":
                for m in mine:
                    h5_maps[(it.name, m)] = maps[m][i]
                h5_attrs[it.name] = {"size": list(img.size), "source": it.source}
            if pool is not None:
                fut = pool.submit(_rows_with_extra, out, job, by_name, display, work, extra)
                pending.append((fut, None))
            else:
                pending.append((None, _rows_with_extra(out, job, by_name, display, work, extra)))
        tick(len(batch) * len(by_name))
        drain(2 * pool._max_workers if pool is not None else 0)
    drain(0)
    order = {m: i for i, m in enumerate(by_name)}
    final = sorted(valid.values(), key=lambda r: (r["index"], -1 if r.get("method") is None
                                                   else order[r["method"]]))
    final = [r for r in final if r.get("method") is None or (r["index"], None) not in valid]
    if job.outputs == "hdf5":
        if h5_maps or len(final) != len(old):
            keep = {(r["name"], r["method"]) for r in final if r.get("method") is not None}
            _write_h5(out, shard, job, h5_maps, h5_attrs, keep)
        _write_manifest(mpath, final)
    elif [r["key"] for r in final] != [r.get("key") for r in read_manifest(mpath)] or _cut(mpath):
        _write_manifest(mpath, final)  # canonical order, stale rows and cut lines dropped
    return computed


def _rows_with_extra(out: Path, job: Job, specs: dict[str, MethodSpec], display: Any, work: Work,
                     extra: dict[str, float]) -> list[dict[str, Any]]:
    rows = write_image(out, job, specs, display, work)
    for r in rows:
        if r["method"] == "integrated_gradients" and "ig_completeness_error" in extra:
            r["ig_completeness_error"] = extra["ig_completeness_error"]
        if f"convergence.{r['method']}" in extra:
            r["convergence"] = extra[f"convergence.{r['method']}"]
    return rows


def _h5_valid(out: Path, shard: int, valid: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Rows whose map is in the shard's HDF5 store."""
    path = h5_path(out, shard)
    if not path.is_file():
        return {k: v for k, v in valid.items() if v.get("method") is None}
    h5py = require_h5py()
    with h5py.File(path, "r") as f:
        return {k: v for k, v in valid.items() if v.get("method") is None or f"{v['name']}/{v['method']}" in f}


def _write_h5(out: Path, shard: int, job: Job, new: dict[tuple[str, str], np.ndarray],
              attrs: dict[str, dict[str, Any]], keep: set[tuple[str, str]]) -> None:
    """Rewrite the shard's store atomically: the new maps plus the old ones in `keep`."""
    h5py = require_h5py()
    path = h5_path(out, shard)
    dtype = np.float16 if job.map_dtype == "float16" else np.float32
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            if path.is_file():
                with h5py.File(path, "r") as old:
                    for name in old:
                        for m in old[name]:
                            if (name, m) in new or (name, m) not in keep:
                                continue
                            g = f.require_group(name)
                            old.copy(old[name][m], g, name=m)
                            for k, v in old[name].attrs.items():
                                g.attrs[k] = v
            for (name, m), arr in sorted(new.items()):
                g = f.require_group(name)
                for k, v in attrs.get(name, {}).items():
                    g.attrs[k] = v
                g.create_dataset(m, data=arr.astype(dtype), chunks=arr.shape, compression="gzip",
                                 compression_opts=4, shuffle=True)


# ----------------------------------------------------------------------------------------------- summaries


def iter_rows(out: Path, n_shards: int) -> Iterator[dict[str, Any]]:
    """Every manifest row of the job, shard by shard (one shard in memory at a time)."""
    for s in range(n_shards):
        yield from read_manifest(manifest_path(out, s))


def iter_images(out: Path, n_shards: int) -> Iterator[dict[str, Any]]:
    """One record per image (results.json's 'images' entries) or per skipped input ({'skipped': ...})."""
    for s in range(n_shards):
        cur: dict[str, Any] | None = None
        for r in read_manifest(manifest_path(out, s)):
            if r.get("method") is None:
                if cur is not None:
                    yield cur
                    cur = None
                yield {"source": r["source"], "skipped": r["skipped"], "index": r["index"]}
                continue
            if cur is None or cur["index"] != r["index"]:
                if cur is not None:
                    yield cur
                cur = {"index": r["index"], "source": r["source"], "name": r["name"], "size": r["size"],
                       "decoded": r.get("decoded", {}), "top": r["top"], "target": r["target"], "maps": {}}
            cur["maps"][r["method"]] = {k: r[k] for k in ("npy", "png", "h5", "map_size") if k in r}
            if "ig_completeness_error" in r:
                cur["ig_completeness_error"] = r["ig_completeness_error"]
            if "convergence" in r:
                cur.setdefault("convergence", {})[r["method"]] = r["convergence"]
        if cur is not None:
            yield cur


def grid_indices(n: int, k: int) -> set[int]:
    """k indices spread evenly over range(n) (all of them when n <= k)."""
    if n <= k:
        return set(range(n))
    if k <= 1:
        return {0} if k == 1 else set()
    return {round(i * (n - 1) / (k - 1)) for i in range(k)}


def summarise(out: Path, job: Job, specs: Sequence[MethodSpec], *, display: Any, command: str,
              grid: int, defaults: dict[str, dict[str, Any]], device: str = "cpu",
              precision: str = "fp32") -> dict[str, Any]:
    """Write results.json and figure.png from the manifests (two passes, one shard in memory at a time)."""
    from saliencylab.render import GridRow, saliency_grid

    n_shards = len(dist.shard_bounds(job.n_inputs, job.shard_size))
    seconds = dict.fromkeys(job.methods, 0.0)
    n_images = n_skipped = 0
    classes: dict[str, int] = {}
    ig_sum, ig_max, ig_n = 0.0, 0.0, 0  # running, so memory does not grow with the images
    for rec in iter_images(out, n_shards):
        if "skipped" in rec:
            n_skipped += 1
            continue
        n_images += 1
        classes[rec["target"]["class"]] = classes.get(rec["target"]["class"], 0) + 1
        if "ig_completeness_error" in rec:
            e = abs(float(rec["ig_completeness_error"]))
            ig_sum, ig_max, ig_n = ig_sum + e, max(ig_max, e), ig_n + 1
    rules: dict[str, set[str]] = {m: set() for m in job.methods}
    samples: dict[str, set[int]] = {m: set() for m in job.methods}
    warnings: list[str] = []  # the first MAX_WARNINGS lines, and how many there are
    n_warnings = 0
    checks: dict[str, dict[str, Any]] = {}  # per method: images checked, converged, worst share/agreement
    for r in iter_rows(out, n_shards):
        c = r.get("convergence")
        if c is not None and r.get("method") in seconds:
            _tally(checks.setdefault(r["method"], {"images": 0, "converged": 0}), c)
            if c.get("warning"):
                n_warnings += 1
                if len(warnings) < MAX_WARNINGS:
                    warnings.append(c["warning"])
        if r.get("method") in seconds:
            seconds[r["method"]] += float(r.get("seconds", 0.0))
            p = r.get("passes")
            if p:
                rules[r["method"]].update([p["rule"]] if isinstance(p["rule"], str) else p["rule"])
                samples[r["method"]].update(p["samples_per_pass"])

    def passes(m: str) -> dict[str, Any] | None:  # `describe_passes` over every row of the method
        if not rules[m]:
            return None
        rs = sorted(rules[m])
        return {"rule": rs[0] if len(rs) == 1 else rs, "samples_per_pass": sorted(samples[m])}

    picks = grid_indices(n_images, grid)
    sample: list[dict[str, Any]] = []
    head = {
        "command": command, "model": job.model, "model_args": job.model_args, "device": device,
        "precision": precision, "target": job.target,
        "display": display.__dict__,
        "methods": {m.name: {"options": defaults[m.name], "family": m.family, "paper": m.paper,
                             "seconds": round(seconds[m.name], 4),
                             "seconds_per_image": round(seconds[m.name] / max(1, n_images), 4),
                             "passes": passes(m.name)} for m in specs},
        "figure": "figure.png" if picks else None,
        "convergence": {"rule": job.convergence, "methods": checks, "warnings": warnings, "n_warnings": n_warnings},
        "job": {"shard_size": job.shard_size, "shards": n_shards, "outputs": job.outputs, "map_dtype": job.map_dtype,
                "manifests": [manifest_path(Path("."), s).as_posix() for s in range(n_shards)],
                "maps_at": "the model's input resolution; saliencylab.studies.streaming.load_map() resizes to the "
                           "image (bilinear, half-pixel centres)"},
        "summary": {"images": n_images, "skipped": n_skipped, "targets": dict(sorted(classes.items())),
                    "ig_abs_completeness_error_mean": ig_sum / ig_n if ig_n else None,
                    "ig_abs_completeness_error_max": ig_max if ig_n else None,
                    "grid_images": len(picks)},
    }
    with atomic_path(out / "results.json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        body = json.dumps(head, indent=2, default=str)
        f.write(body[:-2] + ",\n  \"images\": [")
        skipped_file = []
        first, k = True, 0
        for rec in iter_images(out, n_shards):
            if "skipped" in rec:
                if len(skipped_file) < 10_000:
                    skipped_file.append({"source": rec["source"], "reason": rec["skipped"]})
                continue
            if k in picks:
                sample.append(rec)
            k += 1
            rec = {key: v for key, v in rec.items() if key != "index"}
            f.write(("\n    " if first else ",\n    ") + json.dumps(rec, default=str))
            first = False
        f.write("\n  ],\n  \"skipped\": " + json.dumps(skipped_file) + "\n}\n")
    rows = []
    for rec in sample:
        img = load_image(rec["source"])
        thumb = _thumbnail(img.pixels, 320)
        maps = [display.render(to_image_grid(_stored_map(out, rec, m.name), thumb.shape[:2]), m.display)
                for m in specs]
        t = rec["target"]
        rows.append(GridRow(thumb, f"{rec['name']}\n{t['class']} {100 * t['probability']:.1f}%", maps))
    if rows:
        saliency_grid(rows, [m.name for m in specs], out / "figure.png", alpha=display.alpha, cmap=display.cmap)
    else:
        (out / "figure.png").unlink(missing_ok=True)  # --grid 0: no figure, and none left from before
    return {"images": n_images, "skipped": n_skipped, "seconds": seconds, "sample": sample, "grid": len(rows),
            "warnings": warnings, "n_warnings": n_warnings}


MAX_WARNINGS = 50  # convergence warnings kept in results.json and printed; the count covers all of them


def _tally(acc: dict[str, Any], rec: dict[str, Any]) -> None:
    """Add one image's convergence record to a method's running summary (memory flat in the images)."""
    acc["images"] += 1
    acc["converged"] += bool(rec.get("converged"))
    if rec.get("completeness_share") is not None:
        acc["worst_completeness_share"] = max(acc.get("worst_completeness_share", 0.0), rec["completeness_share"])
    if rec.get("agreement_estimate") is not None:
        acc["worst_agreement_estimate"] = min(acc.get("worst_agreement_estimate", 1.0), rec["agreement_estimate"])
    if rec.get("n_steps") is not None:
        acc["max_n_steps"] = max(acc.get("max_n_steps", 0), int(rec["n_steps"]))


def _stored_map(out: Path, rec: dict[str, Any], method: str) -> np.ndarray:
    info = rec["maps"][method]
    if "npy" in info:
        return np.load(out / info["npy"]).astype(np.float32)
    h5py = require_h5py()
    file, key = info["h5"].split("#", 1)
    with h5py.File(out / file, "r") as f:
        return f[key][()].astype(np.float32)


def clean_folder(out: Path, job: Job, names: Sequence[str], methods: Sequence[str]) -> int:
    """Remove what this job does not produce (old methods, images no longer listed, extra shards); count it.

    Only files of our own kinds are removed: image folders holding nothing but image.json and .npy/.png maps,
    manifest and HDF5 shards, and a stale report.
    """
    n_shards = len(dist.shard_bounds(job.n_inputs, job.shard_size))
    keep_shards = {manifest_path(out, s).name for s in range(n_shards)} | {h5_path(out, s).name
                                                                         for s in range(n_shards)}
    ours = re.compile(r"^(image\.json|[\w.-]+\.(npy|png))$")
    wanted = {"image.json"} | ({f"{m}.npy" for m in methods} | ({f"{m}.png" for m in methods}
                                                                 if "png" in job.outputs else set())
                               if job.outputs != "hdf5" else set())
    names_set = set(names)
    removed = 0
    for entry in os.scandir(out):
        p = Path(entry.path)
        if entry.name in ("manifest", "maps") and entry.is_dir():
            for f in p.iterdir():
                if f.name not in keep_shards or (entry.name == "maps" and job.outputs != "hdf5"):
                    f.unlink()
                    removed += 1
        elif entry.name in ("report.html", "report_numbers.json"):
            os.unlink(p)
            removed += 1
        elif entry.is_dir(follow_symlinks=False):
            files = list(p.iterdir())
            if not files or not all(f.is_file() and ours.match(f.name) for f in files):
                continue
            for f in files:
                if entry.name not in names_set or f.name not in wanted:
                    f.unlink()
                    removed += 1
            with contextlib.suppress(OSError):
                p.rmdir()  # only when now empty
    return removed


# ----------------------------------------------------------------------------------------------- entry


def _rollback(out: Path, missing: Sequence[Path]) -> None:
    """Remove a fresh run's folder and the parent folders it made (a failed small run leaves nothing)."""
    shutil.rmtree(out, ignore_errors=True)
    for p in missing:
        with contextlib.suppress(OSError):
            p.rmdir()


def _sum_over_ranks(n: int, w: dist.World, device: torch.device) -> int:
    if not w.distributed:
        return n
    import torch.distributed as tdist

    t = torch.tensor([n], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    tdist.all_reduce(t)
    return int(t.item())


class ShardRunner:
    """One explain shard as a picklable function, for engines that run shards in other processes (Ray).

    It carries only plain data (how to load the model, the job, the inputs); `setup()` loads the model once per
    worker, and `runner(shard)` writes the shard's missing rows exactly as a local run does.
    """

    def __init__(self, *, model_args: dict[str, Any], device: str, job: Job, methods: Sequence[str], out: Path,
                 display: Any, skip_bad: bool, sources: Sequence[str], names: Sequence[str], precision: str) -> None:
        self.model_args, self.device, self.job, self.methods = dict(model_args), device, job, tuple(methods)
        self.out, self.display, self.skip_bad, self.precision = out, display, skip_bad, precision
        self.sources, self.names = tuple(sources), tuple(names)
        self.clf: Classifier | None = None

    def setup(self) -> None:
        from saliencylab.methods import get_method
        from saliencylab.models import load_model

        args = dict(self.model_args)
        self.clf = load_model(args.pop("model"), weights=args.pop("weights", None), device=self.device, **args)
        self.specs = [get_method(m) for m in self.methods]

    def __call__(self, shard: int) -> dict[str, Any]:
        from saliencylab.precision import precision as run_at

        if self.clf is None:
            self.setup()
        assert self.clf is not None
        lo, hi = dist.shard_bounds(len(self.sources), self.job.shard_size)[shard]
        items = [Item(i, self.sources[i], self.names[i], input_hash(self.sources[i])) for i in range(lo, hi)]
        with run_at(self.precision, self.clf.device):
            n = run_shard(self.clf, self.job, self.specs, self.out, shard, items, display=self.display,
                          skip_bad=self.skip_bad, pool=None, tick=lambda _k: None)
        return {"skipped": n == 0, "computed": n}


def _run_on_ray(clf: Classifier, job: Job, specs: Sequence[MethodSpec], out: Path, sources: Sequence[str],
                names: Sequence[str], *, cfg: StreamConfig, display: Any, skip_bad: bool, precision: str,
                model_args: dict[str, Any]) -> int:
    """Every shard in a Ray Data actor pool (`--engine ray`); returns the maps written."""
    from saliencylab.engines.ray_engine import run_shards

    if not isinstance(model_args.get("model"), str | os.PathLike):
        raise UserError("--engine ray loads the model in each worker: pass it by name or file (--model), "
                        "not as a Python object")
    device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"  # Ray gives each GPU actor its own cuda:0
    runner = ShardRunner(model_args=model_args, device=device, job=job, methods=[s.name for s in specs], out=out,
                         display=display, skip_bad=skip_bad, sources=sources, names=names, precision=precision)
    n_shards = len(dist.shard_bounds(len(sources), job.shard_size))
    done = run_shards(range(n_shards), runner, actors=cfg.actors, num_gpus_per_actor=cfg.gpus_per_actor,
                      cpus_per_actor=cfg.cpus_per_actor, address=cfg.ray_address)
    return int(done["computed"])


@dataclass
class StreamResult:
    """What a streaming explain did, for the caller to print (a sample of images, not all of them)."""

    out: Path
    images: list[dict[str, Any]]
    n_images: int
    skipped: list[tuple[str, str]]
    seconds: dict[str, float]
    computed: int
    reused: int
    grid: int
    removed: int
    warnings: list[str] = field(default_factory=list)  # convergence warnings (at most MAX_WARNINGS)
    n_warnings: int = 0


def explain_stream(clf: Classifier, sources: Sequence[str], specs: Sequence[MethodSpec], out: str | Path, *,
                   options: dict[str, dict[str, Any]], target: str, top: int, batch_size: int, display: Any,
                   cfg: StreamConfig, skip_bad: bool, progress: bool | None, command: str,
                   model_args: dict[str, Any], defaults: dict[str, dict[str, Any]],
                   precision: str = "fp32", convergence: Any = None) -> StreamResult:
    """Run explain as a resumable job in `out` (see the module docstring); under torchrun, on every rank."""
    from tqdm import tqdm

    from saliencylab.precision import precision as run_at

    cfg.check()
    used = precision
    out = Path(out)
    if not sources:
        from saliencylab.studies.photos import nothing_read

        raise nothing_read([])
    w = dist.world()
    with dist.process_group(w, clf.device):
        job = Job(model=clf.describe(), model_hash=model_hash(clf), model_args=model_args,
                  methods={s.name: {"options": defaults[s.name], "call": options.get(s.name, {})} for s in specs},
                  target=str(target), top=int(top), display=dict(display.__dict__), outputs=cfg.outputs,
                  map_dtype=cfg.map_dtype, overlay_side=cfg.overlay_side, shard_size=cfg.shard_size,
                  batch_size=batch_size, n_inputs=len(sources), precision=precision,
                  convergence=asdict(convergence) if convergence is not None else {})
        fresh = not out.exists() or not any(out.iterdir())
        missing = [p for p in (out, *out.parents) if not os.path.lexists(p)]  # folders this run makes
        if w.main:
            _remove_stale(out.parent, f".{out.name}.staging.")  # left beside --out by a killed older version
        job = prepare_folder(out, job, cfg, w)
        dist.barrier(w)
        names = safe_names(sources)
        bounds = dist.shard_bounds(len(sources), job.shard_size)
        mine = list(dist.my_shards(len(bounds), w))
        total = sum(bounds[s][1] - bounds[s][0] for s in mine) * len(specs)
        disable = (None if progress is None else not progress) if w.main else True
        computed = 0
        pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="explain-io") if cfg.workers > 0 else None
        try:
            if cfg.engine == "ray":
                if w.distributed:
                    raise UserError("--engine ray starts its own workers: run it without torchrun")
                computed = _run_on_ray(clf, job, specs, out, sources, names, cfg=cfg, display=display,
                                       skip_bad=skip_bad, precision=precision, model_args=model_args)
                mine = []
            with tqdm(total=total, unit="map", disable=disable if mine else True, desc="explain") as bar, \
                    run_at(precision, clf.device) as used:
                for s in mine:
                    lo, hi = bounds[s]
                    items = [Item(i, sources[i], names[i], input_hash(sources[i])) for i in range(lo, hi)]
                    computed += run_shard(clf, job, specs, out, s, items, display=display, skip_bad=skip_bad,
                                          pool=pool, tick=bar.update)
        except BaseException:
            if fresh and len(bounds) == 1 and not w.distributed:  # a small run stays all-or-nothing
                _rollback(out, missing)
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        dist.barrier(w)
        computed = _sum_over_ranks(computed, w, clf.device)
        summary: dict[str, Any] = {"images": 0, "skipped": 0, "seconds": {}, "sample": [], "grid": 0,
                                   "warnings": [], "n_warnings": 0}
        removed = 0
        if w.main:
            removed = clean_folder(out, job, names, [s.name for s in specs])
            summary = summarise(out, job, specs, display=display, command=command, grid=cfg.grid,
                                defaults=defaults, device=str(clf.device), precision=used)
        dist.barrier(w)
    skipped = []
    if w.main:
        res = json.loads((out / "results.json").read_text())
        skipped = [(s["source"], s["reason"]) for s in res.get("skipped", [])]
        if summary["images"] == 0:
            from saliencylab.studies.photos import nothing_read

            if fresh:
                _rollback(out, missing)
            raise nothing_read(skipped)
    return StreamResult(out=out, images=summary["sample"], n_images=summary["images"], skipped=skipped,
                        seconds=summary["seconds"], computed=computed,
                        reused=max(0, summary["images"] * len(specs) - computed), grid=summary["grid"], removed=removed,
                        warnings=summary["warnings"], n_warnings=summary["n_warnings"])
