"""Hub ids: is a model.path a hub id, and can this machine load it (in the local cache, or the hub reachable)?"""

from __future__ import annotations

import os
import re

from contentv.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """'owner/name' that is not an existing local path."""
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


def hub_problem(repo: str, revision: str | None, local_files_only: bool, timeout: float = 4.0) -> str | None:
    """Why a hub id can't be loaded here, found out fast (no download, no retries), or None if it can: it is in the
    local Hugging Face cache, or (online) the hub's host accepts a connection within `timeout` seconds."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo, "model_index.json", revision=revision), str):
            return None
    except Exception:  # noqa: BLE001 - a malformed id or cache: not in the cache
        pass
    if local_files_only or constants.HF_HUB_OFFLINE:
        return "it is not in the local Hugging Face cache, and downloads are off (offline)"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    reached = threading.Event()

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            reached.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True).start()
    if reached.wait(timeout + 1):
        return None
    return f"it is not in the local Hugging Face cache, and {host} can't be reached"


def check_hub(repo: str, revision: str | None, local_files_only: bool) -> None:
    """A hub id must be loadable from here: one line saying what to do otherwise (instead of a retry storm)."""
    problem = hub_problem(repo, revision, local_files_only)
    if problem:
        raise ConfigError(
            "model.path",
            repo,
            f"a checkpoint this machine can load: {problem}; download it where there is network "
            f"(hf download {repo} --local-dir <folder>) and pass model.path=<folder>, or try the runtime "
            "offline with model=tiny_contentv",
        )
