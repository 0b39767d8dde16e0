"""Multi-process launches: torchrun (or SLURM) environment -> process group -> `contentv.parallel.World`.

One process per device. The process-group backend and the attention context parallelism uses are the device
backend's (`Backend.process_group_backend`, `Backend.context_parallel_attention`). The device of each rank is
`LOCAL_RANK`. Under SLURM without torchrun (e.g. Hydra's submitit launcher, one task per GPU) the torchrun
variables are derived from SLURM's.

diffusers' own `enable_parallelism` places rank r on `accelerator:(r % accelerator count)`, which divides by
zero on a CPU-only machine and ignores the backend's device; `init_world` instead hands diffusers the backend's
device and a DeviceMesh built for the backend's device type (see contentv.parallel.apply).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from contentv.config import BackendConfig
from contentv.device import accelerator
from contentv.errors import ConfigError
from contentv.parallel import World

if TYPE_CHECKING:  # torch, accelerate and backends.base (torch) load only when a launch needs them
    from accelerate import PartialState
    from torch.distributed.device_mesh import DeviceMesh

    from backends.base import Backend

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ environment


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    source: str = "single"  # single | torchrun | slurm


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,09],cpu1" -> "gpu03"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank and world size from torchrun's variables, else SLURM's (one task per device), else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            source="torchrun",
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        world = int(env["SLURM_NTASKS"])
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or str(world)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(per_node),
            source="slurm",
        )
    return LaunchEnv()


def export_slurm_env(environ: MutableMapping[str, str] | None = None) -> LaunchEnv:
    """Under SLURM without torchrun, set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT (first node of the job; a port derived from the job id) for torch.distributed and accelerate."""
    env = os.environ if environ is None else environ
    launch = launch_env(env)
    if launch.source != "slurm":
        return launch
    env.setdefault("RANK", str(launch.rank))
    env.setdefault("WORLD_SIZE", str(launch.world_size))
    env.setdefault("LOCAL_RANK", str(launch.local_rank))
    env.setdefault("LOCAL_WORLD_SIZE", str(launch.local_world_size))
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return launch


def configure(backend_cfg: BackendConfig) -> LaunchEnv:
    """Call before building the backend: exports SLURM-derived variables and points `backend.device_index` at
    LOCAL_RANK (one device per process). A single process is left alone."""
    launch = export_slurm_env()
    if launch.world_size > 1:
        import torch

        count = torch.accelerator.device_count() if accelerator() is not None else 0
        # a launcher that shows each task only its own device (e.g. srun --gpus-per-task=1): index 0
        backend_cfg.device_index = 0 if count == 1 else launch.local_rank
        log.info(
            "rank %d of %d (%s): device index %d",
            launch.rank,
            launch.world_size,
            launch.source,
            backend_cfg.device_index,
        )
    return launch


# ------------------------------------------------------------------------------------------ process group


def check_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launch this process belongs to; ConfigError if RANK/WORLD_SIZE say "one of several ranks" but the
    rendezvous address is missing (e.g. variables left over from another launch), instead of torch's bare error."""
    env = os.environ if environ is None else environ
    launch = launch_env(env)
    if launch.world_size > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise ConfigError(
                "WORLD_SIZE",
                launch.world_size,
                f"1 without a launcher: this process is rank {launch.rank} of {launch.world_size} (RANK and WORLD_SIZE "
                f"are set) but {' and '.join(missing)} not: launch with torchrun --nproc_per_node={launch.world_size} "
                "demo.py ..., or unset RANK and WORLD_SIZE",
            )
    return launch


def join_timeout() -> float:
    """Seconds to wait for every rank to join (CONTENTV_JOIN_TIMEOUT, default 300)."""
    return float(os.environ.get("CONTENTV_JOIN_TIMEOUT", "300"))


def init_process_group(backend: Backend) -> tuple[int, int]:
    """Join the launch's process group with the backend's collective library (after `backend.setup()`, so NCCL
    and HCCL see this rank's device). Returns (rank, world_size); (0, 1) without a launcher.

    If the other ranks don't join within join_timeout() (e.g. RANK/WORLD_SIZE/MASTER_* left set without a launcher)
    the process says so in one line and exits with status 1 instead of waiting forever. Only the join is timed:
    collectives keep torch's own timeout, since ranks may legitimately wait for each other's loading.
    """
    import torch.distributed as dist

    launch = check_launch()
    if launch.world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        seconds = join_timeout()
        joined = threading.Event()

        def watchdog() -> None:
            if not joined.wait(seconds):
                print(
                    f"error: rank {launch.rank} of {launch.world_size}: the other ranks did not join within "
                    f"{seconds:.0f} s (RANK, WORLD_SIZE and MASTER_ADDR are set: start every rank with torchrun, or "
                    "unset them for one process; CONTENTV_JOIN_TIMEOUT sets the wait)",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)  # the main thread is blocked inside torch's rendezvous; nothing was written yet

        threading.Thread(target=watchdog, name="contentv-join-watchdog", daemon=True).start()
        try:
            dist.init_process_group(backend=backend.process_group_backend)
        finally:
            joined.set()
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def destroy() -> None:
    """Leave the process group (end of the entry point)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ world


def init_world(backend: Backend) -> World:
    """Join the process group and describe this rank for contentv.parallel (a one-process World without a
    launcher). Call once, after `backend.setup()`."""
    rank, size = init_process_group(backend)
    launch = launch_env()
    if size == 1:
        return World(device=backend.device)
    from torch.distributed.device_mesh import init_device_mesh

    def splitter() -> PartialState:
        from accelerate import PartialState

        # reuses the process group made above (on a CPU it must be told so); made only when data parallelism
        # shards across every rank, so a context-parallel run never meets accelerate's device checks
        return PartialState(cpu=backend.device.type == "cpu")

    def mesh_factory(shape: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
        return init_device_mesh(backend.device.type, tuple(shape), mesh_dim_names=tuple(names))

    return World(
        rank=rank,
        size=size,
        local_rank=launch.local_rank,
        device=backend.device,
        mesh_factory=mesh_factory,
        attention=backend.context_parallel_attention,
        splitter=splitter,
    )
