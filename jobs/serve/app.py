"""The Starlette app of `pixelrefer serve`: pages, the JSON API under /api/, the media route.

Read-only (GET and HEAD only). Every answer carries a Content-Security-Policy that allows
scripts, styles, images and media from this origin only (no inline script or style, no `data:` or
`blob:`: the canvas draws from decoded RLE, thumbnails are plain URLs), so even a caption that
slipped past the page's escaping could not run a script or reach another site. Every error is a JSON body with a 4xx status (5xx
only for a failure of the server itself), never a traceback page. The Host header is checked
when the server is bound to a loopback address, so a web page elsewhere cannot reach it by DNS
rebinding.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.query_errors import QueryError, UsageError
from jobs.serve.api import ServeIndex, not_found_type, parse_float, parse_int
from jobs.serve.media import RangeNotSatisfiable, Source, SourceMissing, parse_range

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
CSP = "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Around the playhead, what the page asks for by default when a request gives only `t`.
DEFAULT_WINDOW_S = 30.0


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


class JSON(Response):
    """JSON with times as ISO strings and no NaN (which browsers' JSON.parse refuses)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):  # already rendered (a cached document)
            return content
        return render_json(content)


def render_json(content: Any) -> bytes:
    """Compact UTF-8 JSON; the walk that turns NaN into null runs only when there is one (it is slow)."""
    try:
        text = json.dumps(content, default=_json_default, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = json.dumps(_finite(content), default=_json_default, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"))
    return text.encode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def error(status: int, message: str, **headers: str) -> JSON:
    return JSON({"error": message, "status": status}, status_code=status, headers=headers or None)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (pages, API, media, errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.decode("latin-1").lower() not in SECURITY_HEADERS]
                headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def as_error(request: Request, exc: Exception) -> JSON:
    """An exception as the JSON error a client gets: 404 for what is not there, 400 for a bad request."""
    if isinstance(exc, (*not_found_type(), SourceMissing)):
        return error(404, str(exc))
    if isinstance(exc, QueryError):
        return error(400, str(exc))
    log.exception("pixelrefer serve: %s %s failed", request.method, request.url.path)
    return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")


def guarded(endpoint: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """The endpoint with its errors answered as JSON here (Starlette's catch-all handler would
    answer too, but then re-raise into the server's log as a crash)."""
    @functools.wraps(endpoint)
    def run(request: Request) -> Response:
        try:
            return endpoint(request)
        except Exception as exc:  # noqa: BLE001 - every error becomes a JSON answer
            return as_error(request, exc)
    return run


def build_app(data: ServeIndex, *, host: str = "127.0.0.1") -> Starlette:
    """The app over one opened index; `host` is the address it is bound to (for the Host check)."""

    def page(name: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            if "video_id" in request.path_params:
                data.video_row(request.path_params["video_id"])  # an unknown id is a 404, not an empty page
            return FileResponse(STATIC / name, media_type="text/html; charset=utf-8",
                                headers={"cache-control": "no-cache"})
        return endpoint

    def api_search(request: Request) -> Response:
        q = request.query_params
        return JSON(data.search(q.get("q", ""), mode=q.get("mode", "auto"), label=q.get("label"),
                                video=q.get("video") or None, top=parse_int(q.get("top"), "top", 20, 1, 100)))

    def api_videos(request: Request) -> Response:
        return JSON({"videos": data.videos(), "labels": data.labels(), "search": "like" if data.has_embeddings else "text"})

    def api_video(request: Request) -> Response:
        return JSON(data.video_json(request.path_params["video_id"], render_json))

    def api_masks(request: Request) -> Response:
        q = request.query_params
        t = parse_float(q.get("t"), "t")
        start = parse_float(q.get("start"), "start", None if t is None else max(0.0, t - DEFAULT_WINDOW_S / 2))
        end = parse_float(q.get("end"), "end", None if start is None else start + DEFAULT_WINDOW_S)
        if start is None or end is None:
            raise UsageError("give start and end (seconds), or t")
        return JSON(data.masks(request.path_params["video_id"], start, end))

    def api_frame(request: Request) -> Response:
        q = request.query_params
        t = parse_float(q.get("t"), "t", 0.0)
        object_id = parse_int(q.get("object"), "object")
        width = parse_int(q.get("width"), "width", 320, 32, 1920)
        jpeg = data.frame_jpeg(request.path_params["video_id"], t, object_id, width=width)
        return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    def media(request: Request) -> Response:
        uri, options = data.source(request.path_params["video_id"])
        source = Source(uri, options)
        try:
            span = parse_range(request.headers.get("range"), source.size)
        except RangeNotSatisfiable as exc:
            return error(416, str(exc), **{"content-range": f"bytes */{exc.size}"})
        headers = {"accept-ranges": "bytes", "cache-control": "no-cache"}
        if span is None:
            first, last, status = 0, source.size - 1, 200
        else:
            (first, last), status = span, 206
            headers["content-range"] = f"bytes {first}-{last}/{source.size}"
        headers["content-length"] = str(last - first + 1)
        body = source.chunks(first, last) if request.method == "GET" else iter(())
        return StreamingResponse(body, status_code=status, media_type=source.media_type, headers=headers)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, str(exc.detail))

    async def on_error(request: Request, exc: Exception) -> Response:
        return as_error(request, exc)

    routes = [
        Route("/", guarded(page("index.html")), methods=["GET", "HEAD"]),
        Route("/video/{video_id}", guarded(page("video.html")), methods=["GET", "HEAD"]),
        Route("/api/search", guarded(api_search), methods=["GET", "HEAD"]),
        Route("/api/videos", guarded(api_videos), methods=["GET", "HEAD"]),
        Route("/api/videos/{video_id}", guarded(api_video), methods=["GET", "HEAD"]),
        Route("/api/videos/{video_id}/masks", guarded(api_masks), methods=["GET", "HEAD"]),
        Route("/api/videos/{video_id}/frame", guarded(api_frame), methods=["GET", "HEAD"]),
        Route("/media/{video_id}", guarded(media), methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if host in LOOPBACK_HOSTS:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"]))
    handlers = {HTTPException: on_http_error, Exception: on_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
