"""What the web page's server exposes: videos and their sidecars, and the HTTP routes the page needs.

`ServedFiles` links videos (and sidecars) from the output folder into a private folder: the only files the page
hands to gradio. `RouteGuard` is an ASGI middleware in front of gradio's app: it answers only the routes the
page and API clients use, lets the file routes serve only regular .mp4/.json files inside the served folders
(whatever the path spelling: `..`, percent-encoding, symlinks), and caps request bodies. Gradio's own rules
(allowed_paths, its cache, the working directory, the temp dir) are a second line behind it. No gradio import.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from contentv import untrusted

VIDEO = ".mp4"
SIDECAR = ".json"
GALLERY_LIMIT = 24
# A sidecar is a few KB; a gallery caption never needs more.
MAX_SIDECAR_BYTES = 4 * 2**20
# A form with a 20,000-character prompt is ~100 KB of JSON; anything far larger is refused unread.
MAX_BODY_BYTES = 1 << 20

# Routes the page (gradio's front end) and gradio_client call; everything else gets 404. Not allowed, among
# others: /upload (the page takes no files), /proxy=, /file/ (old spelling), /deep_link, /process_recording,
# /vibe-*, /run-history, /monitoring, /stream, /custom_component, /login.
PUBLIC_EXACT = frozenset(
    {"/", "/config", "/config/", "/theme.css", "/favicon.ico", "/manifest.json", "/robots.txt", "/pwa_icon"}
)
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon/")
API = "/gradio_api/"
API_EXACT = frozenset(
    {"info", "info/", "openapi.json", "queue/join", "queue/data", "cancel", "startup-events", "theme.css"}
    | {"app_id", "app_id/", "reset", "reset/", "login_check", "login_check/", "user", "user/"}
)
API_PREFIXES = ("heartbeat/", "run/", "api/", "call/")
FILE_ROUTE = API + "file="


def is_regular_file(path: str | os.PathLike) -> bool:
    """A regular file itself, not a symlink to one (lstat)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ private folders

# The page's private folders in TMPDIR (served links, gradio's copies): removed on close, else at exit.
_PRIVATE: set[str] = set()
# SIGTERM's exit status (128 + the signal's number, as shells report it).
SIGTERM_STATUS = 128 + signal.SIGTERM


def private_dir(prefix: str) -> Path:
    """A new private folder in TMPDIR, removed at interpreter exit if `remove_private` did not remove it first."""
    path = os.path.realpath(tempfile.mkdtemp(prefix=prefix))
    _PRIVATE.add(path)
    return Path(path)


def remove_private(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _PRIVATE.discard(os.path.realpath(path))


@atexit.register
def _remove_all_private() -> None:
    for path in list(_PRIVATE):
        remove_private(path)


def private_gradio_cache() -> tuple[str, dict[str, str | None]]:
    """A fresh folder for gradio's copies of served files (GRADIO_TEMP_DIR, read as components are made), so
    the file route never reaches the machine-wide /tmp/gradio of other apps; returns it and the old value."""
    cache = str(private_dir("contentv-gradio-"))
    old = {"GRADIO_TEMP_DIR": os.environ.get("GRADIO_TEMP_DIR")}
    os.environ["GRADIO_TEMP_DIR"] = cache
    return cache, old


def restore_env(old: dict[str, str | None]) -> None:
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Inside the block, SIGTERM raises SystemExit(143) in the main thread, so `finally` blocks and atexit run
    (by default SIGTERM ends the process at once and leaves the private folders behind). Elsewhere: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(SIGTERM_STATUS)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ServedFiles:
    """Videos under `root` (and their sidecars) linked into a private folder, the only files the page serves.

    A video is a regular `*.mp4` file (not a symlink) under `root`, outside hidden folders (`.hydra`); its
    sidecar is the `.json` next to it. Logs, Hydra configs and anything a symlink points to are never linked.
    """

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.dir = private_dir("contentv-page-")

    def videos(self, limit: int = GALLERY_LIMIT) -> list[Path]:
        """The newest videos under root, newest first (symlinks and hidden files or folders skipped)."""
        found = []
        for folder, dirs, files in os.walk(self.root):  # never follows symlinked folders
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                path = Path(folder, name)
                if name.endswith(VIDEO) and not name.startswith(".") and is_regular_file(path):
                    found.append(path)
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return found[:limit]

    def check(self, path: Path) -> Path:
        """The file's real path if it is a video, or a video's sidecar, under root (ValueError otherwise)."""
        path = Path(path).absolute()
        real = path.resolve()
        ok = (
            path.suffix in (VIDEO, SIDECAR)
            and not path.name.startswith(".")
            and is_regular_file(path)  # a symlink is refused, wherever it points
            and _inside(str(real), str(self.root.resolve()))
            and not any(part.startswith(".") for part in real.relative_to(self.root.resolve()).parts)
            and (path.suffix == VIDEO or is_regular_file(path.with_suffix(VIDEO)))
        )
        if not ok:
            raise ValueError(f"not a video or sidecar under {self.root}: {path.name}")
        return real

    def serve(self, path: Path) -> str:
        """A link to a video or sidecar under root, in the served folder (ValueError for anything else)."""
        real = self.check(path)
        # One subfolder per source folder keeps same-named files from different runs apart.
        target = self.dir / hashlib.sha256(str(real.parent).encode()).hexdigest()[:12] / real.name
        if target.exists() and os.path.samefile(target, real):
            return str(target)
        target.parent.mkdir(exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.unlink(missing_ok=True)
        try:
            os.link(real, partial, follow_symlinks=False)
        except OSError:  # another file system: a copy, read without following a symlink swapped in meanwhile
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if not is_regular_file(partial):  # replaced by a symlink between the check and the link
            partial.unlink(missing_ok=True)
            raise ValueError(f"not a video or sidecar under {self.root}: {real.name}")
        os.replace(partial, target)
        return str(target)

    def gallery(self, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
        """(video path, caption) of the newest videos under root, newest first (caption from the sidecar)."""
        out = []
        for video in self.videos(limit):
            caption = video.stem
            sidecar = video.with_suffix(SIDECAR)
            if is_regular_file(sidecar):
                try:  # anyone may drop a file in the output folder: capped in size and nesting
                    record = untrusted.load_file(sidecar, MAX_SIDECAR_BYTES)
                    caption = f"{str(record.get('prompt', ''))[:80]} (seed {record.get('seed')})"
                except (OSError, ValueError, AttributeError):
                    pass
            out.append((str(video), caption))
        return out

    def served_gallery(self, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
        """gallery(), each video linked into the served folder (a video that vanished meanwhile is left out)."""
        out = []
        for video, caption in self.gallery(limit):
            try:
                out.append((self.serve(Path(video)), caption))
            except (OSError, ValueError):
                continue
        return out

    def close(self) -> None:
        """Remove the served links (the videos themselves stay)."""
        remove_private(self.dir)


def servable(path: str, roots: Sequence[str | os.PathLike]) -> bool:
    """May a file route answer with this path: a regular .mp4 or .json file whose real path is in one of roots."""
    try:
        real = os.path.realpath(path)
        return (
            os.path.splitext(real)[1] in (VIDEO, SIDECAR)
            and os.path.isfile(real)
            and any(_inside(real, os.path.realpath(r)) for r in roots)
        )
    except (OSError, ValueError):  # a NUL byte, a name too long
        return False


def route_allowed(path: str, roots: Sequence[str | os.PathLike]) -> bool:
    """Whether RouteGuard lets a request for this (percent-decoded) path through to gradio."""
    if path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES):
        return True
    if path.startswith(FILE_ROUTE):
        return servable(path[len(FILE_ROUTE) :], roots)
    if path.startswith(API):
        rest = path[len(API) :]
        return rest in API_EXACT or rest.startswith(API_PREFIXES)
    return False


class RouteGuard:
    """ASGI middleware: 404 for routes the page doesn't use and for files outside `roots()`; 413 for bodies
    over `max_body` bytes. `roots` is called per request (the folders exist only once the server runs)."""

    def __init__(self, app: Any, roots: Callable[[], Sequence[str]], max_body: int = MAX_BODY_BYTES):
        self.app, self.roots, self.max_body = app, roots, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        # scope["path"] is percent-decoded once, exactly as the router matches it.
        if not route_allowed(scope["path"], self.roots()):
            return await _respond(send, scope, 404, b"Not Found")
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await _respond(send, scope, 413, b"Request body too large")
            body, more = bytearray(), True
            while more:  # read it all here (small), so a body without a length is capped too
                message = await receive()
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    return await _respond(send, scope, 413, b"Request body too large")
            sent = False

            async def replay() -> dict:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


async def _respond(send: Callable, scope: dict, status: int, text: bytes) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(text)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text})
