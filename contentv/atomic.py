"""Files the runtime owns, written whole or not at all, and never through a link.

`replacing(path)` writes into a new hidden temporary in the same folder (`.<host>.<pid>.<random>.partial<ext>`,
created with O_EXCL, opened with O_NOFOLLOW), flushes it to disk and renames it over `path`. A rename replaces
a symbolic link at `path` rather than writing where it points, so a `summary.md` that links outside the sweep
folder never gets the outside file overwritten; a crash leaves the old file or the new one, never half of one
(the partial is removed by the next writer in the folder once its process is gone: video.clean_stale_partials).
An OSError is one line naming the cause and the folder: "no space left on device while writing <folder>".
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from contentv.video import VideoWriteError, _new_temp, _sync_folder, _write_error, clean_stale_partials


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file whose content replaces `path` when the block ends without an exception (see above)."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(exc, folder) from exc
    clean_stale_partials(folder)
    tmp = _new_temp(folder, path.suffix or ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())  # a full disk can surface only here
        os.replace(tmp, path)
    except VideoWriteError:
        raise
    except OSError as exc:
        raise _write_error(exc, folder) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _sync_folder(folder)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` with `data`, atomically and never through a link."""
    with replacing(path) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` with UTF-8 `text`, atomically and never through a link."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Replace `path` with `data` as indented JSON, atomically and never through a link."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")
