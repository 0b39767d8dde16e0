"""Errors the runtime reports to users as one line (no traceback unless asked)."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A bad setting: names the option, the bad value and what is allowed."""

    def __init__(self, option: str, value: object, allowed: str | Iterable[str]):
        if not isinstance(allowed, str):
            allowed = "one of: " + ", ".join(str(a) for a in allowed)
        self.option, self.value, self.allowed = option, value, allowed
        super().__init__(f"{option}={value!r} is not valid: {allowed}")


class GenerationCancelled(RuntimeError):
    """Raised when a generation is interrupted between denoising steps."""
