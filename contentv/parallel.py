"""Beyond one GPU: one generation across ranks, and many generations across groups of ranks.

Everything here runs on existing machinery; nothing is a home-made collective:
- context parallelism: diffusers' `ContextParallelConfig` (Ulysses all-to-all, ring attention, and their
  "anything" variants for uneven splits), its split/gather hooks (`apply_context_parallel`) driven by the
  plans below, and its templated attention reached through `dispatch_attention_fn`;
- guidance parallelism: the batch-2 (uncond, cond) forward split over a mesh dimension of size 2 with
  diffusers' `EquipartitionSharder`, registered as a diffusers model hook;
- data parallelism: prompts x seeds sharded with accelerate's `PartialState.split_between_processes`.

Ranks form a mesh ("dp", "cfg", "ring", "ulysses") in row-major order, so the ranks of one generation are
consecutive (one node when they fit) and the Ulysses all-to-all runs between neighbours. This module creates
no process group and names no device: the caller (backends/distributed.py) hands in a `World` with the rank,
the device, a mesh factory and the attention backend for its device.

Which tokens are split: video tokens and text tokens alike, each stream `tensor_split` over the
ulysses x ring ranks. That is exact for bidirectional attention without positional terms inside the attention
(ContentV: 3-D sin-cos added at patch embedding; CogVideoX-2B the same; CogVideoX-5B: RoPE, applied to the
local video tokens with the matching slice of the RoPE table): softmax attention is invariant to the order of
keys, so the gathered key order [v0, t0, v1, t1, ...] gives the same result, and the all-to-all (or the ring's
local queries) returns every query to its own rank and position. The text stream is never gathered: its last
block output is discarded by both models.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from contentv.attention import AttentionKernel
from contentv.config import ParallelConfig
from contentv.errors import ConfigError

if TYPE_CHECKING:  # no runtime import: contentv/config.py may import ParallelConfig from here
    from contentv.config import MemoryConfig, SpeedupConfig

log = logging.getLogger(__name__)

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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh_factory: Callable[[tuple[int, ...], tuple[str, ...]], Any] | None = None
    attention: Callable[[torch.dtype, bool], Any] | None = None
    splitter: Callable[[], Any] | None = None
    _meshes: dict = field(default_factory=dict, repr=False)

    def mesh(self, lay: Layout):
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
            torch.distributed.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (e.g. its output folder, so the launch writes to one place)."""
        if self.size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out


# ------------------------------------------------------------------------------------------ plans


def _cp_types():
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return ContextParallelInput, ContextParallelOutput


def contentv_plan() -> dict:
    """ContentV / SD3-style MMDiT: split the patch-embedded video tokens and the projected text tokens right
    where they are made (after the 3-D sin-cos positions are added), gather the video tokens after proj_out."""
    Input, Output = _cp_types()
    return {
        "pos_embed": {0: Input(split_dim=1, expected_dims=3, split_output=True)},  # (B, T*h*w, D)
        "context_embedder": {0: Input(split_dim=1, expected_dims=3, split_output=True)},  # (B, 333, D)
        "proj_out": Output(gather_dim=1, expected_dims=3),  # (B, T*h*w, p*p*C)
    }


def cogvideox_plan() -> dict:
    """CogVideoX: text and video are embedded together, then sliced apart inside forward, so split at the first
    block's inputs; the 5B RoPE table (Sv, D) is split on its token dim exactly like the video tokens."""
    Input, Output = _cp_types()
    return {
        "": {"image_rotary_emb": (Input(split_dim=0, expected_dims=2), Input(split_dim=0, expected_dims=2))},
        "transformer_blocks.0": {
            "hidden_states": Input(split_dim=1, expected_dims=3),  # (B, Sv, D)
            "encoder_hidden_states": Input(split_dim=1, expected_dims=3),  # (B, St, D)
        },
        "proj_out": Output(gather_dim=1, expected_dims=3),
    }


PLANS: dict[str, Callable[[], dict]] = {"contentv": contentv_plan, "cogvideox": cogvideox_plan}
# Transformer keyword arguments that carry the guidance batch (B = 2: uncond, cond).
GUIDANCE_INPUTS: dict[str, tuple[str, ...]] = {
    "contentv": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
    "cogvideox": ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs"),
}


# ------------------------------------------------------------------------------------------ attention


def _no_backward(*args, **kwargs):
    raise NotImplementedError("context-parallel attention here is inference-only")


def context_parallel_kernel(parallel_config, attention: str | Callable) -> AttentionKernel:
    """A (B, H, S, D) kernel running diffusers' context-parallel attention over `parallel_config`'s mesh.

    `attention`: a diffusers attention backend with context-parallel support ("native", "_native_cudnn",
    "flash", "sage", "_native_npu"), called through `dispatch_attention_fn`; or, for a device diffusers has
    no such backend for (ring attention on the CPU), a forward op `(ctx, q, k, v, ..., return_lse) -> out[, lse]`
    in diffusers' (B, S, H, D) layout handed to the same templated Ulysses/ring implementation.
    """
    if isinstance(attention, str):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # dispatch takes (B, S, H, D); q/k/v hold this rank's tokens of every head
            out = dispatch_attention_fn(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                backend=attention,
                parallel_config=parallel_config,
            )
            return out.transpose(1, 2)

        name = attention
    else:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = _templated_context_parallel_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                forward_op=attention,
                backward_op=_no_backward,
                _parallel_config=parallel_config,
            )
            return out.transpose(1, 2)

        name = getattr(attention, "__name__", "forward_op")
    cp = parallel_config.context_parallel_config
    mode = "ring" if cp.ring_degree > 1 else "ulysses"
    if cp.ulysses_anything or cp.ring_anything:
        mode += "_anything"
    run.__name__ = f"{mode}{max(cp.ring_degree, cp.ulysses_degree)}[{name}]"
    return run


# ------------------------------------------------------------------------------------------ guidance


def _guidance_hook(names: tuple[str, ...], mesh):
    """A diffusers ModelHook: this rank's half of the guidance batch in, the whole batch back out."""
    from diffusers.hooks import ModelHook
    from diffusers.hooks.context_parallel import EquipartitionSharder

    class GuidanceParallelHook(ModelHook):
        _is_stateful = False

        def __init__(self):
            super().__init__()
            self.split = False

        def pre_forward(self, module, *args, **kwargs):
            if args:
                raise ValueError("guidance parallelism needs the transformer called with keyword arguments")
            batch = kwargs["hidden_states"].shape[0]
            # without guidance (batch 1) every rank computes the same batch: correct, just not faster
            self.split = batch % mesh.size() == 0
            if self.split:
                for name in names:
                    x = kwargs.get(name)
                    if torch.is_tensor(x) and x.ndim > 0 and x.shape[0] == batch:
                        kwargs[name] = EquipartitionSharder.shard(x, 0, mesh)
            return args, kwargs

        def post_forward(self, module, output):
            if not self.split:
                return output
            if torch.is_tensor(output):
                return EquipartitionSharder.unshard(output, 0, mesh)
            if isinstance(output, tuple):
                return (EquipartitionSharder.unshard(output[0], 0, mesh), *output[1:])
            output.sample = EquipartitionSharder.unshard(output.sample, 0, mesh)
            return output

    return GuidanceParallelHook()


def _uneven_gather_hook(dim: int, cp_config):
    """ContextParallelOutput for uneven shards with any collective library: pad every shard to the longest,
    all-gather equal sizes, trim. (diffusers' `PartitionAnythingSharder.unshard_anything` all-gathers unequal
    sizes, which NCCL accepts and gloo rejects.)"""
    import torch.distributed._functional_collectives as funcol
    from diffusers.hooks import ModelHook
    from diffusers.models._modeling_parallel import gather_size_by_comm

    all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # newer name, older torch

    class UnevenGatherHook(ModelHook):
        _is_stateful = False

        def post_forward(self, module, output):
            group = cp_config._flattened_mesh.get_group()
            x = output.contiguous()
            sizes = gather_size_by_comm(x.shape[dim], group)  # every rank's token count, in rank order
            longest = max(sizes)
            if x.shape[dim] < longest:
                pad = list(x.shape)
                pad[dim] = longest - x.shape[dim]
                x = torch.cat([x, x.new_zeros(pad)], dim=dim)
            full = all_gather(x, dim, group=group)
            if isinstance(full, funcol.AsyncCollectiveTensor):
                full = full.wait()
            parts = full.split(longest, dim=dim)
            return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)], dim=dim)

    return UnevenGatherHook()


# ------------------------------------------------------------------------------------------ apply


@dataclass
class Applied:
    """What `apply` did: the attention kernel to install (None = keep the backend's), and a record."""

    layout: Layout
    kernel: AttentionKernel | None = None
    record: dict = field(default_factory=dict)


def apply(pipe, cfg: ParallelConfig, family: str, world: World) -> Applied:
    """Make `pipe.transformer` run one generation across its group of ranks. Call after loading and before any
    placement or offload; then install `Applied.kernel` with the family's `install_attention` (if not None).

    Every rank must call this (mesh creation is a collective) and later make the same pipeline calls with the
    same seed. Data parallelism alone changes nothing on the model.
    """
    from diffusers.hooks import HookRegistry

    lay = layout(cfg, world.size)
    record = {"world_size": world.size, "layout": dict(zip(DIMS, lay.shape, strict=True)), "rank": world.rank}
    applied = Applied(layout=lay, record={"parallel": record})
    if lay.group_size == 1:
        return applied
    if family not in PLANS:
        raise ConfigError("model.family", family, f"a family with a context-parallel plan: {', '.join(PLANS)}")
    mesh = world.mesh(lay)
    transformer = pipe.transformer
    if lay.context_parallel:
        from diffusers.hooks.context_parallel import apply_context_parallel
        from diffusers.models._modeling_parallel import ContextParallelConfig
        from diffusers.models._modeling_parallel import ParallelConfig as DiffusersParallelConfig

        heads = int(transformer.config.num_attention_heads)
        if not cfg.uneven and lay.ulysses > 1 and heads % lay.ulysses:
            raise ConfigError("parallel.uneven", False, f"true: {heads} heads don't divide by ulysses_degree")
        if cfg.uneven and lay.ulysses > 1:
            pad = -heads % lay.ulysses
            if pad and pad >= (heads + pad) // lay.ulysses:  # diffusers pads heads only up to this
                raise ConfigError(
                    "parallel.ulysses_degree", lay.ulysses, f"a degree whose head padding works for {heads} heads"
                )
        cp = ContextParallelConfig(
            ring_degree=lay.ring,
            ulysses_degree=lay.ulysses,
            ulysses_anything=cfg.uneven and lay.ulysses > 1,
            ring_anything=cfg.uneven and lay.ring > 1,
            mesh=mesh,
        )
        config = DiffusersParallelConfig(context_parallel_config=cp)
        # What ModelMixin.enable_parallelism does, minus its `rank % accelerator count` device (0 on a CPU-only
        # machine, and not the backend's choice): the device and mesh come from the caller.
        config.setup(world.rank, world.size, world.device, mesh=mesh)
        transformer._parallel_config = config
        plan = PLANS[family]()
        if cfg.uneven:  # diffusers' own uneven gather needs unequal-size all_gather (NCCL has it, gloo not)
            gathers = {k: plan.pop(k) for k in [k for k, v in plan.items() if not isinstance(v, dict)]}
            for module_id, out in gathers.items():
                module = transformer.get_submodule(module_id) if module_id else transformer
                registry = HookRegistry.check_if_exists_or_initialize(module)
                registry.register_hook(_uneven_gather_hook(out.gather_dim, cp), f"cp_output---{module_id}")
        apply_context_parallel(transformer, cp, plan)
        if world.attention is None:
            raise RuntimeError("this World has no attention chooser (build it with backends.distributed.init_world)")
        applied.kernel = context_parallel_kernel(config, world.attention(transformer.dtype, lay.ring > 1))
        record["attention"] = applied.kernel.__name__
    if lay.cfg > 1:
        # registered last, so it wraps the context-parallel hooks: halve the batch first, gather it last
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(_guidance_hook(GUIDANCE_INPUTS[family], mesh["cfg"]), "guidance_parallel")
    log.info("rank %d of %d: %s", world.rank, world.size, record)
    return applied


# ------------------------------------------------------------------------------------------ data parallel


@dataclass(frozen=True)
class WorkItem:
    index: int
    prompt: str
    seed: int


def work_items(prompts: list[str], seeds: list[int]) -> list[WorkItem]:
    """Every (prompt, seed) pair, prompt-major, numbered in the order a single process would run them."""
    return [WorkItem(i, p, s) for i, (p, s) in enumerate((p, s) for p in prompts for s in seeds)]


def split_evenly(items: list, index: int, count: int) -> list:
    """Contiguous shard `index` of `count`, the first shards one longer: accelerate's split_between_processes."""
    per, extra = divmod(len(items), count)
    start = index * per + min(index, extra)
    return items[start : start + per + (1 if index < extra else 0)]


def shard(items: list, world: World, lay: Layout) -> list:
    """This rank's items: every rank of a generation group gets the same ones, every item goes to one group."""
    if lay.dp == 1:
        return list(items)
    if lay.group_size == 1 and world.splitter is not None:
        with world.splitter().split_between_processes(list(items)) as mine:
            return list(mine)
    return split_evenly(list(items), world.rank // lay.group_size, lay.dp)


def run_all(runtime, cfg, parallel: ParallelConfig, world: World, callback_on_step_end=None) -> list:
    """`Runtime.run_all` for a launch of `world.size` ranks: each group generates its share of prompt_file lines
    x seeds; the first rank of each group writes its videos and sidecars (the others only compute); rank 0 writes
    `index.json` listing every output after all ranks are done. Returns this rank's results.
    """
    from contentv.validation import read_prompt_file
    from contentv.video import slugify

    lay = layout(parallel, world.size)
    s = cfg.sampling
    prompts = read_prompt_file(s.prompt_file) if s.prompt_file else [s.prompt]
    items = work_items(prompts, list(parallel.seeds or [s.seed]))
    mine = shard(items, world, lay)
    writer = world.is_writer(lay)
    log.info("rank %d: %d of %d generations%s", world.rank, len(mine), len(items), "" if writer else " (no files)")
    results, entries = [], []
    for item in mine:
        sampling = dataclasses.replace(s, prompt=item.prompt, seed=item.seed, prompt_file=None)
        output = cfg.output
        if len(items) > 1 and output.name is None:  # ranks write side by side: names unique by item
            output = dataclasses.replace(output, name=f"{item.index:04d}_{slugify(item.prompt)}_seed{item.seed}")
        one = dataclasses.replace(cfg, sampling=sampling, output=output)
        if writer:
            result = runtime.run(one, callback_on_step_end)
            entries.append(
                {
                    "index": item.index,
                    "prompt": item.prompt,
                    "seed": item.seed,
                    "video": result.video.name if result.video else None,
                    "sidecar": result.sidecar.name if result.sidecar else None,
                    "rank": world.rank,
                }
            )
        else:
            result = runtime.generate(one, callback_on_step_end)
        results.append(result)
    gathered = [e for part in world.gather(entries) for e in part]
    if world.rank == 0 and (world.size > 1 or len(items) > 1):
        write_index(sorted(gathered, key=lambda e: e["index"]), runtime.output_dir(cfg), world, lay)
    world.barrier()
    return results


def write_index(entries: list[dict], folder: Path, world: World, lay: Layout) -> Path:
    """`index.json` (or index-N.json if taken) listing every output of the launch."""
    from contentv.video import write_json

    data = {"world_size": world.size, "layout": dict(zip(DIMS, lay.shape, strict=True)), "outputs": entries}
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = folder / ("index.json" if n == 0 else f"index-{n}.json")
        if not path.exists():
            try:
                return write_json(data, path)
            except FileExistsError:
                continue
    raise FileExistsError(f"no free index-N.json name in {folder}")
