"""Labelled image datasets on disk: the COVID-19 Radiography Database (current and older layouts), any
`root/<class>/*.png` folder, our phantoms, and a CSV of `file,label[,mask][,group]`; masks from the layout,
a CSV column or a separate folder matched by file name; seeded stratified splits written to `split.csv`."""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saliencylab.data.images import IMAGE_EXTENSIONS
from saliencylab.errors import UserError

# older releases name the folders differently; matched case-insensitively
ALIASES = {"covid": ("covid", "covid-19", "covid19"), "normal": ("normal",),
           "viral pneumonia": ("viral pneumonia", "viral_pneumonia", "pneumonia"),
           "lung_opacity": ("lung_opacity", "lung opacity")}


@dataclass(frozen=True)
class Record:
    """One image of a dataset.

    Attributes:
        file: path relative to the dataset root (the key in split.csv and predictions.csv).
        label: index into the dataset's classes (binary: 1 for the positive class, 0 for the negative).
        cls: the class folder's name.
        mask: lung mask path relative to the root (or absolute), or None.
        lesions: lesion mask path relative to the root, or None (phantoms only).
        group: patient or other grouping id, or None.
    """

    file: str
    label: int
    cls: str
    mask: str | None = None
    lesions: str | None = None
    group: str | None = None


@dataclass
class Dataset:
    root: Path
    records: list[Record]
    classes: tuple[str, ...]  # (negative, positive) for a binary task, else the model's class order
    layout: str  # 'current', 'flat', 'generic', 'mixed' or 'csv'

    @property
    def has_masks(self) -> bool:
        """True when at least one image has a lung mask."""
        return any(r.mask for r in self.records)

    def counts(self) -> dict[str, int]:
        """Images per class."""
        out = dict.fromkeys(self.classes, 0)
        for r in self.records:
            out[self.classes[r.label]] += 1
        return out


def _find_class_dir(root: Path, name: str) -> Path | None:
    wanted = {name.lower(), *ALIASES.get(name.lower(), ())}
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in wanted:
            return child
    return None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_dataset(root: str | Path, *, classes: Sequence[str] = ("Normal", "COVID"),
                 metadata_group: str | None = None) -> Dataset:
    """Find the images of two classes under `root`.

    Args:
        classes: (negative, positive) class folder names, or more for a multi-class model (its output
            order); aliases of older releases are accepted (COVID-19 for COVID, NORMAL for Normal).
        metadata_group: a column of `root/metadata.csv` that names each image's patient, so that one
            patient's images never straddle the split.

    Raises:
        UserError: the root or a class folder is missing or empty, or masks do not match their images.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder '{root}' does not exist; generate one with `saliencylab phantoms "
                        f"{root}` or point --data at the COVID-19 Radiography Database")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise UserError(f"--classes needs two or more different classes (negative,positive first); got {list(classes)}")
    records: list[Record] = []
    layouts = set()
    for label, name in enumerate(classes):
        folder = _find_class_dir(root, name)
        if folder is None:
            present = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "none"
            raise UserError(f"'{root}' has no folder for class '{name}' (folders there: {present}); "
                            "check --data and --classes")
        if (folder / "images").is_dir():
            images, layout = _images_in(folder / "images"), "current"
        else:
            known = {a for names in ALIASES.values() for a in names}
            images, layout = _images_in(folder), "flat" if folder.name.lower() in known else "generic"
        layouts.add(layout)
        if not images:
            raise UserError(f"class folder '{folder}' holds no images; check the dataset")
        masks_dir = folder / "masks" if layout == "current" else None
        lesions_dir = folder / "lesions" if layout == "current" else None
        mask_names = {p.name for p in _images_in(masks_dir)} if masks_dir and masks_dir.is_dir() else set()
        if mask_names:
            missing = [p.name for p in images if p.name not in mask_names]
            if missing:
                raise UserError(f"'{masks_dir}' lacks masks for {len(missing)} of {len(images)} images "
                                f"(first: {missing[0]}); restore them or remove the masks folder")
        lesion_names = {p.name for p in _images_in(lesions_dir)} if lesions_dir and lesions_dir.is_dir() else set()
        for p in images:
            rel = p.relative_to(root).as_posix()
            records.append(Record(
                file=rel, label=label, cls=name,
                mask=(masks_dir / p.name).relative_to(root).as_posix() if p.name in mask_names else None,
                lesions=(lesions_dir / p.name).relative_to(root).as_posix() if p.name in lesion_names else None,
            ))
    if metadata_group:
        records = _attach_groups(root, records, metadata_group)
    layout = layouts.pop() if len(layouts) == 1 else "mixed"
    return Dataset(root, records, tuple(classes), layout)


def load_labelled(data: str | Path, *, classes: Sequence[str], masks: str | Path | None = None) -> Dataset:
    """Any labelled dataset: a folder in one of `load_dataset`'s layouts or a CSV file (`load_csv`), with
    lung masks from `masks` (a folder, matched by file name) when given."""
    data = Path(data)
    ds = load_csv(data, classes=classes) if data.suffix.lower() == ".csv" else load_dataset(data, classes=classes)
    return attach_masks(ds, masks) if masks else ds


def _label_index(value: str, classes: Sequence[str], where: str) -> int:
    lowered = [c.lower() for c in classes]
    v = value.strip()
    if v.lower() in lowered:
        return lowered.index(v.lower())
    for i, c in enumerate(lowered):
        if v.lower() in ALIASES.get(c, ()):
            return i
    if v.isdigit() and int(v) < len(classes):
        return int(v)
    raise UserError(f"{where}: label '{value}' is not one of the classes {list(classes)} (or an index 0-"
                    f"{len(classes) - 1}); fix the label or pass --classes")


def load_csv(path: str | Path, *, classes: Sequence[str]) -> Dataset:
    """A dataset listed in a CSV with a header `file,label[,mask][,group]`: paths relative to the CSV's
    folder, labels as class names (or indices into `classes`), masks optional per row.

    Files that do not exist are kept (they are reported as unreadable when decoded); a listed mask that
    does not exist is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path}: no such CSV file; give a dataset folder or a CSV of file,label[,mask][,group]")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise UserError(f"--classes needs two or more different classes (negative,positive first); got {list(classes)}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"'{path}' is not a readable CSV ({err}); save it as UTF-8 text with a header row") from None
    columns = set(rows[0]) if rows else set()
    if not {"file", "label"} <= columns:
        raise UserError(f"'{path}' needs the columns file,label[,mask][,group]; it has "
                        f"{', '.join(sorted(c for c in columns if c)) or 'none'}")
    root = path.parent
    records = []
    for n, row in enumerate(rows, start=2):
        where = f"'{path}' line {n}"
        file = (row.get("file") or "").strip()
        if not file:
            raise UserError(f"{where}: empty file name; fill it in or delete the line")
        label = _label_index(row.get("label") or "", classes, where)
        mask = (row.get("mask") or "").strip() or None
        if mask and not (root / mask).is_file():
            raise UserError(f"{where}: mask '{mask}' does not exist (paths are relative to the CSV's folder)")
        records.append(Record(file=file, label=label, cls=classes[label], mask=mask,
                              group=(row.get("group") or "").strip() or None))
    if not records:
        raise UserError(f"'{path}' lists no images; add rows of file,label")
    return Dataset(root, records, tuple(classes), "csv")


def attach_masks(ds: Dataset, masks: str | Path) -> Dataset:
    """Lung masks from a folder (searched recursively), matched to images by file name (or by stem, so that
    `a.jpg` finds `a.png`); images without a match keep no mask."""
    folder = Path(masks)
    if not folder.is_dir():
        raise UserError(f"--masks {folder}: no such folder; give the folder that holds the lung masks")
    found = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    by_name = {p.name: p for p in found}
    by_stem = {p.stem: p for p in found}
    out, hits = [], 0
    for r in ds.records:
        name = Path(r.file).name
        m = by_name.get(name) or by_stem.get(Path(name).stem)
        hits += m is not None
        out.append(Record(r.file, r.label, r.cls, str(m.resolve()) if m else None, r.lesions, r.group))
    if not hits:
        example = Path(ds.records[0].file).name
        raise UserError(f"--masks {folder}: no mask there is named like an image (e.g. {example}); masks are "
                        "matched by file name")
    return Dataset(ds.root, out, ds.classes, ds.layout)


def _attach_groups(root: Path, records: list[Record], column: str) -> list[Record]:
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise UserError(f"--group-column {column}: '{meta}' does not exist; drop the option or add the file")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        raise UserError(f"--group-column {column}: '{meta}' has no such column "
                        f"(columns: {', '.join(rows[0]) if rows else 'none'})")
    by_file = {r.get("file", ""): r[column] for r in rows}
    return [Record(r.file, r.label, r.cls, r.mask, r.lesions, by_file.get(r.file, r.file)) for r in records]


def load_mask(root: str | Path, rel: str | None, size: int) -> np.ndarray | None:
    """A mask file (relative to the dataset root) as bool (size, size), resized with nearest neighbour;
    None when there is no mask."""
    if not rel:
        return None
    from PIL import Image

    m = Image.open(Path(root) / rel).convert("L").resize((size, size), Image.NEAREST)
    return np.asarray(m) > 127


def read_metadata(root: str | Path) -> dict[str, dict[str, str]]:
    """Phantom metadata (file -> row), or {} when the dataset has none."""
    meta = Path(root) / "metadata.csv"
    if not meta.is_file():
        return {}
    with open(meta, newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f) if "file" in r}


def make_split(records: Sequence[Record], *, test_fraction: float = 0.1, val_fraction: float = 0.1,
               seed: int = 0) -> list[str]:
    """Stratified, seeded train / val / test assignment, one per record (groups kept together).

    test_fraction of all images go to test (the article's 10%); val_fraction of the rest to val.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

    n = len(records)
    labels = np.array([r.label for r in records])
    if min(np.bincount(labels, minlength=2)) < 3:
        raise UserError("each class needs at least 3 images to split into train, validation and test")
    split = np.array(["train"] * n, dtype=object)
    groups = [r.group for r in records]
    idx = np.arange(n)

    def carve(pool: np.ndarray, fraction: float, name: str, salt: int) -> None:
        if groups[0] is not None:
            k = max(2, round(1 / fraction))
            folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + salt)
            _, chosen = next(folds.split(pool, labels[pool], [groups[i] for i in pool]))
        else:
            # sklearn's own count (ceil), raised to one image per class so that small datasets split too
            n_pick = max(2, math.ceil(fraction * len(pool)))
            if len(pool) - n_pick < 2:
                raise UserError(f"{n} images are too few to carve a {name} split of {fraction:.0%} and keep both "
                                "classes in training; add images (at least 3 per class and split)")
            sss = StratifiedShuffleSplit(n_splits=1, test_size=n_pick, random_state=seed + salt)
            _, chosen = next(sss.split(pool, labels[pool]))
        split[pool[chosen]] = name

    carve(idx, test_fraction, "test", 0)
    carve(idx[split == "train"], val_fraction, "val", 1)
    return split.tolist()


def split_text(records: Sequence[Record], split: Sequence[str]) -> tuple[str, str]:
    """split.csv's text (file, label, class, split, group) and its SHA-256 (first 16 hex)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "label", "class", "split", "group"])
    for r, s in zip(records, split, strict=True):
        w.writerow([r.file, r.label, r.cls, s, r.group or ""])
    text = buf.getvalue()
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def write_split(path: str | Path, records: Sequence[Record], split: Sequence[str]) -> str:
    """Write split.csv atomically; return its SHA-256 (first 16 hex)."""
    from saliencylab.fsutil import write_text

    text, digest = split_text(records, split)
    write_text(path, text)
    return digest


def parse_split(path: str | Path) -> dict[str, str]:
    """file -> split from split.csv.

    Raises:
        ValueError: the reason the file is not a split file (unreadable, columns or values missing).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "split"} <= set(reader.fieldnames):
                raise ValueError(f"it lacks the 'file' and 'split' columns (has {', '.join(reader.fieldnames or [])})")
            out = {}
            for n, row in enumerate(reader, start=2):
                if row["split"] not in ("train", "val", "test") or not row["file"]:
                    raise ValueError(f"line {n} has split '{row['split']}', not train, val or test")
                out[row["file"]] = row["split"]
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"it is not a UTF-8 CSV file ({type(err).__name__})") from None
    return out


def read_split(path: str | Path) -> dict[str, str]:
    """file -> split from split.csv; a broken file is a UserError that names it."""
    try:
        return parse_split(path)
    except ValueError as err:
        raise UserError(f"'{path}' is not a split file that saliencylab wrote: {err}; train the run again") from None
