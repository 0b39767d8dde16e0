"""The durable job queue: one SQLite file (WAL) in the server's output folder.

A job is committed the moment it is accepted, so a killed server (SIGKILL, power loss with synchronous=FULL)
loses none. Claiming is one `BEGIN IMMEDIATE` transaction (one writer at a time), so no two workers take the
same job; the claim records who took it and when. After a restart `recover` settles the jobs that were running:

- its video and sidecar were published (the kill came after the atomic writer finished): completed;
- otherwise re-queued (attempts + 1), since nothing of it was published; a job interrupted `MAX_ATTEMPTS` times is
  failed with the reason instead (a job that keeps taking the server down must not loop).

Video files are named after the job id (`<id>.mp4`, `<id>.json`, `<id>.png`), so a job's files are found
without trusting anything a client sent. Stdlib only.

The Gradio page (contentv.jobqueue) keeps its jobs in a Store of its own (`<output dir>/ui-jobs.sqlite3`): the same
schema and the same recovery, with its own admission rule (`add_checked`), its own turn (`take`), the browser session
in `session`, and its own way to find a published video (`recover(..., find=)`: its files keep the page's names).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order (list order, queue order)
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,                    -- who asked: a hash of the API key, or the client address
    status TEXT NOT NULL,                   -- queued | in_progress | completed | failed
    progress INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL,
    model_key TEXT NOT NULL,                -- what a worker must have loaded to run it without reloading
    prompt TEXT NOT NULL,
    size TEXT NOT NULL,
    seconds TEXT NOT NULL,
    run TEXT NOT NULL,                      -- the validated RunConfig as JSON
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    expires_at REAL,
    worker TEXT,                            -- the worker that claimed it
    attempts INTEGER NOT NULL DEFAULT 0,    -- claims so far (a restart re-queues an interrupted job)
    error_code TEXT,
    error_message TEXT,
    video TEXT,
    sidecar TEXT,
    thumbnail TEXT,
    stats TEXT,                             -- per-stage seconds and peak memory (JSON)
    deleted INTEGER NOT NULL DEFAULT 0,     -- deleted while running: files go when it finishes
    session TEXT                            -- the Gradio page's browser session (null for API jobs)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
# Columns added after the first release: (name, definition); a database made before them gains them when opened.
MIGRATIONS = (("session", "TEXT"),)
ACTIVE = ("queued", "in_progress")
MAX_ATTEMPTS = 2


class QueueFull(Exception):
    """The queue (in total or for this client) is at its limit; `limit` names which."""

    def __init__(self, limit: str, value: int):
        self.limit, self.value = limit, value
        super().__init__(f"the queue is full ({limit}={value} jobs waiting or running): try again later")


def new_id() -> str:
    return "video_" + secrets.token_hex(12)


class Store:
    """Jobs in `path` (SQLite, WAL). Thread-safe: one connection per thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._db()
        db.executescript(SCHEMA)
        with self._tx():
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in MIGRATIONS:
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a job accepted is on disk, whatever happens next
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind: Any, *_: Any) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _tx(self) -> Store._Tx:
        return Store._Tx(self._db())

    # ------------------------------------------------------------ clients

    def add(self, job: dict, max_total: int, max_owner: int) -> dict:
        """Commit a new queued job (fields of SCHEMA; id and times filled in) unless a limit is reached."""

        def limits(active: list[dict]) -> None:
            if len(active) >= max_total:
                raise QueueFull("serve.max_queue", max_total)
            if sum(r["owner"] == job["owner"] for r in active) >= max_owner:
                raise QueueFull("serve.max_queue_per_key", max_owner)

        return self.add_checked(job, limits)

    def add_checked(self, job: dict, check: Callable[[list[dict]], None]) -> dict:
        """Commit a new queued job after `check(jobs waiting or running)` passed; it raises to refuse (nothing is
        added). One transaction: two callers can't both take the last place."""
        with self._tx() as db:
            check(self._active(db))
            row = {"status": "queued", "created_at": time.time(), **job}
            cols = ", ".join(row)
            db.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        return self.get(row["id"])

    @staticmethod
    def _active(db: sqlite3.Connection) -> list[dict]:
        # A job deleted while running still runs: it still counts.
        rows = db.execute("SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY seq", ACTIVE)
        return [dict(r) for r in rows.fetchall()]

    def active(self) -> list[dict]:
        """The jobs waiting or running, in arrival order."""
        return self._active(self._db())

    def get(self, job_id: str) -> dict | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ? AND deleted = 0", (job_id,)).fetchone()
        return dict(row) if row else None

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[dict], bool]:
        """Jobs in arrival order (`asc`) or newest first (`desc`), starting after job `after`; and whether more."""
        db = self._db()
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, args = "deleted = 0", []
        if after:
            seq = db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
            if seq is None:
                raise KeyError(after)
            where, args = f"{where} AND seq {op} ?", [seq[0]]
        rows = db.execute(
            f"SELECT * FROM jobs WHERE {where} ORDER BY seq {direction} LIMIT ?", (*args, limit + 1)
        ).fetchall()
        return [dict(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, job_id: str) -> dict | None:
        """Remove a job; returns its row (its files are the caller's to remove). A running job is marked deleted
        and removed when its worker finishes (`finish`/`fail` return it then)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND deleted = 0", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "in_progress":
                db.execute("UPDATE jobs SET deleted = 1 WHERE id = ?", (job_id,))
            else:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return dict(row)

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT status, COUNT(*) FROM jobs WHERE deleted = 0 GROUP BY status").fetchall()
        return {"queued": 0, "in_progress": 0, "completed": 0, "failed": 0, **{r[0]: r[1] for r in rows}}

    # ------------------------------------------------------------ workers

    def claim(self, worker: str, loaded: str | None, max_wait_s: float) -> dict | None:
        """Take the next job for `worker`: the oldest one for the model it has `loaded`, unless the oldest job of
        all has waited longer than `max_wait_s` (then that one: no job waits for ever behind another model's)."""
        now = time.time()
        with self._tx() as db:
            oldest = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if oldest is None:
                return None
            row = oldest
            if loaded is not None and oldest["model_key"] != loaded and now - oldest["created_at"] <= max_wait_s:
                same = db.execute(
                    "SELECT * FROM jobs WHERE status = 'queued' AND model_key = ? ORDER BY seq LIMIT 1", (loaded,)
                ).fetchone()
                row = same or oldest
            db.execute(
                "UPDATE jobs SET status = 'in_progress', worker = ?, started_at = ?, attempts = attempts + 1, "
                "progress = 0 WHERE id = ?",
                (worker, now, row["id"]),
            )
        return {**dict(row), "status": "in_progress", "worker": worker, "attempts": row["attempts"] + 1}

    def take(self, job_id: str, worker: str) -> dict | None:
        """Claim this queued job for `worker` (the page's own turn rule chose it); None if it is no longer queued."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND status = 'queued'", (job_id,)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'in_progress', worker = ?, started_at = ?, attempts = attempts + 1, "
                "progress = 0 WHERE id = ?",
                (worker, time.time(), job_id),
            )
        return {**dict(row), "status": "in_progress", "worker": worker, "attempts": row["attempts"] + 1}

    def set_progress(self, job_id: str, percent: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'", (percent, job_id))

    def finish(self, job_id: str, files: dict, stats: dict, ttl_s: float) -> dict:
        """Mark a job completed with its files; returns the row (deleted = 1: the client deleted it meanwhile)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, expires_at = ?, video = ?, "
                "sidecar = ?, thumbnail = ?, stats = ? WHERE id = ?",
                (now, now + ttl_s if ttl_s else None, files.get("video"), files.get("sidecar"),
                 files.get("thumbnail"), json.dumps(stats), job_id),
            )  # fmt: skip
            return self._settle_deleted(db, job_id)

    def fail(self, job_id: str, code: str, message: str, ttl_s: float) -> dict:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, expires_at = ?, error_code = ?, "
                "error_message = ? WHERE id = ?",
                (now, now + ttl_s if ttl_s else None, code, message, job_id),
            )
            return self._settle_deleted(db, job_id)

    def requeue(self, job_id: str) -> None:
        """Put a running job back in the queue (the server stopped it cleanly: the claim doesn't count)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'queued', worker = NULL, progress = 0, attempts = attempts - 1 "
                "WHERE id = ? AND status = 'in_progress'",
                (job_id,),
            )
            db.execute("DELETE FROM jobs WHERE id = ? AND deleted = 1", (job_id,))

    @staticmethod
    def _settle_deleted(db: sqlite3.Connection, job_id: str) -> dict:
        row = dict(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        if row["deleted"]:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return row

    # ------------------------------------------------------------ the server's housekeeping

    def recover(self, videos: Path, find: Callable[[str], dict | None] | None = None) -> dict[str, list[str]]:
        """Settle the jobs a killed server left running (see the module docstring); returns ids by outcome.

        `find(job_id)`: the files a job published ({"video", "sidecar", "thumbnail"}: names under `videos`), or None;
        by default `<id>.mp4` with its `<id>.json` (a video linked without its sidecar is removed: not published)."""
        out: dict[str, list[str]] = {"completed": [], "requeued": [], "failed": []}
        with self._tx() as db:
            for row in db.execute("SELECT * FROM jobs WHERE status = 'in_progress'").fetchall():
                job_id = row["id"]
                files = (find or (lambda i: _published(videos, i)))(job_id)
                if files is not None:
                    db.execute(
                        "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, video = ?, "
                        "sidecar = ?, thumbnail = ? WHERE id = ?",
                        (time.time(), files.get("video"), files.get("sidecar"), files.get("thumbnail"), job_id),
                    )
                    out["completed"].append(job_id)
                    continue
                if row["attempts"] >= MAX_ATTEMPTS:
                    message = f"interrupted {row['attempts']} times by a server restart while running; not retried"
                    db.execute(
                        "UPDATE jobs SET status = 'failed', completed_at = ?, error_code = 'interrupted', "
                        "error_message = ? WHERE id = ?",
                        (time.time(), message, job_id),
                    )
                    out["failed"].append(job_id)
                else:
                    db.execute("UPDATE jobs SET status = 'queued', worker = NULL, progress = 0 WHERE id = ?", (job_id,))
                    out["requeued"].append(job_id)
            db.execute("DELETE FROM jobs WHERE deleted = 1 AND status != 'in_progress'")
        return out

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def expire(self, now: float | None = None) -> list[dict]:
        """Remove finished jobs past their expires_at; returns their rows (the caller removes the files)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE status IN ('completed', 'failed') AND expires_at IS NOT NULL "
                "AND expires_at <= ?",
                (now,),
            ).fetchall()
            db.executemany("DELETE FROM jobs WHERE id = ?", [(r["id"],) for r in rows])
        return [dict(r) for r in rows]


def _published(videos: Path, job_id: str) -> dict | None:
    """The service's rule: `<id>.mp4` and its `<id>.json` (and `<id>.png`) were published; a video linked without its
    sidecar is removed (the kill came between the two links: not published)."""
    video, sidecar, thumb = videos / f"{job_id}.mp4", videos / f"{job_id}.json", videos / f"{job_id}.png"
    if video.is_file() and sidecar.is_file():
        return {"video": video.name, "sidecar": sidecar.name, "thumbnail": thumb.name if thumb.is_file() else None}
    video.unlink(missing_ok=True)
    return None
