"""Reading files we did not write (checkpoint configs, tokenizer files, safetensors headers, prompt files, sweep
records) with limits: a size cap checked before reading, and a nesting cap checked before parsing JSON.

Python's json module recurses once per nesting level: a file of 50,000 `[` raises RecursionError (or, near the
interpreter's limit, exhausts the C stack). `loads` counts the depth first with a scan that never recurses.
Each failure is a `ValueError` subclass with one line; callers add which option or file it was.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

# A config, index or tokenizer JSON of a real checkpoint is at most tens of MB (a 250k-word tokenizer.json: ~20).
MAX_JSON_BYTES = 128 * 2**20
# Real configs and tokenizer files nest fewer than 10 levels.
MAX_JSON_DEPTH = 100
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


class TooLarge(ValueError):
    """A file over its size cap (nothing of it was read)."""


class TooDeep(ValueError):
    """JSON nested deeper than MAX_JSON_DEPTH (not parsed)."""


def size_words(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def read_capped(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of `path`, refused (TooLarge) if it holds more than `limit`: the size is checked before reading,
    and reading stops at `limit + 1` bytes whatever the size said (a file growing, a device, a FIFO)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise TooLarge(f"{size_words(size)}, over the {size_words(limit)} limit")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"over the {size_words(limit)} limit")
    return data


def json_depth(raw: bytes | str) -> int:
    """The deepest nesting of `[`/`{` in JSON text (strings skipped), without recursion."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    if not brackets:
        return 0
    import numpy as np

    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == 0x5B) | (codes == 0x7B), 1, -1)  # [ { open, ] } close
    return int(np.cumsum(steps).max())


def loads(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with a nesting cap (TooDeep). JSONDecodeError / UnicodeDecodeError pass as they are."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    # fewer brackets than the cap can't nest deeper than it: the scan is only for larger files
    if data.count(b"[") + data.count(b"{") > max_depth and json_depth(data) > max_depth:
        raise TooDeep(f"JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(raw)
    except RecursionError:  # pragma: no cover - the scan above refuses such input first
        raise TooDeep(f"JSON nested more than {max_depth} levels deep") from None


def load_file(path: str | os.PathLike, limit: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a JSON file with both caps (TooLarge, TooDeep, JSONDecodeError, UnicodeDecodeError, OSError)."""
    return loads(read_capped(Path(path), limit), max_depth)


def why(exc: BaseException) -> str:
    """A reading or parsing failure in words: 'is not valid JSON (line 3: ...)', 'is 2 GiB, over ...'."""
    if isinstance(exc, json.JSONDecodeError):
        return f"is not valid JSON (line {exc.lineno}: {exc.msg})"
    if isinstance(exc, UnicodeDecodeError):
        return "is not valid JSON (not UTF-8 text)"
    if isinstance(exc, TooLarge):
        return f"is too large ({exc})"
    if isinstance(exc, TooDeep):
        return f"is not a usable JSON file ({exc})"
    if isinstance(exc, OSError):
        return f"can't be read ({exc.strerror or exc})"
    return f"can't be read ({exc})"
