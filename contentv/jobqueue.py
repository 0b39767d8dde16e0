"""The web page's generation queue: one job at a time, first come first served, a share per client, cancel.

A job is counted from the moment it is admitted (before it waits), so a client can't hold more than its share
of the queue however it calls the server. What a "client" is: the browser session (gradio's session hash) and,
for remote clients, the network address. A raw API client chooses its own session hash, so the session limit
holds only the page's own clients; the address limit holds a remote client however many sessions it makes;
loopback clients (every local tab and tool share one address) are held per session and by the total only.
"""

from __future__ import annotations

import ipaddress
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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


def is_loopback(address: str) -> bool:
    """A loopback address, or no IP address at all (a test client's name, a Unix socket)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True


class JobQueue:
    """Admitted jobs (waiting or running) with per-session, per-address and total limits, run one at a time."""

    def __init__(self, max_queue: int, max_per_client: int):
        self.max_queue, self.max_per_client = max_queue, max_per_client
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # admitted, not yet finished
        self._lock = threading.Lock()
        self._turn = threading.Condition()
        self._waiting: deque[Job] = deque()  # in arrival order
        self._running: Job | None = None

    def pending(self, session: str | None) -> int:
        """Jobs of this session waiting or running."""
        with self._lock:
            return sum(1 for j in self._jobs if j.session == session)

    def refusal(self, session: str | None = None, client: str | None = None) -> str | None:
        """Why a new job from this session and address can't be admitted now (one line), or None.

        Per session and per remote address: at most ui.max_queue_per_client waiting or running; in all: at
        most ui.max_queue waiting besides the running one.
        """
        with self._lock:
            return self._refusal(session, client)

    def _refusal(self, session: str | None, client: str | None) -> str | None:
        jobs, limit = list(self._jobs), self.max_per_client
        if session is not None and sum(j.session == session for j in jobs) >= limit:
            return f"error: this page already has {limit} generations waiting or running (ui.max_queue_per_client)"
        if client is not None and not is_loopback(client) and sum(j.client == client for j in jobs) >= limit:
            return f"error: {client} already has {limit} generations waiting or running (ui.max_queue_per_client)"
        if sum(j is not self._running for j in jobs) >= self.max_queue:
            return f"error: the queue is full ({self.max_queue} generations waiting, ui.max_queue); try again later"
        return None

    def admit(self, job: Job) -> str | None:
        """Count the job in (None), or the refusal line if its session, address or the queue is full."""
        with self._lock:
            refused = self._refusal(job.session, job.client)
            if refused is None:
                self._jobs.add(job)
            return refused

    def busy(self) -> bool:
        """A job is running."""
        return self._running is not None

    def cancel(self, session: str | None = None) -> list[Job]:
        """Flag this session's jobs (all when None) as cancelled; waiting ones leave the queue at once."""
        with self._lock:
            jobs = [j for j in self._jobs if session is None or j.session == session]
        for job in jobs:
            job.cancelled.set()
        with self._turn:
            self._turn.notify_all()
        return jobs

    def wait_turn(self, job: Job, waiting: Callable[[int], None] | None = None) -> bool:
        """Block until the job is first in line and nothing runs (True: it now runs), or until it is cancelled
        (False). waiting(n) is called whenever the number of jobs ahead of it changes."""
        reported = None
        with self._turn:
            self._waiting.append(job)
        while True:
            with self._turn:
                if job.cancelled.is_set():
                    self._waiting.remove(job)
                    self._turn.notify_all()
                    return False
                if self._running is None and self._waiting[0] is job:
                    self._waiting.popleft()
                    self._running = job
                    return True
                ahead = self._waiting.index(job) + (self._running is not None)
                if ahead == reported:
                    self._turn.wait()
                    continue
            reported = ahead
            if waiting is not None:
                waiting(ahead)

    def done(self, job: Job) -> None:
        """The job has ended (run, cancelled or failed): the next one may start; `job.finished` is set."""
        with self._turn:
            if self._running is job:
                self._running = None
            if job in self._waiting:  # its wait ended by an exception
                self._waiting.remove(job)
            self._turn.notify_all()
        with self._lock:
            self._jobs.discard(job)
        job.finished.set()
