"""One progress bar per long stage of a run: loading, text encoding, denoising (the pipeline's own step bar), decoding.

tqdm draws them (a dependency already); the libraries' own "Loading weights" bars are switched off so nothing shows
twice (`own_bars_only`). A stage's bar is current while it runs, so code deep inside it (the component loader) can
advance it with `tick()` without being handed the bar.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("contentv_progress_bar", default=None)


@contextlib.contextmanager
def stage(desc: str, enabled: bool = True, unit: str | None = None) -> Iterator[Any]:
    """A bar for one stage: `desc`, the elapsed time, and how many `unit`s were done if the stage counts them."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    fmt = "{desc}: {n_fmt} " + unit + "s [{elapsed}]" if unit else "{desc} [{elapsed}]"
    bar = tqdm(desc=desc, total=None, leave=True, dynamic_ncols=True, bar_format=fmt)
    token = _CURRENT.set(bar)
    try:
        yield bar
    finally:
        _CURRENT.reset(token)
        bar.refresh()
        bar.close()


def tick(n: int = 1) -> None:
    """Advance the current stage's bar (a no-op outside a stage)."""
    bar = _CURRENT.get()
    if bar is not None:
        bar.update(n)


def own_bars_only() -> None:
    """Switch off transformers' per-component "Loading weights" bars (the loading stage's bar counts components)."""
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """transformers' own bars ("Writing model shards", "Loading weights") off for a while, then as they were."""
    import transformers.utils.logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()
