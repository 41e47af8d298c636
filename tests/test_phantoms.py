"""Phantom generator: layout, ground truth that agrees with the pixels, shortcut control, determinism."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliencylab.data import anatomy, shortcuts
from saliencylab.data.phantoms import HEADER, PhantomConfig, draw, generate, parse_rates
from saliencylab.errors import UserError


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ph") / "phantoms"
    generate(PhantomConfig(n_covid=8, n_normal=8, size=96, seed=3, marker_rate={"COVID": 1.0, "Normal": 0.0},
                           text_rate={"COVID": 0.0, "Normal": 1.0}, workers=1, anatomy="drawn"), root, progress=False)
    return root


def test_layout_and_metadata(small):
    for cls in ("COVID", "Normal"):
        for sub in ("images", "masks", "lesions", "shortcuts"):
            names = sorted(p.name for p in (small / cls / sub).iterdir())
            assert names == sorted(f"{cls}-{i}.png" for i in range(1, 9))
    rows = _rows(small)
    assert len(rows) == 16 and {r["class"] for r in rows} == {"COVID", "Normal"}
    assert all(r["marker"] == ("1" if r["class"] == "COVID" else "0") for r in rows)  # rates 1.0 / 0.0
    assert all(r["text"] == ("0" if r["class"] == "COVID" else "1") for r in rows)
    assert list(rows[0]) == HEADER and HEADER[:7] == ["file", "class", "lesion_area", "lung_area", "marker",
                                                      "marker_box", "seed"]  # older readers keep working


def test_masks_agree_with_images(small):
    for r in _rows(small):
        img = np.asarray(Image.open(small / r["file"])).astype(float) / 255
        lungs = np.asarray(Image.open(small / r["file"].replace("images", "masks"))) > 127
        lesions = np.asarray(Image.open(small / r["file"].replace("images", "lesions"))) > 127
        assert not (lesions & ~lungs).any()  # lesions lie inside the lungs
        assert 0.15 < lungs.mean() < 0.5  # two lung fields of plausible size
        assert img[lungs].mean() < img[~lungs & (img > 0.2)].mean()  # lungs are darker than soft tissue
        assert (lesions.mean() > 0) == (r["class"] == "COVID")
        assert abs(float(r["lesion_area"]) - lesions.mean()) < 1e-4
        bits = np.asarray(Image.open(small / r["file"].replace("images", "shortcuts")))
        for box in filter(None, r["lesion_boxes"].split(";")):
            x0, y0, x1, y1 = map(int, box.split())
            assert lesions[y0:y1, x0:x1].any() and lesions[y0, x0:x1].any() and lesions[y0:y1, x0].any()
        if r["marker"] == "1":
            x0, y0, x1, y1 = map(int, r["marker_box"].split())
            glyph = shortcuts.marker_glyph("L" if x0 > 48 else "R", y1 - y0)
            assert img[y0:y1, x0:x1][glyph].mean() > 0.65  # the bright letter is where the metadata says
            assert (bits[y0:y1, x0:x1] & shortcuts.BITS["marker"]).all()
        if r["text"] == "1":
            x0, y0, x1, y1 = map(int, r["text_box"].split())
            assert img[y0:y1, x0:x1].max() > 0.9 and (bits[y0:y1, x0:x1] & shortcuts.BITS["text"]).all()


def test_metadata_seed_regenerates_the_file(small):
    """The probes redraw an image from its metadata row: it must be the very same image."""
    import json

    settings = json.loads(json.loads((small / "phantoms.json").read_text())["settings"])
    assert settings["anatomy"] == "drawn"
    for r in _rows(small)[:4] + _rows(small)[-4:]:
        img = shortcuts.redraw(r, settings)
        stored = np.asarray(Image.open(small / r["file"]))
        np.testing.assert_array_equal((img * 255 + 0.5).astype(np.uint8), stored)


def test_deterministic_and_marker_independent_of_anatomy():
    a = draw(123, True, size=64)
    b = draw(123, True, size=64)
    np.testing.assert_array_equal(a.image, b.image)
    m = draw(123, True, size=64, marker=True)
    x0, y0, x1, y1 = m.marker_box
    outside = np.ones((64, 64), bool)
    outside[y0:y1, x0:x1] = False
    assert np.abs(m.image[outside] - a.image[outside]).max() < 0.06  # only the marker (and its blur) differs
    np.testing.assert_array_equal(m.lungs, a.lungs)
    normal = draw(123, False, size=64)  # the findings have their own stream: same anatomy without them
    np.testing.assert_array_equal(normal.lungs, a.lungs)
    assert not normal.lesions.any() and a.lesions.any()


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
    with pytest.raises(UserError, match="--device-rate"):
        generate(PhantomConfig(n_covid=1, n_normal=1, device_rate={"COVID": -0.1, "Normal": 0}), tmp_path / "r")
    with pytest.raises(UserError, match="--anatomy"):
        generate(PhantomConfig(n_covid=1, n_normal=1, anatomy="cartoon"), tmp_path / "r")


def test_heart_on_the_patients_left():
    """The heart's shadow brightens the lower medial lung on the image's right (the patient's left) more
    than on the image's left; over films, the difference is clear."""
    diffs = []
    for seed in range(12):
        ph = draw(seed, False, size=96, anatomy="drawn")
        v, u = np.mgrid[0:96, 0:96] / 96
        zone = ph.lungs & (v > 0.5) & (np.abs(u - 0.5) < 0.2)
        diffs.append(ph.image[zone & (u > 0.5)].mean() - ph.image[zone & (u < 0.5)].mean())
    assert np.mean(diffs) > 0.05 and np.mean(np.array(diffs) > 0) > 0.8


def test_anatomy_real_without_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(anatomy, "data_dir", lambda: None)
    with pytest.raises(UserError, match=r"\[anatomy\] extra"):
        generate(PhantomConfig(n_covid=1, n_normal=1, anatomy="real"), tmp_path / "p")
    out = generate(PhantomConfig(n_covid=1, n_normal=1, size=64, workers=1), tmp_path / "q", progress=False)
    assert out["anatomy"] == "drawn"  # auto falls back to the drawn lungs


def test_split_lungs_filters_empty_and_partial_masks():
    m = np.zeros((64, 64), bool)
    assert anatomy.split_lungs(m) is None
    m[10:50, 8:28] = True
    assert anatomy.split_lungs(m) is None  # one lung only
    m[12:52, 36:58] = True
    left, right = anatomy.split_lungs(m)
    assert left[:, :30].sum() == left.sum() == 800 and right.sum() == 880
    area, wh, lr = anatomy.lung_stats(left, right)
    assert area == pytest.approx(1680 / 4096) and wh == pytest.approx(50 / 42) and lr == pytest.approx(880 / 800)
    m[40:64, 36:58] = True
    assert anatomy.split_lungs(m) is None  # cut off at the image's lower edge


needs_real = pytest.mark.skipif(not anatomy.available(), reason="needs the [anatomy] extra (torchxrayvision)")


@needs_real
def test_real_lungs_and_boxes_follow_the_real_distribution():
    """A small-sample version of benchmarks/bench_phantoms.py (which measures KS < 0.1 on 600 films):
    with 60 films the KS statistics stay under 0.25 (the drawn fallback's lung area, for contrast, fails)."""
    from scipy.stats import ks_2samp

    real = anatomy.load()
    assert len(real.names) > 300 and len(real.boxes) > 9000
    areas, drawn, centres = [], [], []
    for i in range(60):
        ph = draw(1000 + i, True, size=64, anatomy="real")
        areas.append(ph.lungs.mean())
        drawn.append(draw(1000 + i, False, size=64, anatomy="drawn").lungs.mean())
        centres += [((b[1] + b[3]) / 2 / 64) for b in ph.lesion_boxes]
    assert ks_2samp(areas, real.stats[:, 0]).statistic < 0.25
    assert ks_2samp(drawn, real.stats[:, 0]).statistic > 0.25
    real_cy = (real.boxes[:, 1] + real.boxes[:, 3]) / 2
    assert ks_2samp(centres, real_cy).statistic < 0.25
