"""Per-stage wall time, peak device memory and peak host RSS."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import psutil


class MemoryProbe(Protocol):
    """What stage statistics need from a backend."""

    def synchronize(self) -> None: ...
    def reset_peak_memory(self) -> None: ...
    def peak_memory(self) -> int | None: ...


class PeakRSS:
    """Samples this process's resident set size in a background thread; `.peak` is the maximum seen.

    ru_maxrss can't be reset between stages, so a sampler is the only way to get per-stage peaks. The
    interval is coarse on purpose: frequent wake-ups preempt the compute threads (measurable on a 2-core
    CPU run); host-memory peaks (loading, offload copies) last far longer than a quarter second.
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()


@dataclass
class StageStats:
    seconds: float
    peak_device_bytes: int | None
    peak_host_rss_bytes: int


class StageRecorder:
    """`with recorder.stage("denoising"): ...` records time and memory peaks of that stage."""

    def __init__(self, probe: MemoryProbe):
        self.probe = probe
        self.stages: dict[str, StageStats] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.probe.synchronize()
        self.probe.reset_peak_memory()
        with PeakRSS() as rss:
            start = time.perf_counter()
            yield
            self.probe.synchronize()
            seconds = time.perf_counter() - start
        self.stages[name] = StageStats(seconds, self.probe.peak_memory(), rss.peak)

    def timings(self) -> dict[str, float]:
        return {k: round(v.seconds, 4) for k, v in self.stages.items()}

    def peaks(self) -> dict[str, int | None]:
        device = [s.peak_device_bytes for s in self.stages.values() if s.peak_device_bytes is not None]
        return {
            "device_bytes": max(device) if device else None,
            "host_rss_bytes": max((s.peak_host_rss_bytes for s in self.stages.values()), default=0),
        }

    def as_dict(self) -> dict[str, dict]:
        return {k: asdict(v) for k, v in self.stages.items()}
