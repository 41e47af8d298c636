"""Shortcut families: each changes only its own pixels (or the film, for site and position), and each probe
flags a model that reads the family while a model that reads another family stays unflagged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliencylab.data import shortcuts
from saliencylab.data.glyphs import render
from saliencylab.data.phantoms import PhantomConfig, draw, families_for, image_seed

SIZE = 64


def _rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """Metadata-like rows with every family absent (the probes switch one at a time)."""
    out = []
    for i in range(offset + 1, offset + n + 1):
        cls = "COVID" if i % 2 else "Normal"
        out.append({"class": cls, "seed": str(image_seed(5, cls, i)), "marker": "0", "text": "0", "site": "0",
                    "position": "PA", "devices": "0"})
    return out


SETTINGS = {"size": SIZE, "anatomy": "drawn", "lesion_scale": 1.0, "exposure_shift": {}}


def _local_contrast(x: torch.Tensor) -> torch.Tensor:
    return x - F.avg_pool2d(x, 7, 1, 3, count_include_pad=False)


class Detector(nn.Module):
    """A hand-set 'classifier' that reads one family only: it calls an image positive when the family's
    feature passes a threshold (logit = 10 * (feature - threshold) / scale)."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1].double()
        s = x.shape[-1]
        r, c = torch.arange(s)[:, None] / s, torch.arange(s)[None, :] / s
        lc = _local_contrast(x)[:, 0]
        if self.family == "marker":  # sharp bright strokes in the upper corners
            region = (r < 0.22) & ((c < 0.2) | (c > 0.8))
            feat, thr, scale = ((lc > 0.35) & (x[:, 0] > 0.6) & region).sum((1, 2)).double(), 4.0, 4.0
        elif self.family == "text":  # sharp bright strokes in the lower band
            feat, thr, scale = ((lc > 0.12) & (x[:, 0] > 0.85) & (r > 0.75)).sum((1, 2)).double(), 10.0, 10.0
        elif self.family == "site":  # a noise-free black collimation border
            feat, thr, scale = 0.01 - x[:, 0, :, :2].std((1, 2)), 0.0, 0.01
        else:  # devices: very sharp bright lines and rings over the chest
            region = (r > 0.25) & (r < 0.75) & (c > 0.1) & (c < 0.9)
            feat, thr, scale = ((lc > 0.3) & region).sum((1, 2)).double(), 10.0, 10.0
        return (10 * (feat - thr) / scale).float()[:, None]


class Template(nn.Module):
    """A linear 'classifier' for the patient position: the mean difference between AP and PA films on
    calibration images, thresholded halfway between the two groups' mean scores."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        super().__init__()
        a = np.stack([shortcuts.redraw(r, SETTINGS, position="AP") for r in rows])
        b = np.stack([shortcuts.redraw(r, SETTINGS, position="PA") for r in rows])
        t = torch.from_numpy(a.mean(0) - b.mean(0)).double()
        self.register_buffer("t", t / t.norm())
        sa = (torch.from_numpy(a).double() * self.t).sum((1, 2))
        sb = (torch.from_numpy(b).double() * self.t).sum((1, 2))
        self.bias, self.scale = float((sa.mean() + sb.mean()) / 2), float(20 / (sa.mean() - sb.mean()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x[:, 0].double() * self.t).sum((1, 2))
        return ((score - self.bias) * self.scale).float()[:, None]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {f: Detector(f) for f in shortcuts.FAMILIES if f != "position"}
    out["position"] = Template(_rows(24, offset=100))
    return out


@pytest.mark.parametrize("family", shortcuts.FAMILIES)
def test_probe_detects_the_family_a_model_reads(family, models):
    rows = _rows(16)
    probe = shortcuts.PROBES[family]
    hit = probe(models[family], rows, SETTINGS, input_size=SIZE)
    assert hit["images"] == 16
    # the model reads the family: switching it flips most decisions (position: a linear template, weaker)
    assert hit["flip_rate"] >= (0.6 if family == "position" else 0.9), hit
    assert hit["positive_rate_a"] > hit["positive_rate_b"]
    other = {"marker": "position", "text": "position", "site": "marker", "position": "marker",
             "devices": "text"}[family]
    miss = probe(models[other], rows, SETTINGS, input_size=SIZE)
    assert miss["flip_rate"] <= 0.15, miss  # a model that reads another family is not flagged


def test_families_change_only_their_pixels():
    seed = image_seed(2, "COVID", 4)
    base = draw(seed, True, size=SIZE, anatomy="drawn")
    for family, region in (("marker", "marker_box"), ("text", "text_box")):
        ph = draw(seed, True, size=SIZE, anatomy="drawn", **{family: True})
        x0, y0, x1, y1 = getattr(ph, region)
        diff = np.abs(ph.image - base.image)
        inside = np.zeros(diff.shape, bool)
        inside[y0:y1, x0:x1] = True
        assert diff[inside].max() > 0.3, family
        # the marker is lead in the beam: the detector blur and edge enhancement spread it a little
        assert diff[~inside].max() < (0.06 if family == "marker" else 1e-6), family
        np.testing.assert_array_equal(ph.lungs, base.lungs)
        np.testing.assert_array_equal(ph.lesions, base.lesions)
    dev = draw(seed, True, size=SIZE, anatomy="drawn", devices=True)
    assert (dev.shortcut_mask & shortcuts.BITS["devices"]).any()
    changed = np.abs(dev.image - base.image) > 0.02
    from scipy.ndimage import binary_dilation

    near = binary_dilation(dev.shortcut_mask & shortcuts.BITS["devices"] > 0, iterations=3)
    assert changed.any() and (changed & ~near).mean() < 0.002


def test_marker_reads_correctly():
    """An "L" sits on the patient's left (the image's right); an "R" on the image's left (issue 14)."""
    seen = set()
    for seed in range(40):
        ph = draw(seed, False, size=96, anatomy="drawn", marker=True)
        x0, y0, x1, y1 = ph.marker_box
        letter = "L" if x0 > 48 else "R"
        glyph = shortcuts.marker_glyph(letter, y1 - y0)
        assert glyph.shape == (y1 - y0, x1 - x0)
        patch = ph.image[y0:y1, x0:x1]
        assert patch[glyph].mean() > 0.65 and patch[glyph].mean() > patch[~glyph].mean() + 0.4
        seen.add(letter)
    assert seen == {"L", "R"}


def test_site_border_and_ap_position():
    seed = image_seed(0, "Normal", 3)
    one = draw(seed, False, size=SIZE, anatomy="drawn", site=1)
    border = (one.shortcut_mask & shortcuts.BITS["site"]) > 0
    assert border[:, 0].all() and np.allclose(one.image[border], 0.02)
    for k in range(6):  # the lead marker lies inside the collimated field, never under the border
        m = draw(seed + k, False, size=SIZE, anatomy="drawn", site=1, marker=True)
        x0, y0, x1, y1 = m.marker_box
        assert not (m.shortcut_mask[y0:y1, x0:x1] & shortcuts.BITS["site"]).any()
    zero = draw(seed, False, size=SIZE, anatomy="drawn", site=0)
    assert zero.shortcut_mask.max() == 0
    # AP: the scapulae cross the upper lateral lungs, so those lung pixels brighten
    pa, ap = (draw(seed, False, size=128, anatomy="drawn", position=p) for p in ("PA", "AP"))
    v, u = np.mgrid[0:128, 0:128] / 128
    zone = pa.lungs & (v < 0.45) & (np.abs(u - 0.5) > 0.25)
    assert ap.image[zone].mean() > pa.image[zone].mean() + 0.02


def test_family_gates_follow_the_rates():
    cfg = PhantomConfig(text_rate={"COVID": 1.0, "Normal": 0.0}, site_rate={"COVID": 0.0, "Normal": 1.0},
                        ap_rate={"COVID": 1.0, "Normal": 0.0}, device_rate={"COVID": 0.0, "Normal": 1.0},
                        marker_rate={"COVID": 0.0, "Normal": 0.0})
    c, n = families_for(cfg, "COVID", 11), families_for(cfg, "Normal", 12)
    assert c == {"marker": False, "text": True, "site": 0, "position": "AP", "devices": False}
    assert n == {"marker": False, "text": False, "site": 1, "position": "PA", "devices": True}
    half = PhantomConfig(site_rate={"COVID": 0.5, "Normal": 0.5})
    hits = np.mean([families_for(half, "COVID", s)["site"] for s in range(400)])
    assert 0.4 < hits < 0.6
    assert not any(families_for(PhantomConfig(), "COVID", s)["devices"] for s in range(50))  # off by default


def test_redraw_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown shortcut"):
        shortcuts.redraw(_rows(1)[0], SETTINGS, lasers=True)


def test_glyphs():
    assert render("L").tolist() == [[c == "#" for c in row] for row in
                                     ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####")]
    assert render("AP", 2).shape == (14, 22)


def text_detector() -> nn.Module:
    """A factory for `--model test_shortcuts:text_detector`: the hand-set model that reads burned-in text."""
    return Detector("text")


def test_audit_probes_each_shortcut_family_the_phantoms_carry(tmp_path):
    """`saliencylab audit` swaps every family the phantoms were drawn with: a text reader flips with the text
    label, not with the devices; families never drawn are not probed (null)."""
    import json

    from typer.testing import CliRunner

    from saliencylab.cli import app
    from saliencylab.data.phantoms import generate

    root = tmp_path / "phantoms"
    generate(PhantomConfig(n_covid=6, n_normal=6, size=SIZE, seed=2, workers=1, anatomy="drawn",
                           text_rate={"COVID": 0.5, "Normal": 0.5}, device_rate={"COVID": 0.5, "Normal": 0.5}),
             root, progress=False)
    out = tmp_path / "audit"
    res = CliRunner().invoke(app, ["audit", "--model", "test_shortcuts:text_detector", "--input-size", str(SIZE),
                                   "--channels", "1", "--classes", "Normal,COVID", "--data", str(root),
                                   "--methods", "occlusion",
                                   "--sanity-images", "2", "--faithfulness-images", "1", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    probes = json.loads((out / "audit.json").read_text())["probes"]
    assert probes["text_swap"]["images"] == 12 and probes["text_swap"]["flip_rate"] >= 0.9, probes["text_swap"]
    assert probes["devices_swap"]["flip_rate"] <= 0.15, probes["devices_swap"]
    assert probes["site_swap"] is None and probes["position_swap"] is None
    assert f"text present vs absent: {probes['text_swap']['flips']} of 12 predictions flip" in res.output
