"""What `evaluate` and `audit` run on: a model and labelled images, however the user named them.

Three ways in, one result (`Subject`): a training run folder (its checkpoint, its data's test split), an
`explain` output folder (its model, images and targets), or any model that `load_model` takes with any
labelled folder or CSV (`--model M --data DIR`). Images stream through `load_batch` in batches, so memory
stays flat in the number of images.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliencylab.data.datasets import Dataset, Record, load_labelled, read_metadata, read_split
from saliencylab.errors import UserError
from saliencylab.models.registry import Classifier, load_checkpoint


@dataclass(frozen=True)
class Subject:
    """A model and the images to run it on.

    Attributes:
        clf: the classifier (on the CPU).
        records: the chosen images, in order.
        root: where `records[i].file` is relative to ('' for explain sources, which are full paths).
        classes: class names in the model's output order (binary: negative, positive).
        kind: 'run', 'explain' or 'model'.
        origin: how the subject was named, for the output files ({'run': ...} / {'explain': ...} /
            {'model': ..., 'weights': ...}, plus 'data' and 'masks').
        base: the folder whose default output subfolders (eval, audit) are used.
        targets: for an explain folder, the class each image was explained for (by file).
        labelled: whether records carry true labels.
        meta: phantom metadata rows by file ({} for other data).
        config: the training config of a run ({} otherwise).
        scope: 'test split' or 'all images'.
    """

    clf: Classifier
    records: tuple[Record, ...]
    root: Path
    classes: tuple[str, ...]
    kind: str
    origin: dict[str, Any]
    base: Path
    targets: dict[str, int] = field(default_factory=dict)
    labelled: bool = True
    meta: dict[str, dict[str, str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    scope: str = "all images"

    @property
    def single_logit(self) -> bool:
        """True for a binary model with one output (its sigmoid is the positive class's probability)."""
        return self.clf.num_outputs == 1

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def has_lungs(self) -> bool:
        return any(r.mask for r in self.records)

    @property
    def has_lesions(self) -> bool:
        return any(r.lesions for r in self.records)

    def default_out(self, what: str, data: str | None) -> Path:
        """RUN/<what>, RUN/<what>-<data> for other data, or <explain folder>/<what>."""
        if self.kind == "run" and data:
            return self.base / f"{what}-{Path(data).stem}"
        return self.base / what


def load_run(run: str | Path) -> tuple[Path, Classifier, dict[str, Any]]:
    """The run folder, its best checkpoint and its training config."""
    run = Path(run)
    ckpt = run / "best.pt"
    if not ckpt.is_file():
        hint = ("; to use a model without a run, pass --model M --data DIR" if run.is_dir()
                else "; train first, or pass --model M --data DIR")
        raise UserError(f"'{run}' has no best.pt (and no results.json of `saliencylab explain`){hint}: "
                        f"`saliencylab train --out {run}` writes one")
    clf = load_checkpoint(ckpt)
    return run, clf, dict(clf.extra.get("config", {}))


def resolve(run: str | Path | None = None, *, model: str | None = None, weights: str | None = None,
            data: str | Path | None = None, classes: Sequence[str] | None = None, masks: str | Path | None = None,
            n: int | None = None, seed: int = 0, model_kwargs: dict[str, Any] | None = None,
            device: str | torch.device = "cpu") -> Subject:
    """The subject named by a run / explain folder, or by a model and a dataset.

    Args:
        run: a training run folder or an `explain` output folder (or None with `model`).
        model, weights: anything `load_model` takes (used when `run` is None).
        data: a dataset folder or CSV (default: the run's own data; required with `model`).
        classes: class names in the model's output order (default: the model's own).
        masks: a folder of lung masks matched by file name.
        n: a seeded sample of this many images (None: every image).
        model_kwargs: preprocessing for `load_model` that the model file does not carry (input_size,
            channels, mean, std; see `saliencylab.models.preprocessing_kwargs`).
        device: where the model runs ('auto', 'cpu', 'cuda'; see `saliencylab.devices.choose_device`);
            `load_batch` puts the images there too.
    """
    from saliencylab.devices import choose_device

    dev = choose_device(device)
    if run is not None and model is not None:
        raise UserError(f"give either a run folder ({run}) or --model {model}, not both")
    if run is None and model is None:
        raise UserError("name what to check: a run folder, an explain folder, or --model M --data DIR")
    if run is not None and (Path(run) / "results.json").is_file() and not (Path(run) / "best.pt").is_file():
        return _explain_subject(Path(run), data=data, classes=classes, masks=masks, n=n, seed=seed, device=dev)
    if run is not None:
        run_dir, clf, cfg = load_run(run)
        root = data or cfg.get("data")
        if not root:
            raise UserError(f"'{run_dir}/best.pt' does not record its dataset; pass --data DIR")
        names = tuple(classes or cfg.get("classes") or clf.class_names)
        ds = _dataset(clf, str(run_dir / "best.pt"), root, names, masks)
        split = read_split(run_dir / "split.csv") if (run_dir / "split.csv").is_file() else {}
        pool = [r for r in ds.records if split.get(r.file) == "test"]
        scope = "test split" if pool else "all images"
        return Subject(clf.to(dev), _sample(pool or ds.records, n, seed), ds.root, ds.classes, "run",
                       {"run": str(run_dir), "data": str(root), "masks": str(masks) if masks else None}, run_dir,
                       meta=read_metadata(ds.root), config=cfg, scope=scope)
    from saliencylab.models.registry import load_model

    assert model is not None
    if not data:
        raise UserError(f"--model {model}: also give --data DIR (a dataset folder or a CSV of file,label[,mask])")
    clf = load_model(model, weights=weights, device=dev, **(model_kwargs or {}))
    names = tuple(classes or clf.class_names)
    ds = _dataset(clf, model, data, names, masks)
    base = Path("runs") / _slug(f"{Path(model).stem}-{Path(data).stem}")
    return Subject(clf, _sample(ds.records, n, seed), ds.root, ds.classes, "model",
                   {"model": model, "weights": weights, "data": str(data), "masks": str(masks) if masks else None},
                   base, meta=read_metadata(ds.root))


def _dataset(clf: Classifier, model: str, data: str | Path, classes: tuple[str, ...],
             masks: str | Path | None) -> Dataset:
    check_classes(clf, model, classes, str(data))
    return load_labelled(data, classes=classes, masks=masks)


def check_classes(clf: Classifier, model: str, classes: Sequence[str], data: str) -> None:
    """A one-line error naming both when the model's outputs and the data's classes cannot match."""
    k = clf.num_outputs
    want = 2 if k == 1 else k
    if len(classes) != want:
        kind = "one logit (a binary model)" if k == 1 else f"{k} outputs"
        raise UserError(f"--model {model} has {kind} but --data {data} is read with {len(classes)} classes "
                        f"({', '.join(classes)}); pass --classes with {want} names in the model's output order"
                        + (" (negative first)" if want == 2 else ""))


def check_input(clf: Classifier, model: str, data: str, x: torch.Tensor) -> None:
    """A one-line error naming both when the model refuses the data's images (channels, size)."""
    try:
        with torch.no_grad():
            clf.module.eval()(x[:1])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"--model {model} does not accept the images of {data} as {tuple(x.shape[1:])} "
                        f"(channels, height, width): {first}; check the model's --channels/--input-size") from None


def _sample(records: Sequence[Record], n: int | None, seed: int) -> tuple[Record, ...]:
    """Every record, or a seeded sample of n kept in dataset order."""
    if n is None or n >= len(records):
        return tuple(records)
    idx = np.random.default_rng(seed).permutation(len(records))[:n]
    return tuple(records[i] for i in sorted(idx))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _explain_subject(folder: Path, *, data: str | Path | None, classes: Sequence[str] | None,
                     masks: str | Path | None, n: int | None, seed: int,
                     device: torch.device = torch.device("cpu")) -> Subject:
    """An explain folder: its model, and its own images and targets (or `data` instead of its images)."""
    from saliencylab.models.registry import load_model

    res = json.loads((folder / "results.json").read_text())
    args = res.get("model_args") or {"model": res["model"]["name"], "weights": None}
    # reload exactly as explain loaded it: the preprocessing flags ride along in model_args
    clf = load_model(args["model"], device=device, **{k: v for k, v in args.items() if k != "model"})
    origin = {"explain": str(folder), "model": args["model"], "weights": args.get("weights"),
              "data": str(data) if data else None, "masks": str(masks) if masks else None}
    if data:
        names = tuple(classes or clf.class_names)
        ds = _dataset(clf, args["model"], data, names, masks)
        return Subject(clf, _sample(ds.records, n, seed), ds.root, ds.classes, "explain", origin, folder,
                       meta=read_metadata(ds.root))
    images = res.get("images") or []
    if not images:
        raise UserError(f"'{folder}/results.json' lists no images; run `saliencylab explain` again")
    records = tuple(Record(file=im["source"], label=-1, cls="") for im in images)
    targets = {im["source"]: int(im["target"]["index"]) for im in images}
    return Subject(clf, _sample(records, n, seed), Path(""), tuple(clf.class_names), "explain", origin, folder,
                   targets=targets, labelled=False)


def load_batch(subject: Subject, records: Sequence[Record]) -> tuple[torch.Tensor, list[Record],
                                                                       list[tuple[str, str]]]:
    """Decode a batch: x[B, C, H, W] in [0, 1] on the model's device for the readable records, those records,
    and the unreadable ones as (file, reason)."""
    from saliencylab.data.cache import decode_cache, to_batch

    clf = subject.clf
    if subject.kind == "explain" and subject.targets:  # explain sources: paths or sample:<name>
        from saliencylab.data.images import load_image

        xs, ok, bad = [], [], []
        for r in records:
            try:
                xs.append(clf.preprocess(load_image(r.file).pixels))
                ok.append(r)
            except UserError as err:
                bad.append((r.file, str(err)))
        x = torch.stack(xs) if xs else torch.zeros(0, clf.channels, *clf.input_size)
        return x.to(clf.device), ok, bad
    ds = Dataset(subject.root, list(records), subject.classes, "")
    cache, bad = decode_cache(ds, list(records), clf.input_size[0], workers=1, progress=False,
                              channels=3 if clf.channels == 3 else 1)
    failed = {f for f, _ in bad}
    keep = np.array([r.file not in failed for r in records], dtype=bool)
    ok = [r for r, k in zip(records, keep, strict=True) if k]
    x = to_batch(cache[keep], np.arange(len(ok)), clf.channels).contiguous()
    if clf.input_size[0] != clf.input_size[1]:
        x = torch.nn.functional.interpolate(x, size=clf.input_size, mode="bilinear", align_corners=False)
    return x.to(clf.device), ok, bad


def class_probabilities(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Probabilities [B, K] in eval mode (x is moved to the model's device); a single-logit model gives [1 - p, p]."""
    from saliencylab.devices import module_device
    from saliencylab.methods._common import eval_mode

    with eval_mode(model), torch.inference_mode():
        logits = model(x.to(module_device(model))).double()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], 1).cpu().numpy()
    return torch.softmax(logits, 1).cpu().numpy()
