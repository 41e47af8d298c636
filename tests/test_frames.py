"""Multi-frame DICOM: frame N, every frame as its own image, and a note when only the first one is used."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from saliencylab.cli import app
from saliencylab.data.images import dicom_grayscale, expand_inputs, load_image, parse_frame, split_frame
from saliencylab.errors import UserError

pydicom = pytest.importorskip("pydicom")
FAST = ["--model", "cxr_cnn", "--weights", "random"]  # tiny: the frames are what is tested


def multi_frame(path, n: int = 3, shape=(6, 8)) -> np.ndarray:
    """Write an n-frame 16-bit MONOCHROME2 DICOM with a window; frame k (0-based) is a ramp plus 100 k."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ramp = np.arange(shape[0] * shape[1], dtype=np.uint16).reshape(shape) * 3
    frames = np.stack([ramp + 100 * k for k in range(n)]).astype(np.uint16)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = shape[0], shape[1], n, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = 200, 400
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return frames


def test_frame_n_all_and_the_first_with_a_note(tmp_path, capsys):
    path = tmp_path / "cine.dcm"
    frames = multi_frame(path)
    ds = pydicom.dcmread(path)
    expected = [dicom_grayscale(f, ds)[0] for f in frames]
    assert not np.allclose(expected[0], expected[2])  # the frames differ through the window
    for k in (1, 2, 3):
        img = load_image(f"{path}#frame={k}")
        np.testing.assert_allclose(img.pixels, expected[k - 1], atol=1e-6)
        assert img.name == f"cine_frame{k}" and img.source == f"{path}#frame={k}" and img.meta["frame"] == k
    assert "only the first" not in capsys.readouterr().err
    first = load_image(str(path))
    np.testing.assert_allclose(first.pixels, expected[0], atol=1e-6)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only the first of the 3 frames" in err[0] and "--frame" in err[0]
    assert first.meta["note"] == "first of 3 frames"
    png = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    assert expand_inputs([str(path), str(png)], frame="all") == [f"{path}#frame={k}" for k in (1, 2, 3)] + [str(png)]
    assert expand_inputs([str(tmp_path)], frame=2) == [f"{path}#frame=2", str(png)]
    assert expand_inputs([str(path)]) == [str(path)]
    with pytest.raises(UserError, match=r"has 3 frames; frame 4 is out of range \(--frame 1..3"):
        load_image(f"{path}#frame=4")
    with pytest.raises(UserError, match="only DICOM files have frames"):
        load_image(f"{png}#frame=1")
    assert split_frame("a#b.png") == ("a#b.png", None) and parse_frame("all") == "all" and parse_frame("2") == 2
    for bad in ("0", "first", "-1"):
        with pytest.raises(UserError, match=f"--frame {bad}: give a frame number"):
            parse_frame(bad)


def test_cli_frame_flag_on_classify_and_explain(tmp_path):
    path = tmp_path / "cine.dcm"
    multi_frame(path, shape=(32, 32))
    runner = CliRunner()
    res = runner.invoke(app, ["classify", str(path), *FAST, "--frame", "all", "-k", "1"])
    assert res.exit_code == 0, res.output
    assert [line.split()[0] for line in res.stdout.splitlines() if "cine.dcm" in line] == \
        [f"{path}#frame={k}" for k in (1, 2, 3)]
    assert "only the first" not in res.stderr
    res = runner.invoke(app, ["classify", str(path), *FAST, "-k", "1"])
    assert res.exit_code == 0 and "only the first of the 3 frames" in res.stderr
    res = runner.invoke(app, ["classify", str(path), *FAST, "--frame", "9"])
    assert res.exit_code == 2 and "frame 9 is out of range" in res.stderr and len(res.stderr.splitlines()) == 1
    out = tmp_path / "out"
    res = runner.invoke(app, ["explain", str(path), *FAST, "--frame", "2", "--methods", "vanilla", "--out", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "results.json").read_text())["images"][0]
    assert record["source"] == f"{path}#frame=2" and record["decoded"]["frame"] == 2
    assert (out / record["name"] / "vanilla.npy").exists() and record["name"] == "cine_frame2"
