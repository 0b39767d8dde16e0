"""One copy of a sweep at a time: an exclusive lock on a file in the sweep folder (`.sweep.lock`).

Two copies of the same sweep would both resume the same jobs, both write their videos (orphans in the job
folders) and both report success. The lock is taken with flock(LOCK_EX | LOCK_NB) at the start of the multirun and
held until the process ends (the kernel releases it then, whatever the way: a crash or kill -9 leaves no stale
lock). The second copy fails at once with one line naming the first's process; its exit status is 2 (nothing ran).
On a file system without locks (some network mounts) the sweep runs unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

from contentv.errors import SweepError

log = logging.getLogger(__name__)
LOCK_FILE = ".sweep.lock"


class SweepLock:
    """The lock on one sweep folder (see the module's docstring); a context manager that releases it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.fd: int | None = None  # None: not held (or held unlocked, where the file system has no locks)
        self.acquired = False

    def acquire(self) -> SweepLock:
        """Take the lock, or raise SweepError (status 2) if another process holds it."""
        import fcntl

        path = self.folder / LOCK_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            why = "it is a link" if os.path.islink(path) else exc.strerror or str(exc)
            raise SweepError(f"can't lock the sweep folder {self.folder} ({LOCK_FILE}: {why})", status=2) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SweepError(
                f"another copy of this sweep is running in {self.folder} ({holder}): wait for it to end, or give "
                "this one another hydra.sweep.dir",
                status=2,
            ) from exc
        except OSError as exc:  # a file system without locks (some network mounts): run as before, and say so
            os.close(fd)
            log.warning("can't lock the sweep folder %s (%s): don't run two copies of this sweep", self.folder, exc)
            self.acquired = True
            return self
        with contextlib.suppress(OSError):  # who holds it, for the second copy's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd, self.acquired = fd, True
        return self

    def release(self) -> None:
        """Let the next copy run (closing the file drops the lock); the lock file stays."""
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.acquired = None, False

    def __enter__(self) -> SweepLock:
        return self if self.acquired else self.acquire()

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def lock_sweep(folder: str | os.PathLike) -> SweepLock:
    """Lock the sweep folder `folder` now (SweepError, status 2, if another copy holds it); release it with
    `.release()` or by leaving a `with lock_sweep(folder):` block (or by the process ending)."""
    return SweepLock(folder).acquire()
