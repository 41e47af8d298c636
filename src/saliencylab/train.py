"""Training a chest X-ray classifier: Adam, binary cross-entropy on one logit, best checkpoint by
validation loss, resumable and seeded. Images are decoded once into an in-memory uint8 cache."""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from saliencylab.data.cache import decode_cache, to_batch
from saliencylab.data.datasets import (
    load_dataset,
    make_split,
    parse_split,
    split_text,
)
from saliencylab.dist import (
    World,
    all_reduce_sum,
    broadcast_flag,
    gather_shards,
    global_batch_layers,
    global_rows,
    local_device,
    local_workers,
    my_shards,
    process_group,
    row_bounds,
    shard_bounds,
    world,
)
from saliencylab.errors import UserError
from saliencylab.fsutil import atomic_path, write_json, write_text
from saliencylab.models.registry import Classifier, load_model, save_checkpoint
from saliencylab.render.figures import save_figure


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; written to `config.json` and into the checkpoint.

    Attributes:
        data: dataset root (phantoms or the COVID-19 Radiography Database).
        model: 'cxr_cnn' or a registry backbone for transfer learning ('efficientnet_lite0', 'timm:...').
        image_size: side of the square inputs (cxr_cnn: a multiple of 16; the backbones' own default is
            used when 0).
        class_weight: weigh the positive class by negatives/positives in the loss.
        augment: small shifts, rotations and exposure jitter; never a left-right flip unless `hflip`
            (laterality is information on a radiograph).
        max_minutes: stop after the epoch that crosses this wall-clock budget (0: no limit).
        extra: rarely used switches; {'shuffle_labels': True} trains on permuted labels (the audit's data
            randomisation check).
    """

    data: str
    model: str = "cxr_cnn"
    epochs: int = 8
    image_size: int = 128
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    classes: tuple[str, str] = ("Normal", "COVID")
    test_fraction: float = 0.1
    val_fraction: float = 0.1
    class_weight: bool = False
    augment: bool = True
    hflip: bool = False
    group_column: str | None = None
    max_minutes: float = 0.0
    workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def build_classifier(cfg: TrainConfig) -> tuple[Classifier, str, dict[str, Any]]:
    """The model to train, its registry name and the architecture options its checkpoint records."""
    if cfg.model == "cxr_cnn":
        kwargs = {"channels": 1, "image_size": cfg.image_size, "class_names": list(cfg.classes)}
        return load_model("cxr_cnn", weights="random", **kwargs), "cxr_cnn", kwargs
    kwargs = {"num_outputs": 1, "class_names": list(cfg.classes)}
    if cfg.model == "efficientnet_lite0":
        kwargs["image_size"] = cfg.image_size or 224
        return load_model(cfg.model, **kwargs), cfg.model, kwargs
    raise UserError(f"--model {cfg.model}: train supports cxr_cnn and efficientnet_lite0 (transfer learning)")


def draw_augment(b: int, gen: torch.Generator, *, hflip: bool = False) -> dict[str, torch.Tensor]:
    """The random draws of `augment` for b images: theta[b, 2, 3] (affine), gain and bias [b, 1, 1, 1]."""
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(5)
    scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * 0.05
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * 0.08  # of the half-width: 4% of the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    if hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        theta[flip, 0, :2] *= -1
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * 0.1
    bias = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * 0.05
    return {"theta": theta, "gain": gain, "bias": bias}


def apply_augment(x: torch.Tensor, draw: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply one draw of `draw_augment` (its rows match x's) to x[B, C, H, W] in [0, 1]; each row on its own."""
    grid = F.affine_grid(draw["theta"], list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x * draw["gain"] + draw["bias"]).clamp(0, 1)


def augment(x: torch.Tensor, gen: torch.Generator, *, hflip: bool = False) -> torch.Tensor:
    """Small random affine (shift 4%, rotation 5 degrees, scale 5%) and exposure jitter; x[B, C, H, W] in [0, 1]."""
    return apply_augment(x, draw_augment(x.shape[0], gen, hflip=hflip))


def evaluate_logits(clf: Classifier, cache: np.ndarray, idx: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """One logit per image of `idx`, in eval mode."""
    clf.module.eval()
    out = []
    with torch.inference_mode():
        for lo in range(0, len(idx), batch_size):
            x = to_batch(cache, idx[lo:lo + batch_size], clf.channels).to(clf.device)
            out.append(clf.module(x)[:, 0].float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def _loss_acc(logits: np.ndarray, labels: np.ndarray, pos_weight: float) -> tuple[float, float]:
    t = torch.from_numpy(logits)
    y = torch.from_numpy(labels).float()
    loss = F.binary_cross_entropy_with_logits(t, y, pos_weight=torch.tensor(pos_weight))
    return float(loss), float(((t > 0).float() == y).float().mean())


_RESUME_FIX = "start again without --resume, or use another --out"
HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "epoch": int, "history": list, "best": (int, float), "split_hash": str}


def load_resume(out: Path, cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """Check every file that `--resume` reads against its schema; return (state.pt's dict, split.csv).

    state.pt is loaded with `weights_only=True`: a file that holds other Python objects is refused, never
    executed.

    Raises:
        UserError: one line naming the file and what is wrong with it, and what to do.
    """
    for name in ("state.pt", "config.json", "split.csv"):
        if not (out / name).is_file():
            raise UserError(f"--resume: '{out / name}' does not exist; {_RESUME_FIX}")
    cfg_path = out / "config.json"
    try:
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"--resume: '{cfg_path}' is not valid JSON; {_RESUME_FIX}") from None
    want = json.loads(json.dumps(asdict(cfg)))
    if not isinstance(old, dict):
        raise UserError(f"--resume: '{cfg_path}' is not a training config (a JSON object); {_RESUME_FIX}")
    missing = [k for k in want if k not in old]
    if missing:
        raise UserError(f"--resume: '{cfg_path}' lacks the field '{missing[0]}'; {_RESUME_FIX}")
    changed = [k for k in want if old[k] != want[k]]
    if changed or set(old) != set(want):
        raise UserError(f"--resume: '{cfg_path}' was written with other settings ({', '.join(changed) or 'fields'});"
                        " resume with the same options or use a new --out")
    try:
        assigned = parse_split(out / "split.csv")
    except ValueError as err:
        raise UserError(f"--resume: '{out / 'split.csv'}' is not a split file: {err}; {_RESUME_FIX}") from None
    state_path = out / "state.pt"
    try:
        st = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"--resume: '{state_path}' holds Python objects besides tensors and plain values, which are "
                        f"never loaded (they could run code); {_RESUME_FIX}") from None
    except Exception as err:  # torch raises many types for a file that is not a torch archive
        raise UserError(f"--resume: '{state_path}' is not a readable training state ({type(err).__name__}); "
                        f"{_RESUME_FIX}") from None
    if not isinstance(st, dict):
        raise UserError(f"--resume: '{state_path}' holds a {type(st).__name__}, not a training state; {_RESUME_FIX}")
    for key, kind in _STATE_FIELDS.items():
        if key not in st:
            raise UserError(f"--resume: '{state_path}' lacks the field '{key}'; {_RESUME_FIX}")
        if not isinstance(st[key], kind) or isinstance(st[key], bool):
            raise UserError(f"--resume: '{state_path}' has a {type(st[key]).__name__} for '{key}'; {_RESUME_FIX}")
    if st["epoch"] < 0 or not all(isinstance(h, dict) for h in st["history"]):
        raise UserError(f"--resume: '{state_path}' has an invalid epoch or history; {_RESUME_FIX}")
    _check_history_csv(out / "history.csv")
    return st, assigned


def _check_history_csv(path: Path) -> None:
    """history.csv, when present (a run killed before its first epoch ended has none), has our columns."""
    if not path.is_file():
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error):
        header = []
    if not set(HISTORY_FIELDS) <= set(header):
        raise UserError(f"--resume: '{path}' is not a training history (columns {', '.join(HISTORY_FIELDS)} "
                        f"missing); {_RESUME_FIX}")


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, device: str = "cpu",
          progress: bool | None = None, log: Any = print) -> dict[str, Any]:
    """Train, validate each epoch, keep the best checkpoint by validation loss; return a summary.

    The run folder gets config.json, split.csv, best.pt (a saliencylab checkpoint), state.pt (for
    --resume), history.csv and history.png. Each epoch reseeds from (seed, epoch), so a resumed run
    reproduces an uninterrupted one.

    Under torchrun every rank takes a contiguous slice of the same global batch (DistributedDataParallel;
    batch norm statistics and dropout masks of the global batch, see `dist.global_batch_layers`), so the
    losses are those of one process up to float rounding, and a run resumes with any number of processes.
    Rank 0 alone logs and writes files.
    """
    w = world()
    dev = local_device(device, w) if w.distributed else torch.device(device)
    if not w.main:
        log, progress = (lambda *_: None), False
    with process_group(w, dev):
        return _train(cfg, Path(out), w, dev, resume=resume, progress=progress, log=log)


def _train(cfg: TrainConfig, out: Path, w: World, dev: torch.device, *, resume: bool, progress: bool | None,
           log: Any) -> dict[str, Any]:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.data, classes=cfg.classes, metadata_group=cfg.group_column)
    state_path = out / "state.pt"
    # Every input is checked before anything is written: a refused run leaves no file behind.
    st: dict[str, Any] | None = None
    if resume:
        st, assigned = load_resume(out, cfg)
        split = [assigned.get(r.file, "train") for r in ds.records]
    else:
        split = make_split(ds.records, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, seed=cfg.seed)
    split_csv, split_hash = split_text(ds.records, split)
    if st is not None and st["split_hash"] != split_hash:
        raise UserError(f"--resume: the split in '{out}' changed since the run started; use a new --out")
    split_arr = np.array(split)
    labels = np.array([r.label for r in ds.records])
    if cfg.extra.get("shuffle_labels"):  # data randomisation (Adebayo et al. 2018): labels carry no signal
        fit = np.nonzero(split_arr != "test")[0]
        labels[fit] = labels[fit][np.random.default_rng(cfg.seed).permutation(len(fit))]

    clf, arch, arch_kwargs = build_classifier(cfg)
    clf.to(dev)
    opt = torch.optim.Adam(clf.module.parameters(), lr=cfg.lr)
    history: list[dict[str, Any]] = []
    best = math.inf
    start_epoch = 1
    if st is not None:
        try:
            clf.module.net.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError):
            raise UserError(f"--resume: '{state_path}' holds weights or optimizer state that do not fit this model; "
                            f"{_RESUME_FIX}") from None
        history, best, start_epoch = list(st["history"]), float(st["best"]), int(st["epoch"]) + 1
    size = clf.input_size[0]
    t0 = time.perf_counter()
    cache, bad = decode_cache(ds, ds.records, size, local_workers(cfg.workers), progress)
    decode_s = time.perf_counter() - t0
    usable = np.ones(len(ds.records), bool)
    bad_files = {f for f, _ in bad}
    for i, r in enumerate(ds.records):
        usable[i] = r.file not in bad_files
    tr = np.nonzero((split_arr == "train") & usable)[0]
    va = np.nonzero((split_arr == "val") & usable)[0]
    if len(tr) == 0 or len(va) == 0:
        raise UserError(f"--data {cfg.data}: no readable {'training' if len(tr) == 0 else 'validation'} image "
                        f"({len(bad)} of {len(ds.records)} unreadable, first: {bad[0][0] if bad else '-'}); "
                        "fix or replace the files")
    n_pos, n_neg = int(labels[tr].sum()), int(len(tr) - labels[tr].sum())
    pos_weight = n_neg / max(n_pos, 1) if cfg.class_weight else 1.0
    log(f"data: {len(ds.records)} images ({', '.join(f'{k} {v}' for k, v in ds.counts().items())}), layout "
        f"{ds.layout}; train {len(tr)}, val {len(va)}, test {int((split_arr == 'test').sum())}; "
        f"{len(bad)} unreadable skipped; decoded in {decode_s:.1f}s")
    net = _ddp_model(clf, w, dev, log)
    meta = {"split_hash": split_hash, "unreadable": len(bad), "train_images": len(tr), "val_images": len(va)}
    if w.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(cfg))
        write_text(out / "split.csv", split_csv)
        write_json(out / "unreadable.json", [{"file": f, "reason": r} for f, r in bad])
    started = time.perf_counter()
    pw = torch.tensor(pos_weight, device=dev)
    for epoch in range(start_epoch, cfg.epochs + 1):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout and augmentation: reproducible per epoch
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = tr[torch.randperm(len(tr), generator=gen).numpy()]
        clf.module.train()
        e0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(total=len(order), unit="img", desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=None if progress is None else not progress)
        for lo in range(0, len(order), cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size]  # the global batch; this rank takes rows [a, b)
            a, b = row_bounds(len(idx), w)
            draw = draw_augment(len(idx), gen, hflip=cfg.hflip) if cfg.augment else None
            x = to_batch(cache, idx[a:b], clf.channels)
            if draw is not None:
                x = apply_augment(x, {k: v[a:b] for k, v in draw.items()})
            y = torch.from_numpy(labels[idx[a:b]]).float().to(dev)
            with global_rows(a, b, len(idx)):
                logits = net(x.to(dev, memory_format=torch.channels_last))[:, 0]
            rows = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw, reduction="none")
            # sum / global count, times the world size that DDP divides the summed gradients by
            loss = rows.mean() if not w.distributed else rows.sum() / len(idx) * w.size
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx) / w.size
            correct += int(((logits.detach() > 0).float() == y).sum())
            bar.update(len(idx))
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        loss_sum, correct = all_reduce_sum([loss_sum, float(correct)], w, dev)
        train_s = time.perf_counter() - e0
        val_loss, val_acc = _loss_acc(_val_logits(clf, cache, va, w), labels[va], pos_weight)
        row = {"epoch": epoch, "train_loss": round(loss_sum / max(seen, 1), 6),
               "train_acc": round(correct / max(seen, 1), 6),
               "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6), "seconds": round(train_s, 2),
               "images_per_second": round(seen / max(train_s, 1e-9), 1)}
        history.append(row)
        improved = val_loss < best
        if improved:
            best = val_loss
        if w.main:
            if improved:
                save_checkpoint(clf, out / "best.pt", arch=arch, arch_kwargs=arch_kwargs, config=asdict(cfg),
                                extra=meta | {"epoch": epoch, "val_loss": val_loss, "num_outputs": 1})
            with atomic_path(state_path) as tmp:
                torch.save({"model": clf.module.net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "history": history, "best": best, "split_hash": split_hash}, tmp)
            _write_history(out, history)
        log(f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | val loss "
            f"{val_loss:.4f} acc {val_acc:.3f} | {row['images_per_second']:.0f} img/s{' | best' if improved else ''}")
        spent = bool(cfg.max_minutes) and (time.perf_counter() - started) / 60 > cfg.max_minutes
        if broadcast_flag(spent, w, dev) and epoch < cfg.epochs:  # rank 0's clock decides for every rank
            log(f"stopping after epoch {epoch}: the {cfg.max_minutes:g}-minute budget is spent")
            break
    return {"run": str(out), "best_val_loss": best, "epochs": len(history), "history": history,
            "decode_seconds": decode_s, "world_size": w.size, **meta}


def _ddp_model(clf: Classifier, w: World, dev: torch.device, log: Any) -> torch.nn.Module:
    """The module to call in training: clf.module itself, or under torchrun a DistributedDataParallel of it
    whose batch norms and dropouts see the global batch (the layers are swapped in place; same state dict)."""
    if not w.distributed:
        return clf.module
    from torch.nn.parallel import DistributedDataParallel

    _, others = global_batch_layers(clf.module)
    if others and dev.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        convert_sync_batchnorm(clf.module)  # in place below the top: timm's BatchNormAct2d -> SyncBatchNormAct
    elif others:
        log(f"note: {len(others)} batch-norm layers ({type(clf.module.get_submodule(others[0])).__name__}) keep "
            "per-process statistics on CPU: losses differ a little from one process")
    ids = [dev.index] if dev.type == "cuda" else None
    # the running statistics are the same on every rank (global batch): no buffer broadcast per forward
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel).parameters else {"broadcast_buffers": False}
    return DistributedDataParallel(clf.module, device_ids=ids, output_device=dev.index if ids else None, **sync)


def _val_logits(clf: Classifier, cache: np.ndarray, va: np.ndarray, w: World, batch_size: int = 128) -> np.ndarray:
    """`evaluate_logits` over the validation images, its batches shared among the ranks and gathered."""
    if not w.distributed:
        return evaluate_logits(clf, cache, va, batch_size)
    bounds = shard_bounds(len(va), batch_size)
    mine = {i: evaluate_logits(clf, cache, va[bounds[i][0]:bounds[i][1]], batch_size)
            for i in my_shards(len(bounds), w)}
    every = gather_shards(mine, w)
    return np.concatenate([every[i] for i in range(len(bounds))]) if bounds else np.zeros(0, np.float32)


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    write_text(out / "history.csv", buf.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="binary cross-entropy", title="loss")
    b.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    b.plot(ep, [h["val_acc"] for h in history], "o-", label="validation")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    a.legend()
    save_figure(fig, out / "history.png")
