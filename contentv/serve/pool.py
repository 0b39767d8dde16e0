"""The worker pool: one dispatcher thread per worker takes jobs from the store and runs them on its worker.

The worker is a local process (workers.LocalWorker) or a Ray actor (ray_pool.RayWorker): anything with `name`,
`start()`, `run(payload, on_progress, cancelled) -> (kind, value)`, `stop()`, `describe()`, `pid` and `restarts`. The
queue, the job states and the claim rule (prefer the loaded model, bounded wait for the others) are the same
for both.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from contentv.serve.store import Store

log = logging.getLogger(__name__)


def remove_files(videos: Path, row: dict) -> None:
    """A job's files (its own names only: `<id>.*` as recorded, inside the videos folder)."""
    for key in ("video", "sidecar", "thumbnail"):
        name = row.get(key)
        if name and "/" not in name and name.startswith(row["id"]):
            (videos / name).unlink(missing_ok=True)


class Dispatcher(threading.Thread):
    """Claims jobs for one worker and records their outcome."""

    def __init__(self, pool: Pool, worker: Any):
        super().__init__(name=f"dispatch-{worker.name}", daemon=True)
        self.pool, self.worker = pool, worker
        self.loaded: str | None = None  # model key of the pipeline the worker holds
        self.job: str | None = None
        self.done = 0

    def run(self) -> None:
        self.worker.start()
        store = self.pool.store
        while not self.pool.stopping.is_set():
            job = store.claim(self.worker.name, self.loaded, self.pool.max_wait_s)
            if job is None:
                self.pool.wake.wait(0.25)
                continue
            self.job = job["id"]
            try:
                self._run(store, job)
            except Exception:  # noqa: BLE001 - a store error must not stop the dispatcher
                log.exception("dispatcher %s: job %s", self.worker.name, job["id"])
            self.job = None

    def _run(self, store: Store, job: dict) -> None:
        import json

        last = [-1]

        def progress(pct: int) -> None:
            if pct != last[0]:
                last[0] = pct
                store.set_progress(job["id"], pct)

        started = time.time()

        def cancelled() -> bool:  # deleted by its client meanwhile
            return store.get(job["id"]) is None

        kind, value = self.worker.run({"id": job["id"], "run": json.loads(job["run"])}, progress, cancelled)
        if kind == "stopped":  # the server is shutting down: the job goes back to the queue
            store.requeue(job["id"])
            return
        metrics = self.pool.metrics
        if kind == "done":
            self.loaded = job["model_key"]
            row = store.finish(job["id"], value, value["stats"], self.pool.ttl_s)
            if metrics is not None:
                metrics.job_done(self.worker.name, job["model"], value["stats"], time.time() - started)
        else:
            if value.get("code") == "worker_died":
                self.loaded = None
            row = store.fail(job["id"], value["code"], value["message"], self.pool.ttl_s)
            if metrics is not None:
                metrics.job_failed(value["code"])
        self.done += 1
        if row.get("deleted"):
            remove_files(self.pool.videos, {**row, **(value if kind == "done" else {})})


class Pool:
    """Dispatchers over `workers`; `start` launches them, `stop` stops the workers and re-queues running jobs."""

    def __init__(self, store: Store, workers: list, videos: Path, ttl_s: float, max_wait_s: float, metrics: Any):
        self.store, self.videos, self.ttl_s, self.max_wait_s, self.metrics = store, videos, ttl_s, max_wait_s, metrics
        self.stopping = threading.Event()
        self.wake = threading.Event()  # set when a job arrives: idle dispatchers claim at once
        self.dispatchers = [Dispatcher(self, w) for w in workers]

    def start(self) -> None:
        for d in self.dispatchers:
            d.start()

    def notify(self) -> None:
        self.wake.set()
        self.wake.clear()

    def status(self) -> list[dict]:
        return [
            {
                "name": d.worker.name,
                "device": d.worker.describe(),
                "pid": d.worker.pid,
                "job": d.job,
                "loaded": d.loaded,
                "jobs_done": d.done,
                "restarts": d.worker.restarts,
            }
            for d in self.dispatchers
        ]

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        for d in self.dispatchers:
            d.worker.stopping = True
            d.worker.stop()
        for d in self.dispatchers:
            d.join(10)
