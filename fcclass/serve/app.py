"""The ASGI app (Starlette): the prediction API, model info, health and readiness, the OpenAPI schema with its docs
page, and the drop-an-image page, all served by fcclass itself (no CDN)."""

from __future__ import annotations

import asyncio
import hmac
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fcclass.errors import DataError, NotAnImageError
from fcclass.serve.model import Served, Service
from fcclass.serve.uploads import ApiError, BodyLimit, BodyTooLarge, read_images, too_large

DEFAULT_TOP_K = 3  # as `fcclass predict`
OPEN_PATHS = ("/healthz", "/readyz")  # what a load balancer or orchestrator probes, without the key


class ApiKey:
    """With a key set, every path but OPEN_PATHS needs it: in the X-API-Key header, or, for a browser opening the page
    or the docs (which cannot send a header), as ``?api_key=KEY`` in the URL; the page then sends it as the header."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            from urllib.parse import parse_qs

            given = dict(scope["headers"]).get(b"x-api-key", b"")
            if not given:
                given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key") or [""])[0].encode("latin-1")
            if not hmac.compare_digest(given, self.key.encode()):
                why = "a wrong API key" if given else "no X-API-Key header (nor ?api_key= in the URL)"
                await ApiError(401, f"This server needs an API key: the request has {why}. Send the key the server was started "
                                    "with (--api-key or FCCLASS_API_KEY) as the X-API-Key header; in a browser, open "
                                    "/?api_key=KEY.").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _served(request: Request) -> Served:
    service: Service = request.app.state.service
    if service.served is None:
        raise ApiError(503, "The model is still loading; try again in a moment (GET /readyz says when it is ready)."
                       if service.error is None else f"The model could not be loaded: {service.error}")
    return service.served


def _decode_all(served: Served, images: list[tuple[str, bytes]]) -> Any:
    """The images as one uint8 batch, or the ApiError naming every file that cannot be read: 415 when none of them
    is an image at all, else 422 (truncated, a decompression bomb, ...)."""
    import torch

    from fcclass.inference.predict import decode_upload

    decoded, bad, foreign = [], [], 0
    for name, data in images:
        try:
            decoded.append(decode_upload(served.inference, data, name))
        except DataError as e:
            bad.append({"file": name, "error": str(e).removeprefix(f"{name}: ")})
            foreign += isinstance(e, NotAnImageError)
    if bad:
        first = f"{bad[0]['file']}: {bad[0]['error']}"
        more = f" (and {len(bad) - 1} more file(s); see 'files')" if len(bad) > 1 else ""
        raise ApiError(415 if foreign == len(bad) else 422, f"{first}{more}", bad)
    return torch.stack(decoded)


async def predict(request: Request) -> Response:
    served = _served(request)
    service: Service = request.app.state.service
    started = time.perf_counter()
    with service.batcher.arriving():
        images, top_k = await read_images(request, service.limits.max_files)
        batch = await run_in_threadpool(_decode_all, served, images)
        future = service.batcher.submit(batch)
    left = service.limits.timeout_s - (time.perf_counter() - started)
    try:
        logits, batch_size = await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(left, 0.001))
    except asyncio.TimeoutError:
        future.cancel()
        raise ApiError(503, f"Timed out after {service.limits.timeout_s:g} s waiting for the model (the server is busy); "
                            "try again later.") from None
    from fcclass.inference.predict import labelled

    preds = labelled([name for name, _ in images], logits, served.inference.class_names, top_k or DEFAULT_TOP_K)
    return JSONResponse({"predictions": [p.to_dict() for p in preds], "batch_size": batch_size,
                         "time_ms": round((time.perf_counter() - started) * 1000, 1)})


async def info(request: Request) -> Response:
    served = _served(request)
    limits = request.app.state.service.limits
    return JSONResponse(served.info() | {"max_batch": limits.max_batch, "max_wait_ms": limits.max_wait_ms,
                                         "max_upload_mb": limits.max_upload_mb, "max_files": limits.max_files})


async def report(request: Request) -> Response:
    """The run's `fcclass report` page, read when asked (it may be written while the server runs)."""
    path = _served(request).report_file()
    if path is None:
        raise ApiError(404, "This run has no report yet: write it with `fcclass report RUN` (report.html in the run), then reload.")
    return HTMLResponse(path.read_text(encoding="utf-8"))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = request.app.state.service.state
    return JSONResponse({"status": state}, status_code=200 if state == "ready" else 503)


def _page(name: str) -> str:
    return resources.files("fcclass.serve").joinpath("static", name).read_text(encoding="utf-8")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _too_large(request: Request, exc: Exception) -> Response:
    return too_large(request.app.state.body_limit).response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _bug(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"Internal error ({type(exc).__name__}: {str(exc)[:200]}); this is a bug in fcclass."}, status_code=500)


def create_app(service: Service, api_key: str | None = None) -> Starlette:
    """The app serving ``service`` (its model loading or loaded; the caller starts it). ``api_key``: what the
    X-API-Key header must hold (None: no key needed)."""
    from fcclass.serve.openapi import schema

    page, docs, spec = _page("index.html"), _page("docs.html"), schema(service.limits)
    routes = [
        Route("/", lambda request: HTMLResponse(page)),
        Route("/docs", lambda request: HTMLResponse(docs)),
        Route("/openapi.json", lambda request: JSONResponse(spec)),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/v1/info", info),
        Route("/report", report),
        Route("/v1/predict", predict, methods=["POST"]),
    ]
    limit = service.limits.max_upload_bytes
    app = Starlette(routes=routes, middleware=[Middleware(ApiKey, key=api_key), Middleware(BodyLimit, limit=limit)],
                    exception_handlers={ApiError: _api_error, BodyTooLarge: _too_large, HTTPException: _http_error, Exception: _bug})
    app.state.service, app.state.body_limit = service, limit
    return app
