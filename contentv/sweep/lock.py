"""One copy of a sweep at a time: an exclusive lock on a file in the sweep folder (`.sweep.lock`).

Two copies of the same sweep would both resume the same jobs, both write their videos (orphans in the job
folders) and both report success. The lock (`contentv.folder_lock.FolderLock`: flock(LOCK_EX | LOCK_NB)) is taken at
the start of the multirun and held until the process ends (the kernel releases it then, whatever the way: a crash or
kill -9 leaves no stale lock). The second copy fails at once with one line naming the first's process; its exit
status is 2 (nothing ran). On a file system without locks (some network mounts) the sweep runs unlocked, with a
warning.
"""

from __future__ import annotations

import os

from contentv.errors import SweepError
from contentv.folder_lock import FolderLock

LOCK_FILE = ".sweep.lock"


class SweepLock(FolderLock):
    """The lock on one sweep folder (see the module's docstring); a context manager that releases it."""

    def __init__(self, folder: str | os.PathLike):
        super().__init__(folder, LOCK_FILE)

    def held(self, holder: str) -> Exception:
        return SweepError(
            f"another copy of this sweep is running in {self.folder} ({holder}): wait for it to end, or give "
            "this one another hydra.sweep.dir",
            status=2,
        )

    def unusable(self, why: str) -> Exception:
        return SweepError(f"can't lock the sweep folder {self.folder} ({self.name}: {why})", status=2)

    def unlocked(self, exc: OSError) -> str:
        return f"can't lock the sweep folder {self.folder} ({exc}): don't run two copies of this sweep"


def lock_sweep(folder: str | os.PathLike) -> SweepLock:
    """Lock the sweep folder `folder` now (SweepError, status 2, if another copy holds it); release it with
    `.release()` or by leaving a `with lock_sweep(folder):` block (or by the process ending)."""
    return SweepLock(folder).acquire()
