"""Dataset layouts (current, flat, generic), problems in the data, and the split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliencylab.data.datasets import load_dataset, make_split, read_split, write_split
from saliencylab.errors import UserError


def _png(path: Path, size=(16, 16), seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(path)


def test_current_layout_with_masks(tmp_path):
    for cls, n in (("COVID", 3), ("Normal", 4), ("Viral Pneumonia", 2)):
        for i in range(1, n + 1):
            _png(tmp_path / cls / "images" / f"{cls}-{i}.png", (20, 20))
            _png(tmp_path / cls / "masks" / f"{cls}-{i}.png", (16, 16))
    ds = load_dataset(tmp_path)
    assert ds.layout == "current" and ds.counts() == {"Normal": 4, "COVID": 3}
    assert all(r.mask and r.mask.startswith(r.cls + "/masks/") for r in ds.records)
    assert {r.label for r in ds.records if r.cls == "COVID"} == {1}
    vp = load_dataset(tmp_path, classes=("Normal", "Viral Pneumonia"))  # the space in the name is fine
    assert vp.counts() == {"Normal": 4, "Viral Pneumonia": 2}


def test_flat_older_release_and_generic(tmp_path):
    for cls in ("COVID-19", "NORMAL"):
        for i in range(3):
            _png(tmp_path / "old" / cls / f"{cls}-{i}.png")
    ds = load_dataset(tmp_path / "old")
    assert ds.layout == "flat" and ds.counts() == {"Normal": 3, "COVID": 3}
    for cls in ("cat", "dog"):
        for i in range(3):
            _png(tmp_path / "gen" / cls / f"{i}.jpg")
    gen = load_dataset(tmp_path / "gen", classes=("dog", "cat"))
    assert gen.layout == "generic" and all(r.mask is None for r in gen.records)


def test_problems_in_the_data(tmp_path):
    with pytest.raises(UserError, match="does not exist; generate one"):
        load_dataset(tmp_path / "nothing")
    _png(tmp_path / "COVID" / "images" / "COVID-1.png")
    with pytest.raises(UserError, match="no folder for class 'Normal' .*COVID"):
        load_dataset(tmp_path)
    (tmp_path / "Normal" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        load_dataset(tmp_path)
    _png(tmp_path / "Normal" / "images" / "Normal-1.png")
    _png(tmp_path / "Normal" / "masks" / "other.png")
    with pytest.raises(UserError, match="lacks masks for 1 of 1 images"):
        load_dataset(tmp_path)


def test_split_is_stratified_seeded_and_written(tmp_path):
    from saliencylab.data.datasets import Record

    recs = [Record(f"{c}/{i}.png", int(c == "COVID"), c) for c in ("COVID", "Normal") for i in
            range(200 if c == "COVID" else 600)]
    a = make_split(recs, seed=0)
    assert a == make_split(recs, seed=0) and a != make_split(recs, seed=1)
    counts = Counter((r.cls, s) for r, s in zip(recs, a, strict=True))
    assert counts["COVID", "test"] == 20 and counts["Normal", "test"] == 60  # 10%, per class
    assert counts["COVID", "val"] == 18 and counts["Normal", "val"] == 54  # 10% of the rest
    digest = write_split(tmp_path / "split.csv", recs, a)
    assert len(digest) == 16 and read_split(tmp_path / "split.csv")[recs[0].file] == a[0]


def test_groups_never_straddle_the_split():
    from saliencylab.data.datasets import Record

    recs = [Record(f"{i}.png", int(i % 4 == 0), "x", group=f"patient{i // 3}") for i in range(600)]
    split = make_split(recs, seed=0)
    by_group: dict[str, set[str]] = {}
    for r, s in zip(recs, split, strict=True):
        by_group.setdefault(r.group, set()).add(s)
    assert all(len(v) == 1 for v in by_group.values())
    assert 0.05 < split.count("test") / len(split) < 0.15


def test_small_datasets_split_with_one_image_per_class_in_each_part():
    from saliencylab.data.datasets import Record, make_split

    recs = [Record(f"n{i}.png", 0, "Normal") for i in range(6)] + [Record(f"c{i}.png", 1, "COVID") for i in range(6)]
    split = make_split(recs)
    labels = {part: sorted(r.label for r, s in zip(recs, split, strict=True) if s == part) for part in set(split)}
    # 10% of 12 images is 1.2, which sklearn rounds up to 2 (ceil): one image per class for test, then for val
    assert labels == {"test": [0, 1], "val": [0, 1], "train": [0] * 4 + [1] * 4}
