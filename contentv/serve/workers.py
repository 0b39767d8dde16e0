"""Warm workers: one process per device, each keeping its `Runtime` (and so its loaded pipeline) across jobs.

The server talks to a worker through a pipe: it sends a job (the validated RunConfig as a dict), the worker
answers with progress messages and then the outcome. A worker that dies (killed, segfault, out of host memory)
is noticed by its pipe and process; the server fails only the job it was running, with the reason, and starts
a new worker. Workers die with the server (Linux: PR_SET_PDEATHSIG; elsewhere they notice their parent is
gone at the next step), so a killed server leaves no worker finishing a job the restarted server re-runs.

`run_job` is the one function that runs a job on a runtime; the Ray actors (ray_pool.py) call it too. The
backend factory comes from the entry point (contentv never imports `backends`).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contentv.config import BackendConfig, MemoryConfig, RunConfig
from contentv.device import accelerator
from contentv.errors import ConfigError, GenerationCancelled, OutOfMemory, first_line

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


def devices(serve_devices: list[str] | None, backend: BackendConfig, build_backend: Callable) -> list[BackendConfig]:
    """One BackendConfig per worker: serve.devices (BACKEND[:INDEX]) as listed, else every visible accelerator of
    `backend`'s kind, else one worker on the backend as configured (the CPU)."""
    import re

    if serve_devices:
        out = []
        for i, item in enumerate(serve_devices):
            m = re.fullmatch(r"([a-z][a-z0-9_]*)(?::(\d+))?", item)
            if not m:
                raise ConfigError(f"serve.devices[{i}]", item, "BACKEND or BACKEND:INDEX, e.g. cpu, cuda:0, npu:1")
            out.append(dataclasses.replace(backend, name=m.group(1), device_index=int(m.group(2) or 0)))
        return out
    import torch

    built = build_backend(backend)
    accel = accelerator()
    if accel is None or built.device.type != accel.type:
        return [dataclasses.replace(backend, name=built.name)]
    count = torch.accelerator.device_count()
    return [dataclasses.replace(backend, name=built.name, device_index=i) for i in range(count)]


def run_from_dict(data: dict) -> RunConfig:
    """A RunConfig from `dataclasses.asdict` output (the job's stored run)."""
    hints = typing.get_type_hints(RunConfig)
    return RunConfig(
        **{k: hints[k](**v) if dataclasses.is_dataclass(hints[k]) else v for k, v in data.items() if k in hints}
    )


def write_thumbnail(frames: Any, path: Path) -> Path:
    """The first frame as a PNG, written to a temporary and renamed (never a half-written file)."""
    from PIL import Image

    from contentv.video import to_uint8

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(to_uint8(frames[:1])[0]).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def run_job(runtime: Any, payload: dict, on_progress: Progress, cancel: Any = None) -> dict:
    """Run one job on `runtime`: the video and sidecar (the runtime's atomic writer, named after the job id), a
    thumbnail, and the statistics the server records. `cancel` (an Event) stops it after the current step
    (GenerationCancelled). Raises what the runtime raises."""
    cfg = run_from_dict(payload["run"])
    total = cfg.sampling.num_inference_steps or 1

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict) -> dict:
        on_progress(min(99, int(100 * (i + 1) / total)))
        if cancel is not None and cancel.is_set():
            pipe._interrupt = True  # the pipeline raises GenerationCancelled after this step
        return {}

    loads = runtime.loads
    result = runtime.run(cfg, callback_on_step_end=on_step_end)
    thumb = write_thumbnail(result.frames, result.video.with_suffix(".png"))
    rec = result.record
    return {
        "video": result.video.name,
        "sidecar": result.sidecar.name if result.sidecar else None,
        "thumbnail": thumb.name,
        "stats": {
            "stages_s": {k: v["seconds"] for k, v in result.stages.items()},
            "peak_device_bytes": rec.get("peak_memory", {}).get("device_bytes"),
            "peak_host_rss_bytes": rec.get("peak_memory", {}).get("host_rss_bytes"),
            "loaded_weights": runtime.loads > loads,
        },
    }


def error_of(exc: BaseException) -> dict:
    """A job's error object: a code and one line."""
    if isinstance(exc, ConfigError):
        return {"code": "invalid_request", "message": str(exc)}
    if isinstance(exc, OutOfMemory):
        return {"code": "out_of_memory", "message": str(exc)}
    if isinstance(exc, GenerationCancelled):
        return {"code": "cancelled", "message": first_line(exc)}
    return {"code": "generation_failed", "message": first_line(exc, with_type=True)}


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def worker_main(
    conn: Any,
    cancel: Any,
    backend: BackendConfig,
    build_backend: Callable,
    memories: dict[str, MemoryConfig],
    parent: int,
) -> None:
    """A worker process: build the backend and a Runtime once, then run the jobs the pipe brings until None."""
    die_with_parent()
    if os.getppid() != parent:  # the server died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops the workers itself
    from contentv.runtime import Runtime

    runtime = Runtime(build_backend(backend), presets=memories, progress=False)
    while True:
        try:
            payload = conn.recv()
        except EOFError:
            return
        if payload is None:
            return

        def progress(pct: int) -> None:
            if os.getppid() != parent:
                os._exit(1)  # orphaned: the server is gone; publish nothing
            conn.send(("progress", pct))

        try:
            conn.send(("done", run_job(runtime, payload, progress, cancel)))
        except Exception as exc:  # noqa: BLE001 - the job fails with its reason; the worker stays warm
            log.warning("job %s failed: %s", payload.get("id"), first_line(exc, with_type=True))
            conn.send(("failed", error_of(exc)))


def exit_reason(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class LocalWorker:
    """A worker process on this machine for one device; `run` blocks until the job's outcome."""

    def __init__(self, name: str, backend: BackendConfig, build_backend: Callable, memories: dict):
        self.name, self.backend = name, backend
        self._args = (backend, build_backend, memories)
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold a device context
        self.proc: Any = None
        self.conn: Any = None
        self.restarts = 0
        self.stopping = False  # set by the pool at shutdown: a worker gone then is not restarted

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.conn, child = self._ctx.Pipe()
        self._cancel = self._ctx.Event()
        self.proc = self._ctx.Process(
            target=worker_main,
            args=(child, self._cancel, *self._args, os.getpid()),
            name=f"contentv-{self.name}",
            daemon=True,
        )
        self.proc.start()
        child.close()

    def run(self, payload: dict, on_progress: Progress, cancelled: Callable[[], bool]) -> tuple[str, dict]:
        """("done", result) or ("failed", error); a dead worker is restarted and its job failed with the reason.
        `cancelled()` is asked every second: true stops the job after its current step."""
        self._cancel.clear()
        asked = time.monotonic()
        try:
            self.conn.send(payload)
            while True:
                if time.monotonic() - asked > 1.0:
                    asked = time.monotonic()
                    if cancelled():
                        self._cancel.set()
                if self.conn.poll(0.2):
                    kind, value = self.conn.recv()
                    if kind == "progress":
                        on_progress(value)
                        continue
                    return kind, value
                if not self.proc.is_alive():
                    break
        except (EOFError, OSError):
            pass
        self.proc.join(5)
        if self.stopping:
            return "stopped", {}
        why = exit_reason(self.proc.exitcode)
        self.restarts += 1
        self.start()
        message = f"the worker on {self.describe()} {why} while running this job; it was restarted"
        return "failed", {"code": "worker_died", "message": message}

    def describe(self) -> str:
        return f"{self.backend.name}:{self.backend.device_index}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
