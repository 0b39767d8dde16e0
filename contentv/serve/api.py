"""The HTTP app: OpenAI's Videos API (create, retrieve, list, delete, download content), /health, /metrics.

Starlette (under gradio and FastAPI already). Errors are OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` with the status the official client maps: 400 invalid (the
command line's one line), 401 no or wrong key, 404 no such job or route, 413 body too large, 429 queue full.
Request bodies are capped before they are read (serve.max_body_bytes); keys are compared in constant time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from contentv.errors import ConfigError, first_line
from contentv.serve.admit import Admission
from contentv.serve.page import CSP, SCRIPT, page_html
from contentv.serve.pool import Pool, remove_files
from contentv.serve.store import QueueFull, Store, new_id

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
ERROR_TYPES |= {405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
VARIANTS = {"video": ("video", "video/mp4"), "thumbnail": ("thumbnail", "image/png")}
POLL_AFTER_MS = "250"
# Routes answered without a key: the health summary, and the page and its script (the key is typed into the page).
OPEN = frozenset(
    {"/health", "/", "/page.js"}
)  # the official client's poll() waits this long between retrievals (its default: 1000)


class TooLarge(Exception):
    pass


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def video_object(row: dict) -> dict:
    """A job as OpenAI's video object."""
    failed = row["status"] == "failed"
    return {
        "id": row["id"],
        "object": "video",
        "model": row["model"],
        "status": row["status"],
        "progress": int(row["progress"]),
        "created_at": int(row["created_at"]),
        "completed_at": int(row["completed_at"]) if row["completed_at"] else None,
        "expires_at": int(row["expires_at"]) if row["expires_at"] else None,
        "prompt": row["prompt"],
        "size": row["size"],
        "seconds": row["seconds"],
        "remixed_from_video_id": None,
        "error": {"code": row["error_code"], "message": row["error_message"]} if failed else None,
        "attempts": row["attempts"],
    }


def authorized(headers: Any, api_key: str) -> bool:
    """`Authorization: Bearer <api_key>` (compared in constant time)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class Guard:
    """ASGI middleware: body size cap (413, before the body is read) and Bearer auth (401)."""

    def __init__(self, app: Any, max_body: int, api_key: str | None, refused: Any = None):
        self.app, self.max_body, self.api_key, self.refused = app, max_body, api_key, refused

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN and not authorized(headers, self.api_key):
            message = "incorrect or missing API key: send Authorization: Bearer <key>"
            return await self._refuse(401, message, scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._refuse(413, self._too_large(), scope, receive, send)
        seen, started = 0, False

        async def capped() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise TooLarge(self._too_large())
            return message

        async def sending(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, capped, sending)
        except TooLarge:  # the app's error handler answered 413 already, unless it never got to
            if not started:
                await self._refuse(413, self._too_large(), scope, receive, send)

    def _too_large(self) -> str:
        return f"request body larger than serve.max_body_bytes ({self.max_body} bytes)"

    async def _refuse(self, status: int, message: str, scope: dict, receive: Any, send: Any) -> None:
        if self.refused is not None:
            self.refused.labels(str(status)).inc()
        await error(status, message)(scope, receive, send)


def owner_of(request: Request, api_key: str | None) -> str:
    """Who a job belongs to for the per-client limit: the key's hash, or without keys the client's address."""
    if api_key:
        token = request.headers.get("authorization", "").partition(" ")[2].strip()
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "unknown")


async def request_fields(request: Request) -> dict[str, Any]:
    """The body's fields: JSON, or a form (multipart, as the official client sends, or urlencoded)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ConfigError("body", "<not JSON>", "a JSON object") from None
        if not isinstance(body, dict):
            raise ConfigError("body", type(body).__name__, "a JSON object")
        return body
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=64)
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                raise ConfigError(key, getattr(value, "filename", "<file>"), "text (this server takes no files)")
            fields[key] = value
        return fields
    raise ConfigError("Content-Type", kind or None, "application/json or multipart/form-data")


class VideosAPI:
    """The route handlers, over the store, the admission check, the pool and the metrics."""

    def __init__(self, store: Store, admission: Admission, pool: Pool, metrics: Any, videos: Path):
        self.store, self.admission, self.pool, self.metrics, self.videos = store, admission, pool, metrics, videos
        self.serve = admission.serve

    async def create(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            fields = await request_fields(request)
            if "input_reference" in fields:
                raise ConfigError("input_reference", "<file>", "absent: this server generates video from text only")
            job_id = new_id()
            job = await run_in_threadpool(self.admission.admit, fields, job_id)  # the check: off the event loop
        except ConfigError as exc:
            self.metrics.refused.labels("400").inc()
            return error(400, str(exc), param=exc.option, code="invalid_value")
        row = {
            "id": job_id,
            "owner": owner_of(request, self.serve.api_key),
            "model": job.model,
            "model_key": job.model_key,
            "prompt": job.prompt,
            "size": job.size,
            "seconds": job.seconds,
            "run": json.dumps(dataclasses.asdict(job.run)),
        }
        try:
            row = await run_in_threadpool(self.store.add, row, self.serve.max_queue, self.serve.max_queue_per_key)
        except QueueFull as exc:
            self.metrics.refused.labels("429").inc()
            return error(429, str(exc), param=exc.limit, code="queue_full")
        self.pool.notify()
        self.metrics.admission.observe(time.perf_counter() - start)
        return JSONResponse(video_object(row))

    def _found(self, request: Request) -> dict | Response:
        job_id = request.path_params["video_id"]
        row = self.store.get(job_id)
        return row if row is not None else error(404, f"no video with id {job_id!r}", param="video_id")

    async def retrieve(self, request: Request) -> Response:
        row = self._found(request)
        if isinstance(row, Response):
            return row
        return JSONResponse(video_object(row), headers={"openai-poll-after-ms": POLL_AFTER_MS})

    async def listing(self, request: Request) -> Response:
        q = request.query_params
        order, limit = q.get("order", "desc"), q.get("limit", "20")
        if order not in ("asc", "desc"):
            return error(400, f"order={order!r} is not valid: one of: asc, desc", param="order")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            return error(400, f"limit={limit!r} is not valid: an integer in 1..100", param="limit")
        try:
            rows, more = self.store.page(q.get("after"), int(limit), order)
        except KeyError:
            return error(404, f"no video with id {q.get('after')!r} (after)", param="after")
        data = [video_object(r) for r in rows]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return JSONResponse({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more})

    async def delete(self, request: Request) -> Response:
        job_id = request.path_params["video_id"]
        row = self.store.delete(job_id)
        if row is None:
            return error(404, f"no video with id {job_id!r}", param="video_id")
        if row["status"] != "in_progress":  # a running job's files go when it finishes
            remove_files(self.videos, row)
        return JSONResponse({"id": row["id"], "object": "video.deleted", "deleted": True})

    async def content(self, request: Request) -> Response:
        row = self._found(request)
        if isinstance(row, Response):
            return row
        variant = request.query_params.get("variant", "video")
        if variant not in VARIANTS:
            return error(400, f"variant={variant!r} is not valid: one of: {', '.join(VARIANTS)}", param="variant")
        if row["status"] != "completed":
            return error(404, f"video {row['id']} is {row['status']}: no content yet", param="video_id")
        key, media = VARIANTS[variant]
        path = own_file(self.videos, row, key)
        if path is None:
            return error(404, f"video {row['id']} has no {variant}", param="variant")
        return FileResponse(path, media_type=media, filename=path.name)

    async def health(self, request: Request) -> Response:
        body: dict[str, Any] = {"status": "ok", "jobs": self.store.counts()}
        if not self.serve.api_key or authorized(request.headers, self.serve.api_key):
            body["workers"] = self.pool.status()
        return JSONResponse(body)

    async def page(self, request: Request) -> Response:
        models = list(self.admission.models)
        text = page_html(models, self.serve.max_prompt_chars, keyed=bool(self.serve.api_key))
        return HTMLResponse(text, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})

    async def script(self, request: Request) -> Response:
        headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
        return Response(SCRIPT, media_type="text/javascript", headers=headers)

    async def prometheus(self, request: Request) -> Response:
        data, kind = self.metrics.render()
        return Response(data, media_type=kind)


def own_file(videos: Path, row: dict, key: str) -> Path | None:
    """A job's recorded file: a name starting with its id, directly inside the videos folder, a regular file."""
    name = row.get(key)
    if not name or "/" in name or "\\" in name or not name.startswith(row["id"]):
        return None
    path = videos / name
    return path if path.is_file() and not path.is_symlink() else None


async def _route_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, TooLarge):
        return error(413, str(exc))
    status = getattr(exc, "status_code", 500)
    if status in (404, 405):
        return error(status, f"{request.method} {request.url.path}: no such route on this server")
    return error(500, first_line(exc, with_type=True))


def build_app(store: Store, admission: Admission, pool: Pool, metrics: Any, videos: Path) -> Any:
    """The ASGI app (wrapped in the size/auth guard)."""
    api = VideosAPI(store, admission, pool, metrics, videos)
    routes = [
        Route("/v1/videos", api.create, methods=["POST"]),
        Route("/v1/videos", api.listing, methods=["GET"]),
        Route("/v1/videos/{video_id}", api.retrieve, methods=["GET"]),
        Route("/v1/videos/{video_id}", api.delete, methods=["DELETE"]),
        Route("/v1/videos/{video_id}/content", api.content, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/", api.page, methods=["GET"]),
        Route("/page.js", api.script, methods=["GET"]),
        Route("/metrics", api.prometheus, methods=["GET"]),
    ]
    handlers = {404: _route_error, 405: _route_error, 500: _route_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return Guard(app, admission.serve.max_body_bytes, admission.serve.api_key, metrics.refused)
