"""The video API server (python demo.py mode=serve): OpenAI's Videos API over a durable queue and warm workers.

    python demo.py mode=serve model=tiny_contentv backend=cpu            # http://127.0.0.1:8000/v1
    python demo.py mode=serve serve.host=0.0.0.0 serve.api_key=$KEY serve.devices=[cuda:0,cuda:1]
    python demo.py mode=serve serve.workers=ray serve.ray_address=auto   # workers as Ray actors

Pieces: api.py (HTTP), admit.py (request -> checked RunConfig), store.py (SQLite queue), pool.py (dispatchers),
workers.py (local worker processes), ray_pool.py (Ray actors), metrics.py, sizes.py. The entry point passes the
composed config, the presets and the backend factory (contentv never imports `backends` or Hydra).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contentv.config import Presets, RunConfig

log = logging.getLogger(__name__)
DEFAULT_DIR = "outputs/serve"
LOCK_FILE = ".serve.lock"  # one server per output.dir (contentv.folder_lock); a page there has a queue of its own


def check_available() -> None:
    """The serve extra is installed (one line naming what is missing otherwise)."""
    import importlib.util

    from contentv.errors import ConfigError

    missing = [m for m in ("starlette", "uvicorn", "multipart", "prometheus_client") if not importlib.util.find_spec(m)]
    if missing:
        raise ConfigError("mode", "serve", f"the serve extra installed: pip install '.[serve]' (missing: {missing})")


class _Budgeted:
    """The validation backend: the worker device's backend, planning with the memory it had free at start (the
    workers' loaded pipelines are theirs, not a reason to refuse)."""

    def __init__(self, backend: Any):
        self._backend, self._free = backend, backend.free_memory()

    def free_memory(self) -> int | None:
        return self._free

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class Server:
    """A running server: `url`, `folder`, `stop()`. `start` returns it; `main` blocks on it."""

    def __init__(self, cfg: RunConfig, presets: Presets, build_backend: Callable):
        from contentv.folder_lock import lock_queue
        from contentv.validation import check_settings, check_writable_dir

        check_settings(cfg)
        self.folder = Path(cfg.output.dir or DEFAULT_DIR).absolute()
        check_writable_dir("output.dir", self.folder)
        # Before the queue is opened: a second server here would re-queue this one's running jobs and claim jobs too.
        self.lock = lock_queue(self.folder, LOCK_FILE, "video API server", "jobs.sqlite3")
        try:
            self._start(cfg, presets, build_backend)
        except BaseException:
            self.lock.release()
            raise

    def _start(self, cfg: RunConfig, presets: Presets, build_backend: Callable) -> None:
        from contentv.serve.admit import Admission
        from contentv.serve.api import build_app
        from contentv.serve.metrics import Metrics
        from contentv.serve.pool import Pool
        from contentv.serve.store import Store

        serve = cfg.serve
        self.videos = self.folder / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.folder / "jobs.sqlite3")
        recovered = self.store.recover(self.videos)
        for outcome, ids in recovered.items():
            if ids:
                log.warning("after a restart, %d interrupted job(s) %s: %s", len(ids), outcome, ", ".join(ids))
        self.ray = serve.workers == "ray"
        workers, check_backend = self._workers(cfg, presets, build_backend)
        self.admission = Admission(cfg, presets, self.videos, check_backend)
        self.pool: Pool = None  # type: ignore[assignment]
        self.metrics = Metrics(self.store.counts, lambda: self.pool.status())
        ttl = serve.job_ttl_hours * 3600
        self.pool = Pool(self.store, workers, self.videos, ttl, serve.max_wait_s, self.metrics)
        self.app = build_app(self.store, self.admission, self.pool, self.metrics, self.videos)
        self.sock = _bind(serve.host, serve.port)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self._stop = threading.Event()
        self.pool.start()
        self._janitor = threading.Thread(target=self._expire, args=(ttl,), name="expiry", daemon=True)
        self._janitor.start()
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        self._http = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._http.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()

    @staticmethod
    def _workers(cfg: RunConfig, presets: Presets, build_backend: Callable) -> tuple[list, Any]:
        from contentv.serve.workers import LocalWorker, devices

        if cfg.serve.workers == "ray":
            from contentv.serve.ray_pool import ray_workers

            return ray_workers(cfg, presets, build_backend), None
        backends = devices(cfg.serve.devices, cfg.backend, build_backend)
        workers = [LocalWorker(f"worker{i}", b, build_backend, dict(presets.memories)) for i, b in enumerate(backends)]
        return workers, _Budgeted(build_backend(backends[0]))

    def _expire(self, ttl_s: float) -> None:
        from contentv.serve.pool import remove_files

        while ttl_s and not self._stop.wait(min(60.0, max(0.2, ttl_s / 4))):
            for row in self.store.expire():
                remove_files(self.videos, row)

    def stop(self) -> None:
        """Stop taking requests, stop the workers (running jobs go back to the queue), close."""
        self._stop.set()
        self._http.should_exit = True
        self._thread.join(10)
        self.pool.stop()
        self.sock.close()
        if self.ray:
            import ray

            ray.shutdown()
        self.lock.release()  # nothing of this server runs now: another may take the folder


def _bind(host: str, port: int) -> socket.socket:
    from contentv.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError("serve.port", port, f"a port free on {host} ({exc.strerror})") from exc
    sock.listen(128)
    return sock


def start(cfg: RunConfig, presets: Presets, build_backend: Callable) -> Server:
    """Start the server (workers, HTTP) and return it; `Server.stop()` ends it."""
    return Server(cfg, presets, build_backend)


def main(cfg: RunConfig, presets: Presets, build_backend: Callable) -> None:
    """mode=serve: run the server until SIGINT or SIGTERM, then stop the workers cleanly."""
    check_available()
    done = threading.Event()
    old = {s: signal.signal(s, lambda *_: done.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    server = start(cfg, presets, build_backend)
    for s in old:  # again: starting Ray installs handlers of its own
        signal.signal(s, lambda *_: done.set())
    names = ", ".join(w["device"] for w in server.pool.status())
    print(f"serving the Videos API on {server.url}/v1 (workers: {names}; jobs in {server.folder})", flush=True)
    try:
        done.wait()
    finally:
        print("stopping: running jobs go back to the queue", flush=True)
        server.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
