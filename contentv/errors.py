"""Errors the runtime reports to users as one line (no traceback unless asked)."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A bad setting: names the option, the bad value and what is allowed."""

    def __init__(self, option: str, value: object, allowed: str | Iterable[str]):
        if not isinstance(allowed, str):
            allowed = "one of: " + ", ".join(str(a) for a in allowed)
        self.option, self.value, self.allowed = option, value, allowed
        super().__init__(f"{option}={_shown(value)} is not valid: {allowed}")


class GenerationCancelled(RuntimeError):
    """Raised when a generation is interrupted between denoising steps."""


class SweepError(RuntimeError):
    """A sweep could not do what it says (its summary not written, its folder in use by another copy of it): one
    line; `status` is the command's exit status (1: the sweep ran but its report is not true; 2: not started)."""

    def __init__(self, message: str, status: int = 1, summary: object | None = None):
        super().__init__(message)
        self.status = status
        self.summary = summary  # the contentv.sweep.Summary worked out before writing failed, if any


class OutOfMemory(RuntimeError):
    """The device ran out of memory during a run; the message is one line saying what to do."""


def _shown(value: object, limit: int = 200) -> str:
    """repr() of a bad value, cut short: a 10 MB prompt must not become a 10 MB error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} chars)"


def first_line(exc: BaseException, *, with_type: bool = False, innermost: bool = False) -> str:
    """An exception as one line: the first non-empty line of its message (its type if it has none).

    `innermost`: follow `__cause__` to the most specific exception first; `with_type`: prefix "Type: ".
    """
    if innermost:
        while exc.__cause__ is not None:
            exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if with_type else lines[0]
