"""Phantom generator: layout, ground truth that agrees with the pixels, shortcut control, determinism."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliencylab.data.phantoms import PhantomConfig, draw, generate, parse_rates
from saliencylab.errors import UserError


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ph") / "phantoms"
    generate(PhantomConfig(n_covid=8, n_normal=8, size=96, seed=3, marker_rate={"COVID": 1.0, "Normal": 0.0},
                           workers=1), root, progress=False)
    return root


def test_layout_and_metadata(small):
    for cls in ("COVID", "Normal"):
        for sub in ("images", "masks", "lesions"):
            names = sorted(p.name for p in (small / cls / sub).iterdir())
            assert names == sorted(f"{cls}-{i}.png" for i in range(1, 9))
    rows = _rows(small)
    assert len(rows) == 16 and {r["class"] for r in rows} == {"COVID", "Normal"}
    assert all(r["marker"] == ("1" if r["class"] == "COVID" else "0") for r in rows)  # rates 1.0 / 0.0


def test_masks_agree_with_images(small):
    for r in _rows(small):
        img = np.asarray(Image.open(small / r["file"])).astype(float) / 255
        lungs = np.asarray(Image.open(small / r["file"].replace("images", "masks"))) > 127
        lesions = np.asarray(Image.open(small / r["file"].replace("images", "lesions"))) > 127
        assert not (lesions & ~lungs).any()  # lesions lie inside the lungs
        assert 0.15 < lungs.mean() < 0.45  # two lung fields of plausible size
        assert img[lungs].mean() < img[~lungs & (img > 0.2)].mean()  # lungs are darker than soft tissue
        assert (lesions.mean() > 0) == (r["class"] == "COVID")
        assert abs(float(r["lesion_area"]) - lesions.mean()) < 1e-4
        if r["marker"] == "1":
            x0, y0, x1, y1 = map(int, r["marker_box"].split())
            stem = img[y0:y1, x0:x0 + max(2, (y1 - y0) // 5)]
            assert stem.mean() > 0.75  # the bright "L" is where the metadata says


def test_metadata_seed_regenerates_the_file(small):
    """The audit's marker probe redraws an image from its seed: it must be the very same image."""
    for r in _rows(small)[:4] + _rows(small)[-4:]:
        ph = draw(int(r["seed"]), r["class"] == "COVID", size=96, marker=r["marker"] == "1")
        stored = np.asarray(Image.open(small / r["file"]))
        np.testing.assert_array_equal((ph.image * 255 + 0.5).astype(np.uint8), stored)


def test_deterministic_and_marker_independent_of_anatomy():
    a = draw(123, True, size=64)
    b = draw(123, True, size=64)
    np.testing.assert_array_equal(a.image, b.image)
    m = draw(123, True, size=64, marker=True)
    x0, y0, x1, y1 = m.marker_box
    outside = np.ones((64, 64), bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(m.image[outside], a.image[outside])  # only the marker differs
    np.testing.assert_array_equal(m.lungs, a.lungs)


def test_workers_do_not_change_the_data(tmp_path):
    cfg = dict(n_covid=3, n_normal=3, size=64, seed=1)
    generate(PhantomConfig(**cfg, workers=1), tmp_path / "one", progress=False)
    generate(PhantomConfig(**cfg, workers=2), tmp_path / "two", progress=False)
    for p in sorted((tmp_path / "one").rglob("*.png")):
        assert p.read_bytes() == (tmp_path / "two" / p.relative_to(tmp_path / "one")).read_bytes()
    assert (tmp_path / "one" / "metadata.csv").read_text() == (tmp_path / "two" / "metadata.csv").read_text()


def test_rerun_reuses_and_bad_options(tmp_path):
    cfg = PhantomConfig(n_covid=2, n_normal=2, size=64, workers=1)
    first = generate(cfg, tmp_path / "p", progress=False)
    assert "images_per_second" in first and first["images"] == 4
    assert generate(cfg, tmp_path / "p", progress=False)["reused"]
    with pytest.raises(UserError, match="between 0 and 1"):
        generate(PhantomConfig(n_covid=2, n_normal=2, marker_rate={"COVID": 1.5, "Normal": 0}), tmp_path / "q")
    assert parse_rates("COVID=0.9,normal=0.1") == {"COVID": 0.9, "Normal": 0.1}
    with pytest.raises(UserError, match="CLASS=VALUE"):
        parse_rates("Pneumonia=0.2")
