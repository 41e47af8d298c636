"""Start the workbench under uvicorn: check the options, warn about exposure, serve on one worker."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence

from saliencylab.errors import UserError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str) -> tuple[str, ...]:
    """Host headers to accept: loopback names, plus the bound address; any when bound to all interfaces."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        return ("*",)
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, host)))


def exposure_warning(host: str, token: str | None) -> str | None:
    """The warning printed when the server is reachable from other machines, or None on loopback."""
    if is_loopback(host):
        return None
    if token:
        return (f"warning: serving on {host}: reachable from other machines; every API call needs the token, "
                "but traffic is plain HTTP (put a TLS proxy in front on an untrusted network)")
    return (f"warning: serving on {host} WITHOUT AUTHENTICATION: anyone who can reach this address can upload "
            "images and use this machine's CPU/GPU; add --token TOKEN, or bind 127.0.0.1")


def run_server(*, host: str, port: int, models: Sequence[str], max_upload_mb: float, queue: int, device: str,
               token: str | None, log: Callable[[str], None] = print) -> None:
    """Build the app from CLI options and serve it until interrupted."""
    try:
        import uvicorn

        from saliencylab.web.app import ServeConfig, create_app
        from saliencylab.web.core import ModelEntry
    except ImportError as err:
        raise UserError(f"the workbench needs its extra ({err.name} is missing): "
                        "pip install 'saliencylab[web]'") from None
    from saliencylab.models.registry import resolve_device

    if token is not None and len(token) < 8:
        raise UserError("--token: use at least 8 characters (e.g. `openssl rand -hex 16`)")
    resolve_device(device)  # a bad --device fails here, before the port is taken
    config = ServeConfig(models=tuple(ModelEntry.parse(m) for m in models), device=device,
                         max_upload_mb=max_upload_mb, queue=queue, token=token, allowed_hosts=allowed_hosts(host),
                         preload=True)
    warning = exposure_warning(host, token)
    if warning:
        log(warning)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    shown = f"[{host}]" if ":" in host else host
    log(f"loading {', '.join(m.label for m in config.models)}; then the workbench is at http://{shown}:{port}/ "
        f"(API docs: /docs); Ctrl+C stops it")
    uvicorn.run(create_app(config), host=host, port=port, workers=1, log_level="info", server_header=False)
