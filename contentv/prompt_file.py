"""sampling.prompt_file: one prompt per line, read with limits (validation.read_prompt_file is the entry).

- The size is capped before anything is read (MAX_BYTES): a 1 GB file is refused from its size, not loaded.
- A UTF-8 byte-order mark is dropped, so a first `# comment` line stays a comment.
- Lines end at \\n (or \\r\\n) only: str.splitlines() also splits at U+2028, U+2029, U+0085, \\v, \\f and more,
  which would turn one prompt into two videos.
- Every line is checked as a prompt; a bad one is refused with its line number.
- At most `max_prompts` prompts (sampling.max_prompts): a 10,000-line file does not start by surprise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from contentv.errors import ConfigError
from contentv.untrusted import TooLarge, read_capped, size_words

log = logging.getLogger(__name__)
OPTION = "sampling.prompt_file"
# Far more than any prompt list (1000 prompts of 20,000 characters is 20 MB of UTF-8 at most, usually < 1 MB).
MAX_BYTES = 16 * 2**20


def _lines(text: str) -> list[str]:
    """Split at \\n only, dropping the \\r of \\r\\n line ends."""
    return [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]


def read(path: str, max_prompts: int | None, check: Callable[[str, str], None]) -> list[str]:
    """The prompts of `path` (see the module's docstring); `check(option, prompt)` validates each line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(OPTION, path, "an existing text file with one prompt per line")
    try:
        data = read_capped(p, MAX_BYTES)
    except TooLarge as exc:
        raise ConfigError(OPTION, path, f"a prompt file of at most {size_words(MAX_BYTES)} ({exc})") from None
    except OSError as exc:
        raise ConfigError(OPTION, path, f"a readable file ({exc.strerror})") from exc
    try:
        text = data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not part of line 1
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(OPTION, path, f"a UTF-8 text file (line {line}: byte {exc.start} is not UTF-8)") from None
    if "\0" in text:
        raise ConfigError(OPTION, path, "a text file (it contains NUL bytes: binary?)")
    prompts = []
    for number, raw in enumerate(_lines(text), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            check(OPTION, line)
        except ConfigError as exc:
            raise ConfigError(OPTION, path, f"line {number}: {exc.allowed}") from None
        prompts.append(line)
        if max_prompts is not None and len(prompts) > max_prompts:
            total = sum(1 for ln in _lines(text) if ln.strip() and not ln.strip().startswith("#"))
            raise ConfigError(
                OPTION,
                path,
                f"at most sampling.max_prompts={max_prompts} prompts (the file has {total}); "
                f"to make all of them, set sampling.max_prompts={total}",
            )
    if not prompts:
        raise ConfigError(OPTION, path, "a file with at least one non-empty, non-comment line")
    return prompts
