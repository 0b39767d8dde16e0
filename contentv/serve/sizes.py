"""The Videos API's `size` and `seconds` as this runtime's height, width and frames, per model family.

Rules (the README's "Serve" section states them):

- `size` is "WIDTHxHEIGHT" in pixels, passed through unchanged: the family's own check then refuses sizes it can't
  run, with the command line's line (ContentV: multiples of 16; CogVideoX: multiples of 16, ...).
- `seconds` (a decimal number > 0) becomes frames at the model's fps (sampling.fps, else the model's default):
  `frames = T * round(seconds * fps / T) + 1`, at least T + 1, where T is the family's `frames_multiple`
  (ContentV 4 -> 4k+1 frames; CogVideoX 8 -> 8k+1).
- The answer's `seconds` is what will be made, frames / fps (a request for 0.5 s of tiny_contentv at 8 fps: 5
  frames, "0.625"); omitted size or seconds: the model's defaults, stated the same way.
"""

from __future__ import annotations

import math
import re

from contentv.errors import ConfigError

MAX_SECONDS = 3600.0


def parse_size(size: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (height, width); ConfigError naming `size` otherwise."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", str(size))
    if not m:
        raise ConfigError("size", size, "WIDTHxHEIGHT in pixels, e.g. 1280x720")
    width, height = int(m.group(1)), int(m.group(2))
    return height, width


def parse_seconds(seconds: str | float) -> float:
    """A duration in seconds (> 0, at most an hour); ConfigError naming `seconds` otherwise."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise ConfigError("seconds", seconds, "a number of seconds, e.g. 4 or 2.5") from None
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise ConfigError("seconds", seconds, f"a number of seconds in (0, {MAX_SECONDS:g}]")
    return value


def frames_for(seconds: float, fps: int, multiple: int) -> int:
    """Frames of a `seconds`-long video at `fps` for a family whose frames are `multiple`*k + 1: the nearest such
    count (k >= 1)."""
    return multiple * max(1, round(seconds * fps / multiple)) + 1


def seconds_of(frames: int, fps: int) -> str:
    """The duration the API reports for `frames` at `fps` (frames / fps, shortest decimal form)."""
    return f"{frames / fps:.3f}".rstrip("0").rstrip(".")


def size_of(height: int, width: int) -> str:
    return f"{width}x{height}"
