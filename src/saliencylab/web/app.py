"""The workbench's HTTP layer: a FastAPI app over `web.core`, with limits, a model queue and its own page.

Nothing here computes saliency; it parses requests, enforces the limits (upload size before decoding, one
model call at a time behind a bounded queue, tokens, same-origin POSTs), and turns errors into one-line
400s or 500s with an id that the server log shows with the traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import math
import statistics
import time
import uuid
import zipfile
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import anyio
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from saliencylab.data.images import MAX_PIXELS
from saliencylab.errors import UserError
from saliencylab.render.maps import DEFAULT_ALPHA
from saliencylab.studies.photos import DisplaySettings
from saliencylab.web import core, teaching

log = logging.getLogger("saliencylab.serve")
STATIC = Path(__file__).parent / "static"
T = TypeVar("T")
COOKIE = "saliencylab_token"
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs.

    Attributes:
        models: the models offered (the first is the default); nothing else can be loaded by a request.
        device: auto, cpu or cuda.
        max_upload_mb: the largest request body, checked before anything is decoded.
        queue: requests that may wait for the model while one runs; more get 503 with Retry-After.
        token: when set, every /api call needs it (Authorization: Bearer, X-Token header, or ?token=); a call
            with it gets an HttpOnly, SameSite=Strict cookie that the page's images then carry.
        allowed_hosts: Host headers accepted (DNS-rebinding guard); '*' accepts any.
        max_pixels: the decompression-bomb limit.
        preload: load every model at start instead of on first use.
        results: explained images kept in memory for redraws and downloads.
    """

    models: tuple[core.ModelEntry, ...] = (core.ModelEntry("efficientnet_lite0"),)
    device: str = "auto"
    max_upload_mb: float = 20.0
    queue: int = 4
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1", "[::1]")
    max_pixels: int = MAX_PIXELS
    preload: bool = False
    results: int = 32

    @property
    def max_body(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Busy(Exception):
    """The model queue is full."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class Gate:
    """One model call at a time (per worker process), at most `queue` waiting; the work runs in a thread."""

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self.running = 0
        self.waiting = 0
        self.recent: deque[float] = deque(maxlen=32)
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def retry_after(self) -> int:
        per = statistics.median(self.recent) if self.recent else 1.0
        return max(1, math.ceil(per * (self.waiting + self.running)))

    def state(self) -> dict[str, int]:
        return {"running": self.running, "waiting": self.waiting, "queue": self.queue}

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` in a worker thread when the model is free; raise Busy at once when the queue is full."""
        if self.running + self.waiting >= 1 + self.queue:
            raise Busy(self.retry_after())
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._sem, self._loop = asyncio.Semaphore(1), loop
        sem = self._sem
        assert sem is not None
        self.waiting += 1
        try:
            await sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        t0 = loop.time()
        try:
            return await anyio.to_thread.run_sync(fn)
        finally:
            self.running -= 1
            self.recent.append(loop.time() - t0)
            sem.release()


def _json_bytes(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[dict, dict]:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": hdrs},
            {"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: security headers, token, same-origin POSTs, the body limit, and 500s with an id.

    The body of a POST is read here, counting bytes, before the app sees it: a declared Content-Length
    over the limit is refused without reading, and a chunked body is refused as soon as it passes the limit.
    """

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        set_cookie = False

        async def send_with_headers(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]
                if set_cookie:
                    extra.append((b"set-cookie", f"{COOKIE}={self.config.token}; HttpOnly; SameSite=Strict; "
                                                 "Path=/api".encode()))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        async def reply(status: int, error: str, headers: dict[str, str] | None = None) -> None:
            start, body = _json_bytes(status, {"error": error}, headers)
            await send_with_headers(start)
            await send(body)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path.startswith("/api/") and self.config.token:
            how = self._authorised(scope, headers)
            if how is None:
                await reply(401, "this server needs its token: send 'Authorization: Bearer TOKEN' "
                                 "(the page: open it with ?token=TOKEN)")
                return
            set_cookie = how != "cookie"
        if method not in ("GET", "HEAD", "OPTIONS"):
            if not self._same_origin(headers):
                await reply(403, "cross-origin request refused; use the page served by this server")
                return
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.config.max_body):
                await reply(413, self._too_large(), {"connection": "close"})
                return
            chunks, total = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                total += len(body)
                if total > self.config.max_body:
                    await reply(413, self._too_large(), {"connection": "close"})
                    return
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            receive = _replay(b"".join(chunks), receive)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            eid = uuid.uuid4().hex[:12]
            log.error("internal error id %s on %s %s", eid, method, path, exc_info=True)
            if not started:
                start, body = _json_bytes(500, {"error": f"internal error (id {eid}); the server log shows it with "
                                                         "its traceback; please report it", "id": eid})
                await send_with_headers(start)
                await send(body)

    def _too_large(self) -> str:
        return (f"the upload is larger than the server's limit of {self.config.max_upload_mb:g} MB; "
                "send a smaller file or start the server with a larger --max-upload-mb")

    def _authorised(self, scope: dict, headers: dict[str, str]) -> str | None:
        """How the request proved it has the token ('header', 'query' or 'cookie'), or None."""
        from http.cookies import SimpleCookie
        from urllib.parse import parse_qs

        auth = headers.get("authorization", "")
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:
            cookies = SimpleCookie()
        candidates = {
            "header": auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-token", ""),
            "query": (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0],
            "cookie": cookies[COOKIE].value if COOKIE in cookies else "",
        }
        want = (self.config.token or "").encode()
        for how, given in candidates.items():
            if given and hmac.compare_digest(given.encode(), want):
                return how
        return None

    @staticmethod
    def _same_origin(headers: dict[str, str]) -> bool:
        if headers.get("sec-fetch-site") == "cross-site":
            return False
        origin = headers.get("origin")
        if not origin:  # curl and other non-browser clients send none
            return True
        return urlsplit(origin).netloc == headers.get("host", "")


def _replay(body: bytes, receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _display_query(d: DisplaySettings) -> str:
    q = {"sign": d.sign, "smooth": f"{d.smooth:g}", "normalise": d.normalise, "alpha": f"{d.alpha:g}"}
    if d.cmap:
        q["cmap"] = d.cmap
    return urlencode(q)


def _settings(result: core.Result, display: DisplaySettings) -> dict[str, Any]:
    return {
        "saliencylab": "workbench settings; `command` reproduces the maps with the CLI",
        "command": core.cli_command(result, display),
        "image": result.filename, "model": result.model, "methods": result.settings["methods"],
        "target": result.settings["target"], "set": result.settings.get("set", []),
        "options": {m: v["options"] for m, v in result.methods.items()},
        "display": dict(display.__dict__), "window": result.settings.get("window", "file"),
        "note": ("a DICOM shown with a window preset is explained on that rendering; the CLI uses the file's own "
                 "window" if result.settings.get("window", "file") != "file" else ""),
    }


def payload(result: core.Result, display: DisplaySettings, *, inline: bool = False) -> dict[str, Any]:
    """The JSON answer for an explained image; images and maps are URLs under /api/results/<id>/."""
    base = f"/api/results/{result.id}"
    q = _display_query(display)
    methods = {}
    for name, info in result.methods.items():
        entry = {**info, "overlay": f"{base}/maps/{name}/overlay.png?{q}", "heat": f"{base}/maps/{name}/heat.png?{q}",
                 "npy": f"{base}/maps/{name}.npy"}
        if inline:
            import base64

            entry["overlay_png_base64"] = base64.b64encode(core.render_overlay(result, name, display)).decode()
        methods[name] = entry
    out = {
        "id": result.id, "model": result.model, "model_info": result.model_info,
        "image": {"filename": result.filename, "size": list(result.size), "display_size": list(result.image.shape[:2]),
                  "decoded": result.decoded, "url": f"{base}/image.png"},
        "top": result.top, "target": result.target, "methods": methods,
        "seconds": {n: m["seconds"] for n, m in result.methods.items()},
        "masks": {k: f"{base}/masks/{k}.png" for k in result.masks},
        "localisation": ({n: core.localisation(result, n) for n in result.methods} if result.masks else None),
        "settings": _settings(result, display),
        "downloads": {"maps_zip": f"{base}/maps.zip?{q}", "settings": f"{base}/settings.json?{q}"},
    }
    return out


def create_app(config: ServeConfig = ServeConfig()) -> FastAPI:
    """The workbench app: the page at /, the API under /api, an offline API docs page at /docs."""
    cache = core.ModelCache(config.models, config.device)
    gate = Gate(config.queue)
    store = core.ResultStore(config.results)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        if config.preload:
            for label in cache.entries:
                await run_in_threadpool(cache.get, label)
                log.info("loaded model %s", label)
        yield

    app = FastAPI(title="saliencylab workbench", version=_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Saliency maps for one image at a time. Every call runs on this "
                  "machine; nothing is fetched from the network.")
    app.state.gate, app.state.cache, app.state.store, app.state.config = gate, cache, store, config
    app.add_middleware(Guard, config=config)
    if "*" not in config.allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts))

    @app.exception_handler(UserError)
    async def user_error(_request: Request, err: UserError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.exception_handler(Busy)
    async def busy(_request: Request, err: Busy) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": str(err.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        msg = "missing" if first.get("type") == "missing" else first.get("msg", "invalid")
        return JSONResponse({"error": f"field '{where}': {msg}"}, status_code=400)

    async def read_upload(upload: UploadFile | None, what: str) -> tuple[bytes, str] | None:
        if upload is None:
            return None
        return await upload.read(), upload.filename or what

    def result_or_404(rid: str) -> core.Result:
        result = store.get(rid)
        if result is None:
            raise _NotFound(f"no result '{rid}' (results are kept in memory for the last {config.results} "
                            "images and lost on restart); explain the image again")
        return result

    @app.exception_handler(_NotFound)
    async def not_found(_request: Request, err: _NotFound) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=404)

    # ---- the page and the docs -------------------------------------------------------------------
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- catalogue ---------------------------------------------------------------------------------
    @app.get("/api/health", summary="Is the server up; queue state and loaded models")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": _version(), "models_loaded": cache.loaded(), "queue": gate.state(),
                "max_upload_mb": config.max_upload_mb, "device": config.device}

    @app.get("/api/models", summary="The models this server offers")
    async def models() -> dict[str, Any]:
        return {"default": cache.default, "models": [
            {"label": label, "name": e.name, "weights": e.weights, "loaded": label in cache.loaded()}
            for label, e in cache.entries.items()]}

    @app.get("/api/classes", summary="A model's class names (for target search); loads the model")
    async def classes(model: str | None = Query(None, description="a label from /api/models")) -> dict[str, Any]:
        clf = await run_in_threadpool(cache.get, model)
        return {"model": model or cache.default, "classes": clf.class_names, "binary": clf.binary,
                "input_size": list(clf.input_size), "channels": clf.channels}

    @app.get("/api/methods", summary="Saliency methods: names, families, papers, option schemas, display defaults")
    async def methods() -> dict[str, Any]:
        return {"methods": core.method_catalogue(), "windows": list(core.WINDOWS),
                "signs": list(core.SIGNS), "normalise": ["auto", *core.NORMALISE_MODES],
                "display": dict(DisplaySettings().__dict__)}  # the CLI's defaults; the page starts from them

    # ---- work ----------------------------------------------------------------------------------------
    @app.post("/api/preview", summary="Decode an image or DICOM (with a window preset) and return it as PNG")
    async def preview(image: UploadFile = File(..., description="an image or DICOM file"),
                      window: str = Form("file", description="file, lung, mediastinum or bone")) -> dict[str, Any]:
        data, name = await read_upload(image, "image")  # type: ignore[misc]

        def work() -> dict[str, Any]:
            import base64

            img = core.decode_upload(data, name, window=window, max_pixels=config.max_pixels)
            small = core.resize_image(img.pixels, core.display_size(img.size))
            png = core.png_bytes(core.to_uint8(small))
            return {"filename": img.source, "size": list(img.size), "decoded": core.jsonable(img.meta),
                    "png": "data:image/png;base64," + base64.b64encode(png).decode()}

        return await run_in_threadpool(work)

    @app.post("/api/classify", summary="Top-k classes of one image")
    async def classify(image: UploadFile = File(..., description="an image or DICOM file"),
                       model: str | None = Form(None, description="a label from /api/models (default: the first)"),
                       top_k: int = Form(5, ge=1, le=1000), window: str = Form("file")) -> dict[str, Any]:
        data, name = await read_upload(image, "image")  # type: ignore[misc]
        label = _check_model(cache, model)
        img = await run_in_threadpool(core.decode_upload, data, name, window=window, max_pixels=config.max_pixels)

        def work() -> dict[str, Any]:
            clf = cache.get(label)
            t0 = time.perf_counter()
            top = core.classify_image(clf, img, top_k)
            return {"model": label, "image": {"filename": img.source, "size": list(img.size),
                                              "decoded": core.jsonable(img.meta)},
                    "top": top, "seconds": round(time.perf_counter() - t0, 4)}

        return await gate.run(work)

    @app.post("/api/explain", summary="Predictions, target, and a saliency map per method for one image")
    async def explain(
        image: UploadFile = File(..., description="an image or DICOM file"),
        model: str | None = Form(None, description="a label from /api/models (default: the first)"),
        methods: str = Form("gradcam", description="comma-separated names from /api/methods"),
        target: str = Form("predicted", description="predicted, a class index or name, positive/negative"),
        options: list[str] = Form([], alias="set", description="METHOD.OPTION=VALUE, repeatable (the CLI's --set)"),
        sign: str = Form("abs"), smooth: float = Form(0.01), normalise: str = Form("auto"),
        alpha: float = Form(DEFAULT_ALPHA), cmap: str | None = Form(None), window: str = Form("file"),
        lung_mask: UploadFile | None = File(None, description="optional lung mask (white = lung): localisation"),
        inline: bool = Form(False, description="also return each overlay as base64 PNG"),
    ) -> dict[str, Any]:
        data, name = await read_upload(image, "image")  # type: ignore[misc]
        has_mask = lung_mask is not None and bool(lung_mask.filename)
        mask_upload = await read_upload(lung_mask, "lung mask") if has_mask else None
        label = _check_model(cache, model)

        def prepare() -> tuple[Any, ...]:
            display = core.check_display(sign, normalise, smooth, alpha, cmap)
            specs = core.check_methods(methods)
            opts = core.parse_options(options, specs)
            img = core.decode_upload(data, name, window=window, max_pixels=config.max_pixels)
            lungs = (core.decode_mask(mask_upload[0], mask_upload[1], core.display_size(img.size), "lung mask")
                     if mask_upload else None)
            return display, specs, opts, img, lungs

        display, specs, opts, img, lungs = await run_in_threadpool(prepare)

        def work() -> core.Result:
            result = core.explain_image(cache.get(label), img, specs, opts, target, model_label=label)
            result.settings.update({"set": list(options), "window": window})
            if lungs is not None:
                result.masks["lungs"] = lungs
            return result

        result = await gate.run(work)
        store.put(result)
        return await run_in_threadpool(payload, result, display, inline=inline)

    # ---- results -----------------------------------------------------------------------------------
    def display_from(sign: str, smooth: float, normalise: str, alpha: float, cmap: str | None) -> DisplaySettings:
        return core.check_display(sign, normalise, smooth, alpha, cmap)

    @app.get("/api/results/{rid}", summary="An explained image's JSON again")
    async def result_json(rid: str, sign: str = "abs", smooth: float = 0.01, normalise: str = "auto",
                          alpha: float = DEFAULT_ALPHA, cmap: str | None = None) -> dict[str, Any]:
        result = result_or_404(rid)
        return await run_in_threadpool(payload, result, display_from(sign, smooth, normalise, alpha, cmap))

    @app.get("/api/results/{rid}/image.png", summary="The image as shown (display size)")
    async def result_image(rid: str) -> Response:
        result = result_or_404(rid)
        return Response(await run_in_threadpool(core.image_png, result), media_type="image/png")

    @app.get("/api/results/{rid}/maps/{method}.npy", summary="A raw map, float32, at the original image size")
    async def result_npy(rid: str, method: str) -> Response:
        result = result_or_404(rid)
        if method not in result.maps:
            raise _NotFound(f"result {rid} has no map '{method}'; it has {', '.join(result.maps)}")
        data = await run_in_threadpool(lambda: core.npy_bytes(result.full_map(method)))
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{method}.npy"'})

    @app.get("/api/results/{rid}/maps/{method}/{kind}.png", summary="overlay (map over image) or heat (RGBA map)")
    async def result_map_png(rid: str, method: str, kind: str, sign: str = "abs", smooth: float = 0.01,
                             normalise: str = "auto", alpha: float = DEFAULT_ALPHA,
                             cmap: str | None = None) -> Response:
        result = result_or_404(rid)
        if method not in result.maps or kind not in ("overlay", "heat"):
            raise _NotFound(f"no '{kind}' of '{method}' in result {rid}; "
                            f"use overlay or heat of {', '.join(result.maps)}")
        display = display_from(sign, smooth, normalise, alpha, cmap)
        draw = core.render_overlay if kind == "overlay" else core.render_heat
        return Response(await run_in_threadpool(draw, result, method, display), media_type="image/png")

    @app.get("/api/results/{rid}/masks/{kind}.png", summary="A mask (lungs, lesions, marker, student) as RGBA")
    async def result_mask(rid: str, kind: str) -> Response:
        result = result_or_404(rid)
        if kind not in result.masks:
            raise _NotFound(f"result {rid} has no '{kind}' mask; it has {', '.join(result.masks) or 'none'}")
        return Response(await run_in_threadpool(core.render_mask, result.masks[kind], kind), media_type="image/png")

    @app.get("/api/results/{rid}/settings.json", summary="Settings that reproduce the result from the CLI")
    async def result_settings(rid: str, sign: str = "abs", smooth: float = 0.01, normalise: str = "auto",
                              alpha: float = DEFAULT_ALPHA, cmap: str | None = None) -> Response:
        result = result_or_404(rid)
        body = json.dumps(_settings(result, display_from(sign, smooth, normalise, alpha, cmap)), indent=2)
        return Response(body, media_type="application/json",
                        headers={"Content-Disposition": 'attachment; filename="saliencylab-settings.json"'})

    @app.get("/api/results/{rid}/maps.zip", summary="Every raw map (.npy), the overlays and settings.json")
    async def result_zip(rid: str, sign: str = "abs", smooth: float = 0.01, normalise: str = "auto",
                         alpha: float = DEFAULT_ALPHA, cmap: str | None = None) -> Response:
        result = result_or_404(rid)
        display = display_from(sign, smooth, normalise, alpha, cmap)

        def build() -> bytes:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for m in result.maps:
                    z.writestr(f"{m}.npy", core.npy_bytes(result.full_map(m)))
                    z.writestr(f"{m}.png", core.render_overlay(result, m, display))
                z.writestr("settings.json", json.dumps(_settings(result, display), indent=2))
            return buf.getvalue()

        return Response(await run_in_threadpool(build), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="saliencylab-{rid}.zip"'})

    # ---- teaching ----------------------------------------------------------------------------------
    @app.get("/api/teaching/exercises", summary="Phantom chest X-rays with known lesions, lungs and marker")
    async def exercises() -> dict[str, Any]:
        return {"exercises": [{"id": e.id, "title": e.title, "image": f"/api/teaching/exercises/{e.id}/image.png",
                               "size": [teaching.EXERCISE_SIDE] * 2} for e in teaching.EXERCISES]}

    @app.get("/api/teaching/exercises/{eid}/image.png", summary="An exercise's image")
    async def exercise_png(eid: str) -> Response:
        img = await run_in_threadpool(teaching.exercise_image, eid)
        return Response(core.png_bytes(core.to_uint8(img.pixels)), media_type="image/png")

    @app.post("/api/teaching/attempt", summary="Score where the student looked against the model's saliency")
    async def attempt(
        region: UploadFile = File(..., description="the student's marks: a PNG, white or opaque where marked"),
        exercise: str | None = Form(None, description="an exercise id (or upload an image instead)"),
        image: UploadFile | None = File(None, description="a chest X-ray, when not an exercise"),
        lung_mask: UploadFile | None = File(None, description="its lung mask (white = lung), optional"),
        model: str | None = Form(None), method: str = Form("gradcam"), target: str = Form("predicted"),
        options: list[str] = Form([], alias="set"), window: str = Form("file", description="for a DICOM image"),
    ) -> dict[str, Any]:
        region_up = await read_upload(region, "region")
        image_up = await read_upload(image, "image") if image is not None and image.filename else None
        lung_up = await read_upload(lung_mask, "lung mask") if lung_mask is not None and lung_mask.filename else None
        label = _check_model(cache, model)
        if exercise is None and image_up is None:
            raise UserError("teaching: choose an exercise or upload an image")

        def prepare() -> tuple[Any, ...]:
            specs = core.check_methods(method)
            opts = core.parse_options(options, specs)
            masks: dict[str, Any] = {}
            if exercise is not None:
                ph = teaching.phantom(teaching.get_exercise(exercise).id)
                img = teaching.exercise_image(exercise)
                shape = core.display_size(img.size)
                masks["lungs"] = ph.lungs
                masks["lesions"] = ph.lesions
                if ph.marker_box is not None:
                    masks["marker"] = core.marker_mask(shape, ph.marker_box, teaching.EXERCISE_SIDE)
            else:
                img = core.decode_upload(image_up[0], image_up[1], window=window, max_pixels=config.max_pixels)
                shape = core.display_size(img.size)
                if lung_up:
                    masks["lungs"] = core.decode_mask(lung_up[0], lung_up[1], shape, "lung mask")
            masks["student"] = core.decode_mask(region_up[0], region_up[1], shape, "marked region")
            return specs, opts, img, masks

        specs, opts, img, masks = await run_in_threadpool(prepare)

        def work() -> core.Result:
            result = core.explain_image(cache.get(label), img, specs, opts, target, model_label=label)
            result.settings.update({"set": list(options), "window": "file", "exercise": exercise})
            result.masks.update(masks)
            return result

        result = await gate.run(work)
        store.put(result)
        display = DisplaySettings()
        out = await run_in_threadpool(payload, result, display)
        loc = out["localisation"][specs[0].name]
        out["teaching"] = {"exercise": exercise, "method": specs[0].name, "localisation": loc,
                           "reading": teaching.teaching_reading(loc),
                           "student": teaching.student_scores(masks["student"], masks.get("lesions"))}
        return out

    return app


class _NotFound(Exception):
    pass


def _check_model(cache: core.ModelCache, model: str | None) -> str:
    label = model or cache.default
    if label not in cache.entries:
        cache.get(label)  # raises the UserError with the offered models
    return label


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("saliencylab")
    except Exception:
        return "unknown"
