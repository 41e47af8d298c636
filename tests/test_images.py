"""Image and DICOM decoding: formats, modes, bit depths, EXIF, windowing, and every kind of bad file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliencylab.data import expand_inputs, iter_images, load_image, sample_names
from saliencylab.errors import UserError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".webp"])
def test_lossless_rgb_formats_roundtrip(tmp_path, ext):
    path = tmp_path / f"a{ext}"
    Image.fromarray(RGB).save(path, **({"lossless": True} if ext == ".webp" else {}))
    img = load_image(str(path))
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (20, 30, 3)
    np.testing.assert_allclose(img.pixels, RGB / 255.0, atol=1e-6)


def test_jpeg_is_close(tmp_path):
    path = tmp_path / "a.jpg"
    smooth = np.repeat(np.linspace(0, 255, 30, dtype=np.uint8)[None, :, None], 20, 0).repeat(3, 2)
    Image.fromarray(smooth).save(path, quality=95)
    assert np.abs(load_image(str(path)).pixels - smooth / 255.0).mean() < 0.02


def test_grayscale_and_16bit(tmp_path):
    gray = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = load_image(str(tmp_path / "g.png"))
    assert img.pixels.shape == (10, 12)
    np.testing.assert_allclose(img.pixels, gray / 255.0, atol=1e-6)

    deep = RNG.integers(0, 65536, (10, 12), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    img16 = load_image(str(tmp_path / "d.png"))
    assert img16.meta["bits"] == 16
    np.testing.assert_allclose(img16.pixels, deep / 65535.0, atol=1e-7)  # no 8-bit round trip


def test_rgba_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red...
    rgba[:2, :, 3] = 255  # ...opaque on top, transparent below
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    px = load_image(str(tmp_path / "t.png")).pixels
    np.testing.assert_allclose(px[0, 0], [1, 0, 0])
    np.testing.assert_allclose(px[3, 0], [1, 1, 1])


def test_exif_orientation_is_honoured(tmp_path):
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :10] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    px = load_image(str(tmp_path / "r.jpg")).pixels
    assert px.shape == (20, 10, 3)
    assert px[:10].mean() > 0.9 and px[10:].mean() < 0.1  # the white half is now on top


def test_samples_and_defaults():
    assert {"chelsea", "coffee", "rocket", "motorcycle_left"} <= set(sample_names())
    assert expand_inputs([]) == ["sample:chelsea", "sample:coffee", "sample:rocket", "sample:motorcycle_left"]
    img = load_image("sample:chelsea")
    assert img.name == "chelsea" and img.pixels.shape == (300, 451, 3)
    with pytest.raises(UserError, match="Did you mean sample:chelsea"):
        expand_inputs(["sample:chelsee"])


def test_folders_recursive_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for p in ["a.png", "sub/b.jpg", "notes.txt"]:
        Image.fromarray(RGB).save(tmp_path / p, format="PNG") if p.endswith(("png", "jpg")) else (
            tmp_path / p).write_text("x")
    assert [Path(p).name for p in expand_inputs([str(tmp_path)])] == ["a.png", "b.jpg"]
    assert [Path(p).name for p in expand_inputs([str(tmp_path / "**" / "*.jpg")])] == ["b.jpg"]
    with pytest.raises(UserError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        expand_inputs([str(tmp_path / "empty")])


# -- bad files: each a one-line message naming the file --

def _write_bomb(path: Path) -> None:
    """A valid-looking PNG header that declares 30000 x 30000 pixels (no real pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.png"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    cases = {
        "missing": (tmp_path / "nope.png", "no such file"),
        "empty": (tmp_path / "empty.png", "empty"),
        "text": (tmp_path / "text.png", "not an image"),
        "truncated": (tmp_path / "trunc.png", "truncated or corrupt"),
        "bomb": (tmp_path / "bomb.png", "decompression-bomb"),
        "bad_dicom": (tmp_path / "bad.dcm", "DICOM"),
    }
    cases["empty"][0].write_bytes(b"")
    cases["text"][0].write_text("hello, I am not a picture\n" * 20)
    cases["truncated"][0].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _write_bomb(cases["bomb"][0])
    cases["bad_dicom"][0].write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    return cases


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "bomb", "bad_dicom"])
def test_bad_files_raise_user_error_naming_the_file(tmp_path, case):
    path, words = bad_files(tmp_path)[case]
    with pytest.raises(UserError) as info:
        load_image(str(path))
    msg = str(info.value)
    assert words in msg and path.name in msg and "\n" not in msg


def test_skip_bad_reports_and_continues(tmp_path):
    cases = bad_files(tmp_path)
    sources = [str(tmp_path / "good.png"), str(cases["text"][0]), str(tmp_path / "good.png")]
    skipped: list = []
    got = list(iter_images(sources, skip_bad=True, skipped=skipped))
    assert len(got) == 2 and len(skipped) == 1 and skipped[0][0].endswith("text.png")


# -- DICOM, with pydicom's bundled test files --

pydicom = pytest.importorskip("pydicom")


def _testfile(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return str(path)


def test_dicom_ct_full_range_with_rescale():
    path = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    img = load_image(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (hu - hu.min()) / (hu.max() - hu.min())
    assert img.pixels.shape == (128, 128) and img.meta["format"] == "DICOM"
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)


def test_dicom_window_applied():
    path = _testfile("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    v = ds.pixel_array.astype(np.float64)
    expected = np.clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    img = load_image(path)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert "window center" in img.meta["window"]


def test_dicom_monochrome1_is_inverted(tmp_path):
    path = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    a, b = load_image(path).pixels, load_image(str(inverted)).pixels
    np.testing.assert_allclose(b, 1.0 - a, atol=1e-6)


def test_bundled_monochrome1_file():
    import glob
    import os

    root = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "dicomdirtests")
    found = [f for f in glob.glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(f)
             and pydicom.dcmread(f, stop_before_pixels=True, force=True).get("PhotometricInterpretation")
             == "MONOCHROME1"]
    if not found:
        pytest.skip("no bundled MONOCHROME1 file")
    ds = pydicom.dcmread(found[0])
    img = load_image(found[0])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter), float(
        ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth)
    expected = 1.0 - np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert "MONOCHROME1 inverted" in img.meta["window"]


def test_dicom_without_pixels(tmp_path):
    path = _testfile("rtplan.dcm")
    with pytest.raises(UserError, match="without pixel data"):
        load_image(path)
