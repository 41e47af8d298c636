"""`saliencylab serve`: every endpoint and every error path through FastAPI's TestClient (no sockets)."""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from saliencylab.data.images import load_image  # noqa: E402
from saliencylab.methods import METHODS, get_method, resolve_target  # noqa: E402
from saliencylab.metrics.localisation import mass_inside  # noqa: E402
from saliencylab.ops import resize  # noqa: E402
from saliencylab.render.maps import overlay, to_uint8  # noqa: E402
from saliencylab.studies.photos import DisplaySettings, probabilities  # noqa: E402
from saliencylab.web import core, teaching  # noqa: E402
from saliencylab.web.app import ServeConfig, create_app  # noqa: E402

RESNET = core.ModelEntry("torchvision:resnet18", "random", input_size=64)
HOSTS = ("testserver",)


def png(a: np.ndarray) -> bytes:
    return core.png_bytes(to_uint8(a))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 48x64 RGB crop of sample:chelsea (small: display size = original size)."""
    px = load_image("sample:chelsea").pixels
    return np.ascontiguousarray(px[100:196:2, 150:278:2])


@pytest.fixture(scope="module")
def app():
    return create_app(ServeConfig(models=(RESNET,), allowed_hosts=HOSTS, device="cpu", queue=2))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def explain(client, data: bytes, name: str = "photo.png", **fields):
    files = {"image": (name, data, "application/octet-stream")}
    if "lung_mask" in fields:
        files["lung_mask"] = ("mask.png", fields.pop("lung_mask"), "image/png")
    return client.post("/api/explain", files=files, data=fields)


# ---- catalogue ------------------------------------------------------------------------------------------
def test_health_models_methods_classes(client, app):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["queue"] == {"running": 0, "waiting": 0, "queue": 2}
    m = client.get("/api/models").json()
    assert m["default"] == RESNET.label == "torchvision:resnet18@random"
    methods = client.get("/api/methods").json()["methods"]
    assert [x["name"] for x in methods] == list(METHODS)
    sg = next(x for x in methods if x["name"] == "smoothgrad")
    assert {o["name"]: o["default"] for o in sg["options"]} == get_method("smoothgrad").options()
    assert sg["paper"] == get_method("smoothgrad").paper and sg["family"] == "gradient"
    classes = client.get("/api/classes").json()
    assert classes["classes"] == app.state.cache.get(None).class_names and len(classes["classes"]) == 1000
    assert classes["input_size"] == [64, 64]


def test_classify_matches_the_library(client, app, photo):
    r = client.post("/api/classify", files={"image": ("p.png", png(photo), "image/png")}, data={"top_k": "3"})
    assert r.status_code == 200, r.text
    clf = app.state.cache.get(None)
    x = clf.preprocess(load_image_bytes(png(photo)))[None]
    probs = probabilities(clf, x)[0]
    expected = probs.topk(3)
    assert [t["index"] for t in r.json()["top"]] == expected.indices.tolist()
    np.testing.assert_allclose([t["probability"] for t in r.json()["top"]], expected.values.numpy(), rtol=1e-5)


def load_image_bytes(data: bytes) -> np.ndarray:
    return core.decode_upload(data, "x.png").pixels


# ---- explain ------------------------------------------------------------------------------------------------
def test_explain_maps_overlays_and_downloads_match_the_library(client, app, photo):
    r = explain(client, png(photo), methods="gradcam,smoothgrad", target="3", alpha="0.6", cmap="inferno",
                set=["smoothgrad.n_samples=3", "smoothgrad.noise_level=0.1"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target"]["index"] == 3 and body["target"]["class"] == "tiger shark"
    assert set(body["seconds"]) == {"gradcam", "smoothgrad"} and all(v > 0 for v in body["seconds"].values())
    assert body["methods"]["smoothgrad"]["options"]["n_samples"] == 3
    clf = app.state.cache.get(None)
    pixels = load_image_bytes(png(photo))
    x = clf.preprocess(pixels)[None]
    tgt = resolve_target(clf.module, x, 3, clf.class_names)
    for name, opts in (("gradcam", {}), ("smoothgrad", {"n_samples": 3, "noise_level": 0.1})):
        raw = get_method(name).fn(clf.module, x, tgt, **opts).detach()
        expected = resize(raw[:, None], pixels.shape[:2])[0, 0].numpy()
        got = np.load(io.BytesIO(client.get(body["methods"][name]["npy"]).content))
        assert got.dtype == np.float32 and got.shape == photo.shape[:2]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, atol=1e-5 * scale, rtol=0)
        # the overlay PNG is render.overlay of the display map, as `explain` draws it
        display = DisplaySettings(alpha=0.6, cmap="inferno")
        shown = display.render(got, get_method(name).display)
        over = np.asarray(_png(client.get(body["methods"][name]["overlay"]).content))
        assert np.abs(over.astype(int) - overlay(pixels, shown, alpha=0.6, cmap="inferno").astype(int)).max() <= 1
        # the heat layer at opacity a over the image is the same overlay: the page's slider needs no server call
        heat = np.asarray(_png(client.get(body["methods"][name]["heat"]).content)).astype(float)
        a = 0.6 * heat[..., 3:] / 255
        composite = to_uint8(pixels).astype(float) * (1 - a) + heat[..., :3] * a
        assert np.abs(composite - over).max() <= 2.0
    zipped = zipfile.ZipFile(io.BytesIO(client.get(body["downloads"]["maps_zip"]).content))
    assert sorted(zipped.namelist()) == ["gradcam.npy", "gradcam.png", "settings.json", "smoothgrad.npy",
                                         "smoothgrad.png"]
    np.testing.assert_array_equal(np.load(io.BytesIO(zipped.read("gradcam.npy"))),
                                  np.load(io.BytesIO(client.get(body["methods"]["gradcam"]["npy"]).content)))
    settings = json.loads(zipped.read("settings.json"))
    assert "--set smoothgrad.n_samples=3 --set smoothgrad.noise_level=0.1" in settings["command"]
    assert settings["command"].startswith("saliencylab explain photo.png --model torchvision:resnet18 --weights random")
    assert client.get(f"/api/results/{body['id']}").json()["target"] == body["target"]


def _png(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def test_inline_overlays_and_redraw_with_other_display_settings(client, photo):
    body = explain(client, png(photo), inline="true").json()
    inline = body["methods"]["gradcam"]["overlay_png_base64"]
    import base64

    assert base64.b64decode(inline) == client.get(body["methods"]["gradcam"]["overlay"]).content
    url = f"/api/results/{body['id']}/maps/gradcam/heat.png"
    jet, gray = client.get(url).content, client.get(url + "?cmap=gray").content
    assert jet != gray
    gray_px = np.asarray(_png(gray))[..., :3].astype(int)
    assert np.abs(gray_px[..., 0] - gray_px[..., 1]).max() <= 1  # a gray colormap is gray
    assert client.get(url + "?cmap=nope").status_code == 400
    assert client.get(f"/api/results/{body['id']}/maps/vanilla.npy").status_code == 404
    assert client.get("/api/results/0123456789abcdef/image.png").status_code == 404


def test_default_opacity_is_the_clis_and_the_renderers(client, photo):
    """Without `alpha` the API draws what `explain` draws with its defaults; the page starts from the same value."""
    import inspect

    from saliencylab.cli import explain as cli_explain
    from saliencylab.render.maps import DEFAULT_ALPHA

    cli_alpha = inspect.signature(cli_explain).parameters["alpha"].default.default
    renderer_alpha = inspect.signature(overlay).parameters["alpha"].default
    assert cli_alpha == DEFAULT_ALPHA == DisplaySettings().alpha == renderer_alpha
    body = explain(client, png(photo), methods="vanilla").json()
    raw = np.load(io.BytesIO(client.get(body["methods"]["vanilla"]["npy"]).content))
    shown = DisplaySettings().render(raw, get_method("vanilla").display)
    assert (shown >= 0.5).sum() > 50  # enough of the map shows for the opacity to matter
    expected = overlay(load_image_bytes(png(photo)), shown).astype(int)  # the renderer's (and explain's) default
    plain = f"/api/results/{body['id']}/maps/vanilla/overlay.png"  # no query string: the GET defaults
    zipped = zipfile.ZipFile(io.BytesIO(client.get(f"/api/results/{body['id']}/maps.zip").content))
    for got in (client.get(body["methods"]["vanilla"]["overlay"]).content, client.get(plain).content,
                zipped.read("vanilla.png")):
        assert np.abs(np.asarray(_png(got)).astype(int) - expected).max() <= 1
    assert f"--alpha {cli_alpha:g}" in body["settings"]["command"]
    # the page takes its slider's start from /api/methods, and its markup starts at the same value
    assert client.get("/api/methods").json()["display"] == dict(DisplaySettings().__dict__)
    page = client.get("/").text
    assert f'id="opacity" min="0" max="1" step="0.05" value="{DEFAULT_ALPHA:g}"' in page
    assert f'<output id="opacity-value" for="opacity">{DEFAULT_ALPHA:.2f}</output>' in page
    assert f"--opacity: {DEFAULT_ALPHA:g};" in client.get("/static/app.css").text
    assert "setOpacity(methods.display.alpha)" in client.get("/static/app.js").text


def test_settings_command_reproduces_the_maps_from_the_cli(tmp_path, photo, monkeypatch):
    from typer.testing import CliRunner

    from saliencylab.cli import app as cli
    from saliencylab.studies.streaming import load_map

    entry = core.ModelEntry("torchvision:resnet18", "random")
    with TestClient(create_app(ServeConfig(models=(entry,), allowed_hosts=HOSTS, device="cpu"))) as c:
        body = explain(c, png(photo), methods="gradcam,vanilla", sign="signed", smooth="0").json()
        server = {m: np.load(io.BytesIO(c.get(body["methods"][m]["npy"]).content)) for m in ("gradcam", "vanilla")}
    (tmp_path / "photo.png").write_bytes(png(photo))
    monkeypatch.chdir(tmp_path)
    args = body["settings"]["command"].split()[1:] + ["--out", "out", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    for m, got in server.items():
        # the CLI stores maps at the model's resolution; load_map puts them on the image grid, as the server does
        np.testing.assert_allclose(load_map(tmp_path / "out" / "photo", m), got, rtol=0,
                                   atol=1e-5 * np.abs(got).max())


def test_lung_mask_gives_localisation_beside_chance(client, photo):
    mask = np.zeros(photo.shape[:2], np.float32)
    mask[:, : photo.shape[1] // 2] = 1.0
    body = explain(client, png(photo), methods="vanilla", lung_mask=png(mask)).json()
    m = np.load(io.BytesIO(client.get(body["methods"]["vanilla"]["npy"]).content))
    loc = body["localisation"]["vanilla"]
    assert loc["lungs"]["mass"] == pytest.approx(mass_inside(m, mask > 0.5), abs=1e-5)
    assert loc["lungs"]["chance"] == pytest.approx(0.5)
    assert loc["lungs"]["reading"].endswith(f"({loc['lungs']['mass'] / 0.5:.1f}x)")
    assert body["masks"]["lungs"].endswith("/masks/lungs.png") and client.get(body["masks"]["lungs"]).status_code == 200


def test_dicom_with_window_presets(client):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    path = get_testdata_file("CT_small.dcm")
    data = Path(path).read_bytes()
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    for window, (c, w) in core.WINDOW_PRESETS.items():
        img = core.decode_upload(data, "ct.dcm", window=window)
        expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
        assert window in img.meta["window"]
    own = core.decode_upload(data, "ct.dcm")
    np.testing.assert_allclose(own.pixels, load_image(path).pixels)
    r = client.post("/api/preview", files={"image": ("ct.dcm", data, "application/dicom")}, data={"window": "bone"})
    assert r.status_code == 200 and r.json()["png"].startswith("data:image/png;base64,")
    r = explain(client, data, name="scan.dcm", window="lung")
    assert r.status_code == 200 and r.json()["image"]["decoded"]["format"] == "DICOM"
    assert r.json()["settings"]["window"] == "lung" and "preset" in r.json()["settings"]["note"]


# ---- errors -------------------------------------------------------------------------------------------------
def _bomb_png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name, data, fields, message", [
    ("x.png", b"this is not an image", {}, r"'x\.png' is not an image that can be read"),
    ("trunc.png", "TRUNCATED", {}, r"'trunc\.png' is truncated or corrupt"),
    ("empty.png", b"", {}, r"'empty\.png' is empty"),
    ("bomb.png", _bomb_png(20000, 20000), {}, r"'bomb\.png' declares .*decompression-bomb guard"),
    ("plan.dcm", "RTPLAN", {}, r"'plan\.dcm' is a DICOM file without pixel data"),
    ("p.png", None, {"model": "vgg16"}, r"unknown model 'vgg16'; this server offers torchvision:resnet18@random"),
    ("p.png", None, {"methods": "gradcan"}, r"unknown method 'gradcan'\. Did you mean gradcam"),
    ("p.png", None, {"target": "tabby cat"}, r"unknown class name 'tabby cat'\. Did you mean 'tabby'"),
    ("p.png", None, {"target": "1000"}, r"--target 1000 is out of range"),
    ("p.png", None, {"methods": "smoothgrad", "set": ["smoothgrad.n_samples=many"]}, r"'many' is not a number"),
    ("p.png", None, {"methods": "smoothgrad", "set": ["smoothgrad.n_samples=100000"]}, r"above this server's cap"),
    ("p.png", None, {"set": ["gradcam.colour=red"]}, r"gradcam has no option 'colour'; it has layer, relu"),
    ("p.png", None, {"set": ["n_samples=3"]}, r"write METHOD\.OPTION=VALUE"),
    ("p.png", None, {"cmap": "rainbowz"}, r"--cmap rainbowz: not a matplotlib colormap"),
    ("p.png", None, {"window": "brain"}, r"window 'brain': use one of file, lung, mediastinum, bone"),
    ("p.png", None, {"alpha": "2"}, r"--alpha 2"),
    ("p.png", None, {"alpha": "much"}, r"field 'alpha'"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_bad_input_is_a_400_with_the_cli_message(client, photo, name, data, fields, message):
    if data is None:
        data = png(photo)
    elif data == "TRUNCATED":
        data = png(photo)[:400]
    elif data == "RTPLAN":
        from pydicom.data import get_testdata_file

        data = Path(get_testdata_file("rtplan.dcm")).read_bytes()
    r = explain(client, data, name=name, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert re.search(message, error), error
    assert "\n" not in error and "Traceback" not in error and "/tmp" not in error


def test_missing_image_is_a_400(client):
    r = client.post("/api/explain", data={"methods": "gradcam"})
    assert r.status_code == 400 and r.json() == {"error": "field 'image': missing"}


def test_too_large_is_a_413_before_decoding_also_when_chunked(photo, monkeypatch):
    decoded = []
    real = core.decode_upload
    monkeypatch.setattr(core, "decode_upload", lambda *a, **k: decoded.append(1) or real(*a, **k))
    app = create_app(ServeConfig(models=(RESNET,), allowed_hosts=HOSTS, max_upload_mb=0.01))
    big = np.random.default_rng(0).random((80, 80, 3))  # about 58 KB of PNG, over 0.01 MB
    with TestClient(app) as c:
        r = explain(c, png(big))
        assert r.status_code == 413 and "larger than the server's limit of 0.01 MB" in r.json()["error"]

        def chunks():
            for _ in range(40):
                yield b"x" * 1024

        r = c.post("/api/explain", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413
        assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
        small = png(np.asarray(big[:16, :16]))
        assert explain(c, small).status_code == 200  # a small upload still goes through
    assert decoded == [1]


def test_queue_full_is_a_503_with_retry_after_and_the_server_keeps_serving(photo, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = core.explain_image

    def slow(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "explain_image", slow)
    app = create_app(ServeConfig(models=(RESNET,), allowed_hosts=HOSTS, queue=0))
    data = png(photo)
    with TestClient(app) as c:
        first: dict = {}
        t = threading.Thread(target=lambda: first.setdefault("r", explain(c, data)))
        t.start()
        assert started.wait(60)
        assert c.get("/api/health").json()["queue"] == {"running": 1, "waiting": 0, "queue": 0}
        busy = explain(c, data)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
        assert "busy" in busy.json()["error"]
        busy = c.post("/api/classify", files={"image": ("p.png", data, "image/png")})
        assert busy.status_code == 503
        release.set()
        t.join(60)
        assert first["r"].status_code == 200
        assert explain(c, data).status_code == 200
        assert c.get("/api/health").json()["queue"]["running"] == 0


def test_internal_error_is_a_500_with_an_id_in_the_log(client, photo, monkeypatch, caplog):
    def boom(*_a, **_k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(core, "explain_image", boom)
    with caplog.at_level(logging.ERROR, logger="saliencylab.serve"):
        r = explain(client, png(photo))
    assert r.status_code == 500
    eid = r.json()["id"]
    assert re.fullmatch(r"[0-9a-f]{12}", eid) and eid in r.json()["error"] and "kaboom" not in r.text
    record = next(rec for rec in caplog.records if eid in rec.getMessage())
    assert record.exc_info and "kaboom" in str(record.exc_info[1])


def test_token_origin_and_host_checks(photo):
    app = create_app(ServeConfig(models=(RESNET,), allowed_hosts=HOSTS, token="s3cret-token"))
    with TestClient(app) as c:
        assert c.get("/api/health").status_code == 401
        assert c.get("/api/health", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        assert c.get("/api/health", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        r = c.get("/api/health?token=s3cret-token")
        assert r.status_code == 200 and "HttpOnly; SameSite=Strict" in r.headers["set-cookie"]
        assert c.cookies.get("saliencylab_token") == "s3cret-token"
        assert c.get("/api/models").status_code == 200  # the cookie alone is enough now
        c.cookies.clear()
        assert c.get("/api/models").status_code == 401
        assert c.get("/").status_code == 200 and c.get("/docs").status_code == 200  # the page itself holds no data
        r = c.post("/api/classify", files={"image": ("p.png", png(photo), "image/png")},
                   headers={"X-Token": "s3cret-token", "Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-origin" in r.json()["error"]
        r = c.post("/api/classify", files={"image": ("p.png", png(photo), "image/png")},
                   headers={"X-Token": "s3cret-token", "Origin": "http://testserver"})
        assert r.status_code == 200
    other = create_app(ServeConfig(models=(RESNET,)))  # loopback names only
    with TestClient(other) as c:
        assert c.get("/api/health").status_code == 400  # Host: testserver is refused (DNS rebinding guard)
        assert c.get("/api/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200


# ---- teaching -----------------------------------------------------------------------------------------------
def test_teaching_exercise_scores_the_student_region(client):
    ex = client.get("/api/teaching/exercises").json()["exercises"]
    assert [e["id"] for e in ex] == [e.id for e in teaching.EXERCISES]
    img = _png(client.get(ex[1]["image"]).content)
    assert img.size == (teaching.EXERCISE_SIDE, teaching.EXERCISE_SIDE)
    ph = teaching.phantom("phantom-2")
    assert ph.lesions.any() and ph.marker_box is not None
    region = png(ph.lesions.astype(np.float32))  # the student marks exactly the lesions
    r = client.post("/api/teaching/attempt", files={"region": ("r.png", region, "image/png")},
                    data={"exercise": "phantom-2", "method": "vanilla"})
    assert r.status_code == 200, r.text
    t = r.json()["teaching"]
    assert t["student"]["lesion_covered"] == pytest.approx(1.0) and t["student"]["dice"] == pytest.approx(1.0)
    loc = t["localisation"]
    assert loc["student"]["mass"] == pytest.approx(loc["lesions"]["mass"], abs=1e-6)
    assert loc["lungs"]["chance"] == pytest.approx(ph.lungs.mean(), abs=1e-6)
    m = np.load(io.BytesIO(client.get(r.json()["methods"]["vanilla"]["npy"]).content))
    assert loc["lungs"]["mass"] == pytest.approx(mass_inside(m, ph.lungs), abs=1e-5)
    x0, y0, x1, y1 = ph.marker_box
    assert loc["marker"]["chance"] == pytest.approx((x1 - x0 + 2) * (y1 - y0 + 2) / 256**2, abs=1e-6)
    assert set(r.json()["masks"]) == {"lungs", "lesions", "marker", "student"}
    assert any("inside the lungs" in line for line in t["reading"])


def test_teaching_errors(client, photo):
    nothing = png(np.zeros((32, 32), np.float32))
    r = client.post("/api/teaching/attempt", files={"region": ("r.png", nothing, "image/png")},
                    data={"exercise": "phantom-1"})
    assert r.status_code == 400 and "marks nothing" in r.json()["error"]
    some = png(np.ones((32, 32), np.float32))
    r = client.post("/api/teaching/attempt", files={"region": ("r.png", some, "image/png")}, data={"exercise": "x"})
    assert r.status_code == 400 and "unknown exercise 'x'" in r.json()["error"]
    r = client.post("/api/teaching/attempt", files={"region": ("r.png", some, "image/png"),
                                                    "image": ("p.png", png(photo), "image/png")})
    assert r.status_code == 200 and r.json()["teaching"]["student"]["lesion_covered"] is None


# ---- the page, the docs, the command ----------------------------------------------------------------------
def test_page_and_docs_fetch_nothing_from_elsewhere(client):
    for path in ("/", "/docs", "/static/app.js", "/static/app.css", "/static/docs.js", "/static/docs.css"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert not re.search(r"(?:src|href|url)\s*[=(]\s*[\"']?(?:https?:)?//", r.text), path
        assert "default-src 'self'" in r.headers["content-security-policy"]
    spec = client.get("/openapi.json").json()
    assert {"/api/health", "/api/models", "/api/methods", "/api/classify", "/api/explain",
            "/api/teaching/attempt"} <= set(spec["paths"])
    fields = spec["components"]["schemas"][
        spec["paths"]["/api/explain"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        .split("/")[-1]]["properties"]
    assert {"image", "model", "methods", "target", "set", "lung_mask", "window"} <= set(fields)


def test_serve_command_checks_and_warnings(monkeypatch):
    from typer.testing import CliRunner

    from saliencylab.cli import app as cli
    from saliencylab.web import server

    assert server.exposure_warning("127.0.0.1", None) is None and server.exposure_warning("::1", None) is None
    assert "WITHOUT AUTHENTICATION" in server.exposure_warning("0.0.0.0", None)
    assert "needs the token" in server.exposure_warning("192.168.1.5", "0123456789")
    assert server.allowed_hosts("0.0.0.0") == ("*",) and "10.0.0.2" in server.allowed_hosts("10.0.0.2")
    assert core.ModelEntry.parse("torchvision:resnet18@random") == core.ModelEntry("torchvision:resnet18", "random")
    assert core.ModelEntry.parse("runs/a@b/best.pt") == core.ModelEntry("runs/a@b/best.pt")
    res = CliRunner().invoke(cli, ["serve", "--token", "short"])
    assert res.exit_code == 2 and "at least 8 characters" in res.stderr
    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(kw, app=app))
    res = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "8123", "--model",
                                   "torchvision:resnet18@random", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "WITHOUT AUTHENTICATION" in res.output and seen["host"] == "0.0.0.0" and seen["port"] == 8123
    assert seen["app"].state.config.models == (core.ModelEntry("torchvision:resnet18", "random"),)


def test_model_work_runs_off_the_event_loop(client, photo, monkeypatch):
    threads = []
    real = core.explain_image

    def spy(*a, **k):
        threads.append(threading.current_thread() is threading.main_thread() or _in_loop())
        return real(*a, **k)

    monkeypatch.setattr(core, "explain_image", spy)
    assert explain(client, png(photo)).status_code == 200
    assert threads == [False]


def _in_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def test_models_are_loaded_once(photo, monkeypatch):
    import saliencylab.web.core as web_core

    calls = []
    real = web_core.load_model
    monkeypatch.setattr(web_core, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    with TestClient(create_app(ServeConfig(models=(RESNET,), allowed_hosts=HOSTS))) as c:
        for _ in range(2):
            assert explain(c, png(photo)).status_code == 200
        assert c.get("/api/classes").status_code == 200
    assert calls == [("torchvision:resnet18",)]


def test_a_binary_chest_xray_checkpoint_in_teaching_mode(tmp_path):
    """A single-logit checkpoint offered by path: positive/negative targets, two-class top list, teaching."""
    from saliencylab.models import load_model
    from saliencylab.models.registry import save_checkpoint

    clf = load_model("cxr_cnn", weights="random", image_size=64)
    save_checkpoint(clf, tmp_path / "best.pt", arch="cxr_cnn", arch_kwargs={"image_size": 64})
    entry = core.ModelEntry.parse(str(tmp_path / "best.pt"))
    ph = teaching.phantom("phantom-3")
    with TestClient(create_app(ServeConfig(models=(entry,), allowed_hosts=HOSTS))) as c:
        assert c.get("/api/classes").json()["binary"] is True
        image = png(ph.image)
        for target, index in (("positive", 1), ("negative", 0), ("Normal", 0)):
            body = explain(c, image, target=target, methods="gradcam").json()
            assert body["target"]["index"] == index and len(body["top"]) == 2
            assert sum(t["probability"] for t in body["top"]) == pytest.approx(1.0)
        region = png(ph.lungs.astype(np.float32))
        r = c.post("/api/teaching/attempt", files={"region": ("r.png", region, "image/png")},
                   data={"exercise": "phantom-3", "method": "gradcam"})
        t = r.json()["teaching"]
        assert t["student"]["lesion_covered"] is None  # a clear chest: nothing to find
        assert t["localisation"]["student"]["mass"] == pytest.approx(t["localisation"]["lungs"]["mass"], abs=1e-6)
