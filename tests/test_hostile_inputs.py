"""Hostile and odd inputs through the command line: bad output paths, refused runs that must leave nothing,
killed runs whose leftovers are cleaned, resume files that fail their schema, DICOM edge cases, file
modes, nothing readable, and odd images. Each case: one line on stderr, exit 2, no partial output."""

from __future__ import annotations

import fractions
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from saliencylab.cli import app

runner = CliRunner()
FAST = ["--model", "torchvision:resnet18", "--weights", "random"]
NO_MODEL = ["--model", "torchvision:no_such_model"]  # a refusal about the model would mean the path came second


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _image(path: Path, shape=(24, 32, 3), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _one_line_error(res, *words: str) -> str:
    err = res.stderr.strip()
    assert res.exit_code == 2, res.output
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "internal error" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- 1. output paths are checked up front -------------------------------------------------------------

def _commands(tmp: Path, bad: Path) -> dict[str, tuple[list[str], str]]:
    img = _image(tmp / "in" / "a.png")
    return {
        "classify --json": (["classify", img, *NO_MODEL, "--json", bad], "--json"),
        "explain --out": (["explain", img, *NO_MODEL, "--out", bad], "--out"),
        "phantoms OUT": (["phantoms", bad, "--n-covid", "1", "--n-normal", "1", "--size", "32"], "OUT"),
        "train --out": (["train", "--data", tmp / "no_data", "--out", bad], "--out"),
        "evaluate --out": (["evaluate", tmp / "no_run", "--out", bad], "--out"),
        "audit --out": (["audit", tmp / "no_run", "--out", bad], "--out"),
        "demo --out": (["demo", "--quick", "--out", bad], "--out"),
    }


COMMANDS = ["classify --json", "explain --out", "phantoms OUT", "train --out", "evaluate --out", "audit --out",
            "demo --out"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["existing file", "below a file"])
def test_output_path_that_is_or_lies_below_a_file_is_refused_first(tmp_path, command, kind):
    blocker = tmp_path / "taken.txt"
    blocker.write_text("keep me\n")
    bad = blocker if kind == "existing file" else blocker / "sub" / "out.json"
    if command == "classify --json" and kind == "existing file":
        bad = tmp_path / "sub"  # --json names a file: the hostile case is a folder
        bad.mkdir()
    args, flag = _commands(tmp_path, bad)[command]
    before = _tree(tmp_path)
    res = run(*args)
    _one_line_error(res, flag, str(bad))
    assert _tree(tmp_path) == before  # nothing created, nothing removed
    assert blocker.read_text() == "keep me\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_location_is_refused_first(tmp_path, monkeypatch, command):
    import saliencylab.fsutil as fsutil

    locked = tmp_path / "locked"
    locked.mkdir()
    real = fsutil._writable
    monkeypatch.setattr(fsutil, "_writable", lambda p: Path(p) != locked and real(p))
    bad = locked / "out.json" if command == "classify --json" else locked / "out"
    args, flag = _commands(tmp_path, bad)[command]
    err = _one_line_error(run(*args), flag, str(bad))
    assert "not writable" in err
    assert not bad.exists()


@pytest.mark.parametrize("command", ["evaluate", "audit", "report"])
def test_unwritable_run_folder_is_refused_when_outputs_default_into_it(tmp_path, monkeypatch, command):
    import saliencylab.fsutil as fsutil

    locked = tmp_path / "run"
    locked.mkdir()
    monkeypatch.setattr(fsutil, "_writable", lambda p: Path(p) != locked)
    _one_line_error(run(command, locked), "RUN", str(locked), "cannot write")
    assert _tree(tmp_path) == ["run"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_folder_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _one_line_error(run("explain", _image(tmp_path / "a.png"), *NO_MODEL, "--out", locked / "x"), "--out",
                    "not writable")


def test_report_into_a_folder_where_report_html_is_a_folder(tmp_path):
    (tmp_path / "report.html").mkdir()
    _one_line_error(run("report", tmp_path), "RUN", "report.html")


def test_json_output_into_a_new_nested_folder_is_made(tmp_path):
    out = tmp_path / "a b" / "ü" / "top.json"
    res = run("classify", _image(tmp_path / "x.png"), *FAST, "-k", "1", "--json", out)
    assert res.exit_code == 0, res.output
    assert len(json.loads(out.read_text())["images"]) == 1


# -- 2. refused or killed runs leave nothing behind -------------------------------------------------

def test_train_refused_for_too_few_images_writes_nothing(tmp_path):
    data = tmp_path / "data"
    for cls, n in (("COVID", 2), ("Normal", 5)):
        for i in range(n):
            _image(data / cls / f"{cls}-{i}.png", (16, 16), seed=i)
    out = tmp_path / "runs" / "run"
    res = run("train", "--data", data, "--out", out, "--image-size", "32", "--epochs", "1")
    _one_line_error(res, "at least 3 images")
    assert not (tmp_path / "runs").exists()


_STAGER = """
import sys
from saliencylab.fsutil import staged_dir
with staged_dir(sys.argv[1]) as stage:
    (stage / "half.npy").write_bytes(b"half")
    print(stage, flush=True)
    sys.stdin.read()  # wait here until killed
"""


def test_a_later_explain_removes_staging_left_by_a_killed_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _STAGER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, text=True)
    stage = Path(proc.stdout.readline().strip())
    live = subprocess.Popen([sys.executable, "-c", _STAGER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, text=True)
    live_stage = Path(live.stdout.readline().strip())
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert stage.is_dir() and stage.name.startswith(".out.staging.")
        foreign = tmp_path / ".out.staging.other"  # not ours (no process id): left alone
        foreign.mkdir()
        res = run("explain", _image(tmp_path / "a.png"), *FAST, "--methods", "vanilla", "--out", out)
        assert res.exit_code == 0, res.output
        assert not stage.exists()  # the killed run's folder is gone
        assert live_stage.is_dir()  # a live run's folder is kept
        assert foreign.is_dir()
        assert (out / "results.json").is_file()
    finally:
        live.kill()
        live.wait()
        proc.stdout.close()
        live.stdout.close()
        proc.stdin.close()
        live.stdin.close()


def test_atomic_temp_file_of_a_dead_process_is_removed(tmp_path):
    from saliencylab.fsutil import write_json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".state.json.tmp-{dead.pid}.abc.json"
    stale.write_text("half")
    write_json(tmp_path / "state.json", {"a": 1})
    assert not stale.exists() and json.loads((tmp_path / "state.json").read_text()) == {"a": 1}


# -- 3. files that --resume reads are validated -----------------------------------------------------

TRAIN = ["--image-size", "32", "--epochs", "1", "--batch-size", "16", "--no-augment", "--no-progress"]


@pytest.fixture(scope="module")
def one_epoch_run(cxr_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    res = run("train", "--data", cxr_data, "--out", out, *TRAIN)
    assert res.exit_code == 0, res.output
    return out



def _tamper(out: Path, case: str) -> tuple[str, str]:
    """Break one file of the run; return (file name, words the message must hold)."""
    if case == "pickled object":
        torch.save({"model": {}, "payload": fractions.Fraction(1, 3)}, out / "state.pt")
        return "state.pt", "never loaded"
    if case == "not a torch file":
        (out / "state.pt").write_bytes(b"PK\x03\x04 not really a zip")
        return "state.pt", "not a readable training state"
    if case == "state lacks a field":
        st = torch.load(out / "state.pt", weights_only=True)
        del st["epoch"]
        torch.save(st, out / "state.pt")
        return "state.pt", "lacks the field 'epoch'"
    if case == "state is a list":
        torch.save([1, 2, 3], out / "state.pt")
        return "state.pt", "holds a list"
    if case == "config not json":
        (out / "config.json").write_text("{not json")
        return "config.json", "not valid JSON"
    if case == "config lacks a field":
        cfg = json.loads((out / "config.json").read_text())
        del cfg["lr"]
        (out / "config.json").write_text(json.dumps(cfg))
        return "config.json", "lacks the field 'lr'"
    if case == "split lacks columns":
        (out / "split.csv").write_text("a,b\n1,2\n")
        return "split.csv", "lacks the 'file' and 'split' columns"
    if case == "split bad value":
        text = (out / "split.csv").read_text().replace(",train,", ",holiday,", 1)
        (out / "split.csv").write_text(text)
        return "split.csv", "holiday"
    if case == "history garbage":
        (out / "history.csv").write_bytes(b"\xff\xfe\x00garbage")
        return "history.csv", "not a training history"
    if case == "state missing":
        (out / "state.pt").unlink()
        return "state.pt", "does not exist"
    raise AssertionError(case)


RESUME_CASES = ["pickled object", "not a torch file", "state lacks a field", "state is a list", "config not json",
                "config lacks a field", "split lacks columns", "split bad value", "history garbage", "state missing"]


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_validates_every_file_it_reads(one_epoch_run, cxr_data, tmp_path, case):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    name, words = _tamper(out, case)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    res = run("train", "--data", cxr_data, "--out", out, *TRAIN, "--resume")
    err = _one_line_error(res, str(out / name), words)
    assert "weights_only" not in err and "Unpickl" not in err
    assert "--resume" in err and ("without --resume" in err or "new --out" in err or "another --out" in err)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing rewritten


def test_resume_of_a_valid_run_still_works(one_epoch_run, cxr_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    args = [a if a != "1" else "2" for a in TRAIN]  # --epochs 2: one more epoch
    res = run("train", "--data", cxr_data, "--out", out, *args, "--resume")
    assert res.exit_code == 2 and "other settings (epochs)" in res.stderr  # the config must match...
    cfg = json.loads((out / "config.json").read_text())
    cfg["epochs"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    res = run("train", "--data", cxr_data, "--out", out, *args, "--resume")
    assert res.exit_code == 0, res.output
    st = torch.load(out / "state.pt", weights_only=True)
    assert st["epoch"] == 2 and [h["epoch"] for h in st["history"]] == [1, 2]


# -- 4. DICOM ----------------------------------------------------------------------------------------

pydicom = pytest.importorskip("pydicom")


def _dicom(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return str(path)


def _has_jpegls_decoder() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("jpeg_ls", "pylibjpeg", "gdcm", "libjpeg"))


@pytest.mark.skipif(_has_jpegls_decoder(), reason="a JPEG-LS decoder is installed here")
def test_dicom_without_decoder_is_one_line_naming_syntax_and_package(tmp_path):
    src = _dicom("MR_small_jpeg_ls_lossless.dcm")
    res = run("classify", src, *FAST)
    _one_line_error(res, "MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless", "1.2.840.10008.1.2.4.80",
                    "pip install pyjpegls")


def test_dicom_decoder_hint_per_syntax():
    from saliencylab.data.images import dicom_decoder_hint

    assert dicom_decoder_hint("1.2.840.10008.1.2.4.91") == "pylibjpeg pylibjpeg-openjpeg"
    assert dicom_decoder_hint("1.2.840.10008.1.2.4.51") == "pylibjpeg pylibjpeg-libjpeg"
    assert dicom_decoder_hint("1.2.840.10008.1.2.4.80") == "pyjpegls"


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_uncompressed_dicom_says_truncated(tmp_path, keep):
    raw = Path(_dicom("MR_small.dcm")).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: int(len(raw) * keep)])
    err = _one_line_error(run("classify", cut, *FAST), "cut.dcm", "truncated")
    assert "install" not in err and "8,192 bytes" in err


def test_dicom_header_without_its_pixels_is_called_cut_short(tmp_path):
    raw = Path(_dicom("MR_small.dcm")).read_bytes()
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    end = raw.index(b"\xe0\x7f\x10\x00")  # the Pixel Data tag
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[:end])
    assert "Rows" in pydicom.dcmread(cut) and ds.Rows == 64
    _one_line_error(run("classify", cut, *FAST), "cut.dcm", "cut short")


def _built_palette_dicom(path: Path) -> str:
    """A 6x8 PALETTE COLOR image: 8-bit indices into 16-bit red, green and blue tables (first entry 10)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 6, 8, 1
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    n = 16
    ramp = np.linspace(0, 65535, n).astype("<u2")
    for colour, table in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", np.full(n, 30000, "<u2"))):
        ds[f"{colour}PaletteColorLookupTableDescriptor"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableDescriptor", "US", [n, 10, 16])
        ds[f"{colour}PaletteColorLookupTableData"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableData", "OW", table.tobytes())
    ds.PixelData = (np.arange(48, dtype=np.uint8).reshape(6, 8) % 20 + 8).tobytes()  # below, in and above
    ds.save_as(path, enforce_file_format=True)
    return str(path)


@pytest.mark.parametrize("source", ["built", "bundled"])
def test_palette_colour_dicom_is_decoded_through_its_palette(tmp_path, source):
    from saliencylab.data.images import load_image

    path = _built_palette_dicom(tmp_path / "pal.dcm") if source == "built" else _dicom("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    idx = ds.pixel_array.astype(np.int64)
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    luts = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2")
            for c in ("Red", "Green", "Blue")]
    # PS3.3 C.7.6.3.1.5: indices below the first mapped value take the first entry, above it the last
    expected = np.stack([lut[np.clip(idx - first, 0, len(lut) - 1)] for lut in luts], -1) / 65535.0
    img = load_image(path)
    assert img.pixels.shape == (*idx.shape, 3)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert np.abs(img.pixels[..., 0] - img.pixels[..., 2]).max() > 0.1  # colours, not grey


def test_multi_frame_dicom_says_which_frame(tmp_path):
    from saliencylab.data.images import dicom_grayscale, load_image

    path = _dicom("rtdose.dcm")
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 15
    res = run("classify", path, *FAST, "-k", "1")
    assert res.exit_code == 0, res.output
    notes = [line for line in res.stderr.splitlines() if "frame" in line]
    assert notes == [f"note: only the first of the 15 frames of '{path}' was used; pass --frame N for another one "
                     "or --frame all for every frame"]
    np.testing.assert_allclose(load_image(path).pixels, dicom_grayscale(ds.pixel_array[0], ds)[0], atol=1e-7)


# -- 5. file modes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    from saliencylab.fsutil import staged_dir, write_json, write_npy

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_npy(tmp_path / "b.npy", np.zeros(3))
        with staged_dir(tmp_path / "staged") as stage:
            write_json(stage / "sub" / "c.json", {})
        res = run("classify", _image(tmp_path / "x.png"), *FAST, "-k", "1", "--json", tmp_path / "top.json")
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    for p in ("a.json", "b.npy", "staged/sub/c.json", "top.json"):
        assert oct((tmp_path / p).stat().st_mode & 0o777) == oct(mode), p
    assert oct((tmp_path / "staged" / "sub").stat().st_mode & 0o777) == oct(0o777 & ~umask)


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    from saliencylab.fsutil import write_text

    p = tmp_path / "a.txt"
    p.write_text("old")
    p.chmod(0o640)
    write_text(p, "new")
    assert p.read_text() == "new" and p.stat().st_mode & 0o777 == 0o640


# -- 6. nothing readable -------------------------------------------------------------------------------

def _all_bad(tmp: Path) -> Path:
    folder = tmp / "bad"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture\n")
    return folder


def test_classify_skip_bad_with_nothing_readable_writes_nothing(tmp_path):
    out = tmp_path / "res" / "top.json"
    res = run("classify", _all_bad(tmp_path), *FAST, "--skip-bad", "--json", out)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none of the 2 inputs" in errors[0] and "nothing was written" in errors[0]
    assert not (tmp_path / "res").exists()


def test_explain_skip_bad_with_nothing_readable_writes_nothing(tmp_path):
    out = tmp_path / "res" / "deep" / "out"
    res = run("explain", _all_bad(tmp_path), *FAST, "--methods", "vanilla", "--skip-bad", "--out", out)
    _one_line_error(res, "none of the 2 inputs", "nothing was written", "empty.png")
    assert not (tmp_path / "res").exists()


# -- 7. odd inputs -------------------------------------------------------------------------------------

def test_symlink_loop_as_input_is_named_as_such(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    _one_line_error(run("classify", tmp_path / "a.png", *FAST), "a.png", "symbolic link")


def test_folder_with_a_symlink_loop_reads_the_images_once(tmp_path):
    _image(tmp_path / "d" / "x.png")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    res = run("classify", tmp_path / "d", *FAST, "-k", "1", "--json", tmp_path / "t.json")
    assert res.exit_code == 0, res.output
    assert [Path(r["source"]).name for r in json.loads((tmp_path / "t.json").read_text())["images"]] == ["x.png"]


def test_empty_folder_and_unmatched_glob(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(run("classify", tmp_path / "empty", *FAST), "holds no images")
    _one_line_error(run("classify", str(tmp_path / "nothing*.png"), *FAST), "matches no file")


def test_one_pixel_and_unicode_named_images_through_explain(tmp_path):
    tiny = tmp_path / "one.png"
    Image.fromarray(np.array([[200]], np.uint8)).save(tiny)
    uni = _image(tmp_path / "a folder ü" / "рентген снимок.png")
    out = tmp_path / "out"
    res = run("explain", tiny, uni, *FAST, "--methods", "vanilla,gradcam", "--out", out)
    assert res.exit_code == 0, res.output
    recs = json.loads((out / "results.json").read_text())["images"]
    assert [r["name"] for r in recs] == ["one", "рентген_снимок"]
    from saliencylab.studies.streaming import load_map

    assert recs[0]["size"] == [1, 1] and load_map(out / "one", "vanilla").shape == (1, 1)
    assert np.isfinite(np.load(out / "рентген_снимок" / "gradcam.npy")).all()


def test_sixteen_bit_tiff_keeps_its_precision(tmp_path):
    from saliencylab.data.images import load_image

    arr = np.random.default_rng(0).integers(0, 65536, (20, 30), dtype=np.uint16)
    path = tmp_path / "x16.tif"
    Image.fromarray(arr).save(path)
    img = load_image(str(path))
    assert img.meta["bits"] == 16
    np.testing.assert_allclose(img.pixels, arr / 65535.0, atol=1e-7)


def test_cmyk_jpeg_is_read_as_rgb(tmp_path):
    from saliencylab.data.images import load_image

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (220, 40, 30)
    rgb[:, 16:] = (20, 60, 200)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    img = load_image(str(path))
    assert img.pixels.shape == (32, 32, 3)
    assert np.abs(img.pixels[4:-4, 4:12] - rgb[4:-4, 4:12] / 255.0).max() < 0.06
    assert np.abs(img.pixels[4:-4, 20:28] - rgb[4:-4, 20:28] / 255.0).max() < 0.06
