"""The web page's generation queue: durable, one job at a time in arrival order, a share per client, cancel.

The queue of record is a `contentv.serve.store.Store` (the video service's SQLite queue, WAL) in the page's output
folder, `<output dir>/ui-jobs.sqlite3` (a name of its own, so a service on the same folder never takes page jobs). A
job is committed the moment it is admitted, with the resolved run's config, so a killed page loses none: the next
page started on the same folder finds every job, settles the one that was running as the service does
(`Store.recover`: published -> completed, else re-queued, failed after `MAX_ATTEMPTS` interruptions) and runs the
waiting ones, in order, exactly once.

Who runs a job: the thread that admitted it (the page's /generate call, which shows its steps) when its turn comes;
a job no thread waits for (found after a restart, or dropped by its caller) is taken by the Studio's runner thread.
Turn rule: nothing runs in this process, and it is the oldest queued job that someone will run now.

A job is counted from the moment it is admitted (before it waits), so a client can't hold more than its share of
the queue however it calls the server. What a "client" is: the browser session (gradio's session hash) and, for
remote clients, the network address. A raw API client chooses its own session hash, so the session limit holds only
the page's own clients; the address limit holds a remote client however many sessions it makes; loopback clients
(every local tab and tool share one address) are held per session and by the total only.
"""

from __future__ import annotations

import dataclasses
import html
import ipaddress
import json
import os
import threading
import urllib.parse
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contentv.serve.store import Store, new_id

JOBS_FILE = "ui-jobs.sqlite3"
LOCK_FILE = ".ui-jobs.lock"  # one page per queue (contentv.folder_lock); a server on the folder has a queue of its own
WORKER = "page"  # the store's `worker` of a page job
CANCELLED_BEFORE = "cancelled before it started: no video written"
TABLE_ROWS = 20  # the page's table: the newest jobs


@dataclass(eq=False)
class Job:
    """A validated request: the exact config to run, whose page asked, and its cancel switch."""

    cfg: Any  # the RunConfig that runs (the resolved run's: memory=auto's choice, sampling defaults filled in)
    run: Any = None  # the ResolvedRun (contentv.resolve): checked and decided once, trusted when the turn comes
    session: str | None = None  # the browser session (gradio's session hash; chosen by the client)
    client: str | None = None  # the network address the request came from
    cancelled: threading.Event = field(default_factory=threading.Event)
    plan: str | None = None  # the planner's table (memory=auto), shown before the run starts
    finished: threading.Event = field(default_factory=threading.Event)
    outcome: Any = None  # the studio's Outcome once finished
    id: str | None = None  # the store's job id (video_...), given when admitted


class Refused(Exception):
    """A job the limits turn away; the message is the page's one line."""


def is_loopback(address: str) -> bool:
    """A loopback address, or no IP address at all (a test client's name, a Unix socket)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True


def refusal_of(active: list[dict], session: str | None, client: str | None, max_queue: int, limit: int) -> str | None:
    """Why a new job from this session and address can't be admitted (one line), or None, given the store's jobs
    waiting or running. Per session and per remote address: at most `limit` waiting or running; in all: at most
    `max_queue` waiting besides the running one."""
    if session is not None and sum(r["session"] == session for r in active) >= limit:
        return f"error: this page already has {limit} generations waiting or running (ui.max_queue_per_client)"
    if client is not None and not is_loopback(client) and sum(r["owner"] == client for r in active) >= limit:
        return f"error: {client} already has {limit} generations waiting or running (ui.max_queue_per_client)"
    if sum(r["status"] == "queued" for r in active) >= max_queue:
        return f"error: the queue is full ({max_queue} generations waiting, ui.max_queue); try again later"
    return None


def row_of(job: Job) -> dict:
    """The store's row for a page job: who asked, what the table shows, and the config that runs (JSON)."""
    cfg = job.cfg
    row = {"id": job.id, "owner": job.client or "", "session": job.session}
    s = cfg.sampling
    seconds = f"{s.num_frames / s.fps:g}" if isinstance(s.fps, int) and s.fps > 0 else ""
    return {
        **row,
        "model": cfg.model.name,
        "model_key": f"{cfg.model.name}/{cfg.memory.name}",
        "prompt": s.prompt or "",
        "size": f"{s.width}x{s.height}",
        "seconds": seconds,
        "run": json.dumps(dataclasses.asdict(cfg)),
    }


class JobQueue:
    """Admitted jobs in a Store, with per-session, per-address and total limits, run one at a time in this process."""

    def __init__(self, store: Store, max_queue: int, max_per_client: int):
        self.store = store
        self.max_queue, self.max_per_client = max_queue, max_per_client
        self._turn = threading.Condition()
        self._held: weakref.WeakValueDictionary[str, Job] = weakref.WeakValueDictionary()  # admitted, not yet waiting
        self._waiting: dict[str, Job] = {}  # their caller waits for their turn (wait_turn)
        self._running: Job | None = None
        self._stopped = False

    # ------------------------------------------------------------ limits

    def pending(self, session: str | None) -> int:
        """Jobs of this session waiting or running."""
        return sum(r["session"] == session for r in self.store.active())

    def refusal(self, session: str | None = None, client: str | None = None) -> str | None:
        """Why a new job from this session and address can't be admitted now (one line), or None."""
        return refusal_of(self.store.active(), session, client, self.max_queue, self.max_per_client)

    def admit(self, job: Job) -> str | None:
        """Commit the job to the store (None), or the refusal line if its session, address or the queue is full."""

        def check(active: list[dict]) -> None:
            line = refusal_of(active, job.session, job.client, self.max_queue, self.max_per_client)
            if line:
                raise Refused(line)

        job.id = job.id or new_id()
        try:
            self.store.add_checked(row_of(job), check)
        except Refused as exc:
            return str(exc)
        with self._turn:
            self._held[job.id] = job
            self._turn.notify_all()
        return None

    # ------------------------------------------------------------ turns

    def busy(self) -> bool:
        """A job is running."""
        return self._running is not None

    def _next(self, queued: list[dict]) -> str | None:
        """The job whose turn it is: the oldest queued one that someone runs now (its caller waits, or no caller
        holds it: the runner's); None while one runs or after stop()."""
        if self._running is not None or self._stopped:
            return None
        for row in queued:
            if row["id"] in self._waiting or row["id"] not in self._held:
                return row["id"]
        return None

    def _queued(self) -> list[dict]:
        return [r for r in self.store.active() if r["status"] == "queued"]

    def wait_turn(self, job: Job, waiting: Callable[[int], None] | None = None) -> bool:
        """Block until it is the job's turn (True: it is claimed and now runs), or until it is cancelled or no longer
        queued (False). waiting(n) is called whenever the number of jobs ahead of it changes."""
        reported = None
        with self._turn:
            self._held.pop(job.id, None)
            self._waiting[job.id] = job
        try:
            while True:
                with self._turn:
                    queued = self._queued()
                    ids = [r["id"] for r in queued]
                    if job.cancelled.is_set() or job.id not in ids:
                        return False
                    if self._next(queued) == job.id and self.store.take(job.id, WORKER) is not None:
                        self._running = job
                        return True
                    before = ids[: ids.index(job.id)]
                    ahead = (self._running is not None) + sum(i in self._waiting or i not in self._held for i in before)
                    if ahead == reported:
                        self._turn.wait(1.0)  # a caller dropping its job notifies no one: look again now and then
                        continue
                reported = ahead
                if waiting is not None:
                    waiting(ahead)
        finally:
            with self._turn:
                self._waiting.pop(job.id, None)
                self._turn.notify_all()

    def next_orphan(self, timeout: float) -> tuple[Job, dict] | None:
        """For the runner: claim the job whose turn it is if no caller waits for it (found after a restart, or
        dropped by its caller) and return it with its row; else wait up to `timeout` and return None."""
        with self._turn:
            nxt = self._next(self._queued())
            if nxt is None or nxt in self._waiting:
                self._turn.wait(timeout)
                return None
            row = self.store.take(nxt, WORKER)
            if row is None:
                return None
            self._running = Job(cfg=None, session=row["session"], client=row["owner"] or None, id=nxt)
            return self._running, row

    def progress(self, job: Job, percent: int) -> None:
        self.store.set_progress(job.id, percent)

    def done(self, job: Job, outcome: Any = None) -> None:
        """The job has ended (`outcome`: the studio's Outcome, or None): its row records how (a running job's), the
        next one may start, and `job.finished` is set."""
        with self._turn:
            if self._running is job:
                self._running = None
                self._record(job, outcome)
            self._held.pop(job.id, None)
            self._turn.notify_all()
        job.finished.set()

    def _record(self, job: Job, outcome: Any) -> None:
        folder = self.store.path.parent
        if outcome is not None and outcome.ok:
            files = {k: os.path.relpath(p, folder) for k, p in (("video", outcome.video), ("sidecar", outcome.sidecar))}
            self.store.finish(job.id, files, {}, ttl_s=0)
            return
        line = outcome.status if outcome is not None else "error: stopped without an outcome"
        code = "cancelled" if line.startswith("cancelled") else "generation_failed"
        self.store.fail(job.id, code, line.removeprefix("error: "), ttl_s=0)

    def cancel(self, session: str | None = None) -> list[Job]:
        """Flag this session's jobs (all when None) as cancelled: waiting ones leave the queue at once (their rows
        fail with `cancelled`), the running one stops after its current step."""
        jobs = []
        with self._turn:
            for row in self.store.active():
                if session is not None and row["session"] != session:
                    continue
                job_id = row["id"]
                job = self._waiting.get(job_id) or self._held.pop(job_id, None)
                if self._running is not None and self._running.id == job_id:
                    job = self._running
                if row["status"] == "queued":
                    self.store.fail(job_id, "cancelled", CANCELLED_BEFORE, ttl_s=0)
                    if job is None:  # no thread holds it (found after a restart): nothing more to wait for
                        job = Job(cfg=None, session=row["session"], id=job_id)
                        job.finished.set()
                elif job is None:
                    continue
                job.cancelled.set()
                jobs.append(job)
            self._turn.notify_all()
        return jobs

    def stop(self) -> None:
        """Start no more jobs in this process (the page is closing; a running job is left to finish or to the next
        start's recovery)."""
        with self._turn:
            self._stopped = True
            self._turn.notify_all()

    # ------------------------------------------------------------ after a restart; the page's table

    def recover(self, folder: Path) -> dict[str, list[str]]:
        """Settle the jobs a killed page left running (Store.recover; a page video is found by its sidecar)."""
        return self.store.recover(folder, find=lambda job_id: find_published(folder, job_id))

    def rows(self, limit: int = TABLE_ROWS) -> list[dict]:
        """The newest jobs, newest first."""
        return self.store.page(None, limit, "desc")[0]


def find_published(folder: Path, job_id: str) -> dict | None:
    """The video and sidecar a page job published in `folder` (its sidecar's invocation names the job), or None."""
    for sidecar in folder.glob("*.json"):
        try:
            text = sidecar.read_text()
            if job_id not in text:
                continue
            record = json.loads(text)
        except (OSError, ValueError):
            continue
        video = record.get("video") if isinstance(record, dict) else None
        invocation = record.get("invocation") if isinstance(record, dict) else None
        if isinstance(invocation, dict) and invocation.get("ui_job") == job_id and isinstance(video, str):
            if (folder / video).is_file():
                return {"video": video, "sidecar": sidecar.name, "thumbnail": None}
    return None


STATES = {"queued": "waiting", "in_progress": "running", "completed": "done", "failed": "failed"}


def jobs_html(rows: list[dict], links: dict[str, str]) -> str:
    """The page's queue table. Every value is text (html.escape): a prompt is never markup. `links`: job id -> the
    served path of its video (contentv.served), linked through gradio's file route."""
    if not rows:
        return '<p class="cv-jobs">No generations yet.</p>'
    out = ['<table class="cv-jobs"><thead><tr><th>job</th><th>state</th><th>progress</th><th>prompt</th>'
           "<th>video</th></tr></thead><tbody>"]  # fmt: skip
    for r in rows:
        state = STATES.get(r["status"], r["status"])
        if r["status"] == "failed" and r.get("error_message"):
            state = f"{state}: {r['error_message']}"
        link = links.get(r["id"])
        video = ""
        if link:
            href = "gradio_api/file=" + urllib.parse.quote(link)
            video = f'<a href="{html.escape(href)}" target="_blank">{html.escape(Path(r["video"] or "").name)}</a>'
        cells = (r["id"], state, f"{r['progress']}%", r["prompt"][:200])
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + f"<td>{video}</td></tr>")
    return "".join(out) + "</tbody></table>"
