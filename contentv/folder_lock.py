"""One owner per folder: an exclusive lock on a file in it, held until the process ends (or `release()`).

Used where two processes on one folder would do the same work twice: a sweep (`contentv.sweep.lock`, `.sweep.lock`),
the web page's job queue (`.ui-jobs.lock`) and the video API server's (`.serve.lock`). Each of those recovers the jobs
it finds running at start (they were interrupted, as far as it knows) and runs the queued ones, so a second copy on the
same folder would re-queue the first one's running job and both would claim jobs.

The lock is flock(LOCK_EX | LOCK_NB) on the file: the second process is refused at once (the caller's error, one line
naming the holder's pid and host, which the holder writes into the file); the kernel drops the lock when the process
ends, whatever the way (a crash or kill -9 leaves no stale lock). A lock file that is a link is refused. On a file
system without locks (some network mounts) it goes on unlocked, with a warning.

A lock is per file, not per folder: a page and a server on the same folder keep separate queues (`ui-jobs.sqlite3`,
`jobs.sqlite3`), write separate files and may run side by side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path
from types import TracebackType

from contentv.errors import ConfigError

log = logging.getLogger(__name__)


class FolderLock:
    """The lock file `name` in `folder`; a context manager that releases it. Subclasses word the errors."""

    def __init__(self, folder: str | os.PathLike, name: str):
        self.folder = Path(folder)
        self.name = name
        self.fd: int | None = None  # None: not held (or held unlocked, where the file system has no locks)
        self.acquired = False
        self._guard = threading.Lock()  # release() from two threads closes the file once

    # ------------------------------------------------------------ wording (one line each)

    def held(self, holder: str) -> Exception:
        """The error when another process holds the lock (`holder`: "pid N on HOST")."""
        return RuntimeError(f"{self.folder} is in use by {holder} ({self.name})")

    def unusable(self, why: str) -> Exception:
        """The error when the lock file can't be opened (`why`: "it is a link", the system's reason)."""
        return RuntimeError(f"can't lock {self.folder} ({self.name}: {why})")

    def unlocked(self, exc: OSError) -> str:
        """The warning when the file system has no locks (it goes on unlocked)."""
        return f"can't lock {self.folder} ({exc}): don't start two processes on it"

    # ------------------------------------------------------------ the lock

    def acquire(self) -> FolderLock:
        """Take the lock, or raise `held(...)` if another process holds it (`unusable(...)` if it can't be opened)."""
        import fcntl

        path = self.folder / self.name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            why = "it is a link" if os.path.islink(path) else exc.strerror or str(exc)
            raise self.unusable(why) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise self.held(holder) from exc
        except OSError as exc:  # a file system without locks (some network mounts): go on as before, and say so
            os.close(fd)
            log.warning("%s", self.unlocked(exc))
            self.acquired = True
            return self
        with contextlib.suppress(OSError):  # who holds it, for the second process's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd, self.acquired = fd, True
        return self

    def release(self) -> None:
        """Let the next process in (closing the file drops the lock); the lock file stays. Safe to call twice."""
        with self._guard:
            fd, self.fd, self.acquired = self.fd, None, False
        if fd is not None:
            os.close(fd)

    def __getstate__(self) -> dict:
        """A copy in another process (a launcher pickles the sweep's callback into its workers) holds nothing: the
        lock is this process's open file."""
        return {**self.__dict__, "fd": None, "acquired": False, "_guard": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _guard=threading.Lock())

    def __enter__(self) -> FolderLock:
        return self if self.acquired else self.acquire()

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class QueueLock(FolderLock):
    """One process per job queue (the page's, the server's): refused as a bad `output.dir` (ConfigError, one line,
    exit status 2 on the command line), naming the folder, the process that holds it and what to do."""

    def __init__(self, folder: str | os.PathLike, name: str, owner: str, queue: str):
        super().__init__(folder, name)
        self.owner, self.queue = owner, queue  # "page", "ui-jobs.sqlite3"

    def held(self, holder: str) -> Exception:
        return ConfigError(
            "output.dir",
            str(self.folder),
            f"a folder no other {self.owner} is using ({holder} holds its queue, {self.queue}): stop that "
            f"{self.owner}, or give this one another output.dir",
        )

    def unusable(self, why: str) -> Exception:
        why = f"a folder where the {self.owner} can lock its queue ({self.name}: {why})"
        return ConfigError("output.dir", str(self.folder), why)

    def unlocked(self, exc: OSError) -> str:
        return f"can't lock the queue folder {self.folder} ({exc}): don't start two {self.owner}s on it"


def lock_queue(folder: str | os.PathLike, name: str, owner: str, queue: str) -> QueueLock:
    """Lock a job queue's folder now (ConfigError on output.dir if another process holds it)."""
    return QueueLock(folder, name, owner, queue).acquire()
