"""Beyond one GPU: one generation across ranks, and many generations across groups of ranks.

Everything here runs on existing machinery; nothing is a home-made collective:
- context parallelism (`context.py`): diffusers' `ContextParallelConfig` (Ulysses all-to-all, ring attention, and
  their "anything" variants for uneven splits), its split/gather hooks driven by each model family's plan
  (`ModelSpec.cp_plan`, in the family's folder), and its templated attention reached through
  `dispatch_attention_fn`; guidance parallelism: the batch-2 (uncond, cond) forward split over a mesh dimension
  of size 2 with diffusers' `EquipartitionSharder`, registered as a diffusers model hook;
- data parallelism (`data.py`): prompts x seeds sharded with accelerate's `PartialState.split_between_processes`.

Ranks form a mesh ("dp", "cfg", "ring", "ulysses") in row-major order, so the ranks of one generation are
consecutive (one node when they fit) and the Ulysses all-to-all runs between neighbours. This package creates
no process group and names no device: the caller (backends/distributed.py) hands in a `World` with the rank,
the device, a mesh factory and the attention backend its device's `Backend` chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contentv.config import ParallelConfig
from contentv.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    from contentv.config import MemoryConfig, SpeedupConfig

DIMS = ("dp", "cfg", "ring", "ulysses")


@dataclass(frozen=True)
class Layout:
    """Mesh sizes, outermost first (row-major over DIMS)."""

    dp: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.dp, self.cfg, self.ring, self.ulysses)

    @property
    def group_size(self) -> int:
        """Ranks working on one generation."""
        return self.cfg * self.ring * self.ulysses

    @property
    def context_parallel(self) -> bool:
        return self.ring > 1 or self.ulysses > 1


def check(cfg: ParallelConfig, memory: MemoryConfig | None = None, speedup: SpeedupConfig | None = None) -> None:
    """Settings checkable before launch, alone and against the run's memory and speedup settings (ConfigError)."""
    for key in ("ulysses_degree", "ring_degree"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel.{key}", value, "an integer >= 1 (1 = off)")
    dp = cfg.data_parallel_degree
    if dp is not None and (not isinstance(dp, int) or dp < 1):
        raise ConfigError("parallel.data_parallel_degree", dp, "null (auto) or an integer >= 1")
    if cfg.ulysses_degree > 1 and cfg.ring_degree > 1:
        # diffusers' unified Ulysses+ring attention needs even splits everywhere; ContentV's 333 (9 x 37) and
        # CogVideoX's 226 (2 x 113) text tokens divide by no practical degree >= 4, so it cannot run our models.
        raise ConfigError(
            "parallel.ring_degree",
            cfg.ring_degree,
            f"1 when parallel.ulysses_degree={cfg.ulysses_degree} (pick Ulysses or ring; combine either with "
            "cfg_parallel and data parallelism)",
        )
    if cfg.seeds is not None and (not cfg.seeds or not all(isinstance(s, int) for s in cfg.seeds)):
        raise ConfigError("parallel.seeds", cfg.seeds, "null or a non-empty list of integers")
    if cfg.ulysses_degree == cfg.ring_degree == 1 and not cfg.cfg_parallel:
        return  # data parallelism alone leaves every generation as it is
    if memory is not None:
        if cfg.cfg_parallel and memory.guidance_mode == "sequential":
            raise ConfigError("memory.guidance_mode", "sequential", "auto or batched with parallel.cfg_parallel=true")
        if memory.attention_slicing and cfg.ulysses_degree * cfg.ring_degree > 1:
            # ranks hold different token counts, so query chunks would differ in number: collectives would hang
            raise ConfigError(
                "memory.attention_slicing", memory.attention_slicing, "0 with parallel.ulysses_degree/ring_degree > 1"
            )
    if speedup is not None and speedup.cache != "none":
        # each rank would decide on its own shard whether to skip blocks: ranks diverge (and collectives hang)
        raise ConfigError("speedup.cache", speedup.cache, "none with ulysses_degree, ring_degree or cfg_parallel")


def _cpu():
    import torch

    return torch.device("cpu")


def _dist():
    import torch.distributed

    return torch.distributed


def layout(cfg: ParallelConfig, world_size: int) -> Layout:
    """The mesh for `world_size` ranks (ConfigError if the degrees don't multiply to it)."""
    check(cfg)
    group = (2 if cfg.cfg_parallel else 1) * cfg.ring_degree * cfg.ulysses_degree
    if world_size % group:
        key = "ulysses_degree" if cfg.ulysses_degree > 1 else "ring_degree" if cfg.ring_degree > 1 else "cfg_parallel"
        if world_size == 1:
            allowed = f"off without a launcher: {group} ranks per video need torchrun --nproc_per_node={group}"
        else:
            allowed = f"a layout whose ranks per video ({group}) divide the {world_size} ranks launched"
        raise ConfigError(f"parallel.{key}", getattr(cfg, key), allowed)
    dp = cfg.data_parallel_degree or world_size // group
    if dp * group != world_size:
        raise ConfigError(
            "parallel.data_parallel_degree",
            cfg.data_parallel_degree,
            f"null or {world_size // group} ({world_size} ranks / {group} per generation)",
        )
    return Layout(dp=dp, cfg=2 if cfg.cfg_parallel else 1, ring=cfg.ring_degree, ulysses=cfg.ulysses_degree)


# ------------------------------------------------------------------------------------------ the world


@dataclass
class World:
    """This process's place in the launch. Built by backends/distributed.py; `World()` is one process.

    mesh_factory(shape, names) -> DeviceMesh; attention(dtype, ring) -> a diffusers attention backend name or
    forward op for this device; splitter() -> accelerate's PartialState (made only when data parallelism
    shards across every rank).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: _cpu())
    mesh_factory: Callable[[tuple[int, ...], tuple[str, ...]], Any] | None = None
    attention: Callable[[torch.dtype, bool], Any] | None = None
    splitter: Callable[[], Any] | None = None
    _meshes: dict = field(default_factory=dict, repr=False)

    def mesh(self, lay: Layout) -> DeviceMesh:
        """The (dp, cfg, ring, ulysses) DeviceMesh; created once per layout (a collective: every rank calls)."""
        if lay.shape not in self._meshes:
            if self.mesh_factory is None:
                raise RuntimeError("this World has no mesh factory (build it with backends.distributed.init_world)")
            self._meshes[lay.shape] = self.mesh_factory(lay.shape, DIMS)
        return self._meshes[lay.shape]

    def coords(self, lay: Layout) -> dict[str, int]:
        """This rank's index along each mesh dimension (row-major, as torch's init_device_mesh lays ranks out)."""
        out, rest = {}, self.rank
        for name, n in zip(reversed(DIMS), reversed(lay.shape), strict=True):
            out[name] = rest % n
            rest //= n
        return {name: out[name] for name in DIMS}

    def is_writer(self, lay: Layout) -> bool:
        """The first rank of each generation group writes its videos; the others only compute."""
        return self.rank % lay.group_size == 0

    def barrier(self) -> None:
        if self.size > 1:
            _dist().barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (e.g. its output folder, so the launch writes to one place)."""
        if self.size == 1:
            return obj
        box = [obj]
        _dist().broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        _dist().all_gather_object(out, obj)
        return out


def check_split(cfg: ParallelConfig, lay: Layout, heads: int, video_tokens: int, text_tokens: int) -> None:
    """The model's head and token counts against the context-parallel degrees (ConfigError before any weights load).

    Even splits (parallel.uneven=false, diffusers' plain Ulysses/ring) need heads % ulysses == 0 and both token
    streams divisible by ulysses x ring; uneven Ulysses pads heads, which diffusers allows only up to a limit.
    """
    if not lay.context_parallel:
        return
    degree = lay.ulysses * lay.ring
    if not cfg.uneven:
        uneven = [
            f"{n} {what}"
            for n, what, d in (
                (heads, "attention heads", lay.ulysses),
                (video_tokens, "video tokens", degree),
                (text_tokens, "text tokens", degree),
            )
            if n % d
        ]
        if uneven:
            raise ConfigError(
                "parallel.uneven",
                False,
                f"true for this model and size: {', '.join(uneven)} don't divide by the "
                f"{'ulysses' if lay.ulysses > 1 else 'ring'} degree ({degree})",
            )
    elif lay.ulysses > 1:
        pad = -heads % lay.ulysses
        if pad and pad >= (heads + pad) // lay.ulysses:  # diffusers pads heads only up to this
            raise ConfigError(
                "parallel.ulysses_degree", lay.ulysses, f"a degree whose head padding works for {heads} heads"
            )
