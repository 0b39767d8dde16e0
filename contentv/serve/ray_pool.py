"""The worker pool on Ray (serve.workers=ray): each worker is a Ray actor holding a warm Runtime, placed by Ray's
scheduler on any node of the cluster with the resources it asks for (serve.ray_resources: {GPU: 1} for a GPU,
{NPU: 1} for an Ascend NPU as a custom resource, nothing for one CPU).

The server keeps the queue (the same SQLite store, the same dispatchers and job states as the local pool): a
dispatcher hands a job to its actor and polls its progress. An actor that dies (its process killed, its node
lost) raises RayActorError: only its job fails, with the reason, and a new actor is created. Actors are owned by
the server process, so they die with it. Videos are written by the actors into the server's output folder:
on a cluster that folder must be on a file system every node mounts (NFS, Lustre; the usual SLURM setup).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contentv.config import BackendConfig, Presets, RunConfig
from contentv.errors import first_line
from contentv.serve.workers import Progress, error_of, run_job


class WarmWorker:
    """The actor: a Runtime built once on the actor's device, running one job at a time (a second thread answers
    progress and cancel calls: the actor is created with max_concurrency=2)."""

    def __init__(self, backend: BackendConfig, build_backend: Callable, memories: dict):
        from contentv.runtime import Runtime

        self.runtime = Runtime(build_backend(backend), presets=memories, progress=False)
        self.percent = 0
        self.cancel = threading.Event()

    def run(self, payload: dict) -> tuple[str, dict]:
        self.percent = 0
        self.cancel.clear()

        def progress(pct: int) -> None:
            self.percent = pct

        try:
            return "done", run_job(self.runtime, payload, progress, self.cancel)
        except Exception as exc:  # noqa: BLE001 - the job fails with its reason; the actor stays warm
            return "failed", error_of(exc)

    def progress(self) -> int:
        return self.percent

    def stop_job(self) -> None:
        self.cancel.set()

    def pid(self) -> int:
        return os.getpid()


def actor_options(resources: dict[str, float]) -> dict:
    """Ray actor options for serve.ray_resources: CPU and GPU as Ray's own, anything else as a custom resource."""
    res = dict(resources or {"CPU": 1})
    return {
        "num_cpus": res.pop("CPU", 0),
        "num_gpus": res.pop("GPU", 0),
        "resources": res,
        "max_concurrency": 2,
        "max_restarts": 0,  # the dispatcher restarts it (and fails the job it was running)
    }


class RayWorker:
    """One actor, as the pool's dispatchers use a worker (see pool.py)."""

    def __init__(self, name: str, backend: BackendConfig, build_backend: Callable, memories: dict, options: dict):
        import ray

        self.name, self.backend, self.options = name, backend, options
        self._args = (backend, build_backend, memories)
        self._cls = ray.remote(WarmWorker)
        self.actor: Any = None
        self.pid: int | None = None
        self.restarts = 0
        self.stopping = False

    def start(self) -> None:
        import ray

        self.actor = self._cls.options(**self.options).remote(*self._args)
        self.pid = ray.get(self.actor.pid.remote())  # waits for the actor (and its Runtime) to exist

    def describe(self) -> str:
        return f"ray:{self.backend.name}"

    def run(self, payload: dict, on_progress: Progress, cancelled: Callable[[], bool]) -> tuple[str, dict]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        ref = self.actor.run.remote(payload)
        asked = time.monotonic()
        try:
            while True:
                ready, _ = ray.wait([ref], timeout=0.5)
                if ready:
                    return tuple(ray.get(ref))
                try:
                    on_progress(ray.get(self.actor.progress.remote(), timeout=10))
                except GetTimeoutError:
                    pass
                if time.monotonic() - asked > 1.0:
                    asked = time.monotonic()
                    if cancelled():
                        self.actor.stop_job.remote()
        except RayActorError as exc:
            if self.stopping:
                return "stopped", {}
            why = first_line(exc)
        self.restarts += 1
        self.start()
        return "failed", {
            "code": "worker_died",
            "message": f"the Ray worker {self.name} died ({why}); it was restarted",
        }

    def stop(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor)


def ray_workers(cfg: RunConfig, presets: Presets, build_backend: Callable) -> list[RayWorker]:
    """Join the cluster at serve.ray_address (null: start a local Ray instance) and make one worker per entry of
    serve.devices (null: as many as the cluster has of the resources each asks for, at least one)."""
    import ray

    serve = cfg.serve
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if serve.ray_address is None:  # a local instance: workers import this checkout's packages
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            kw["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
            kw["num_cpus"] = max(2, len(serve.devices or ()))
        ray.init(address=serve.ray_address, **kw)
    options = actor_options(serve.ray_resources)
    if serve.devices:
        backends = [dataclasses.replace(cfg.backend, name=d.split(":")[0], device_index=0) for d in serve.devices]
    else:
        total = ray.cluster_resources()
        asked = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}
        counts = [int(total.get(k, 0) // v) for k, v in asked.items() if v]
        backends = [cfg.backend] * max(1, min(counts, default=1))
    memories = dict(presets.memories)
    # under Ray each actor sees only its own device (Ray sets the visible devices): index 0
    return [RayWorker(f"ray{i}", b, build_backend, memories, options) for i, b in enumerate(backends)]
