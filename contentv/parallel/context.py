"""Context and guidance parallelism: one generation split across the ranks of its group.

Which tokens are split: video tokens and text tokens alike, each stream `tensor_split` over the ulysses x ring
ranks. That is exact for bidirectional attention without positional terms inside the attention (ContentV: 3-D
sin-cos added at patch embedding; CogVideoX-2B the same; CogVideoX-5B: RoPE, applied to the local video tokens
with the matching slice of the RoPE table): softmax attention is invariant to the order of keys, so the gathered
key order [v0, t0, v1, t1, ...] gives the same result, and the all-to-all (or the ring's local queries) returns
every query to its own rank and position. The text stream is never gathered: its last block output is discarded
by both models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from contentv import _diffusers
from contentv.attention import AttentionKernel
from contentv.config import ParallelConfig
from contentv.errors import ConfigError
from contentv.parallel import DIMS, Layout, World, layout
from contentv.registry import ModelSpec

if TYPE_CHECKING:
    from diffusers import ContextParallelConfig, DiffusionPipeline
    from diffusers import ParallelConfig as DiffusersParallelConfig
    from diffusers.hooks import ModelHook
    from diffusers.utils import BaseOutput
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)


def _no_backward(*args, **kwargs):
    raise NotImplementedError("context-parallel attention here is inference-only")


def context_parallel_kernel(parallel_config: DiffusersParallelConfig, attention: str | Callable) -> AttentionKernel:
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

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = _diffusers.templated_context_parallel_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                forward_op=attention,
                backward_op=_no_backward,
                parallel_config=parallel_config,
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


def _guidance_hook(names: tuple[str, ...], mesh: DeviceMesh) -> ModelHook:
    """A diffusers ModelHook: this rank's half of the guidance batch in, the whole batch back out."""
    from diffusers.hooks import ModelHook

    EquipartitionSharder = _diffusers.equipartition_sharder()

    class GuidanceParallelHook(ModelHook):
        _is_stateful = False

        def __init__(self) -> None:
            super().__init__()
            self.split = False

        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict[str, Any]]:
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

        def post_forward(
            self, module: torch.nn.Module, output: torch.Tensor | tuple | BaseOutput
        ) -> torch.Tensor | tuple | BaseOutput:
            if not self.split:
                return output
            if torch.is_tensor(output):
                return EquipartitionSharder.unshard(output, 0, mesh)
            if isinstance(output, tuple):
                return (EquipartitionSharder.unshard(output[0], 0, mesh), *output[1:])
            output.sample = EquipartitionSharder.unshard(output.sample, 0, mesh)
            return output

    return GuidanceParallelHook()


def _uneven_gather_hook(dim: int, cp_config: ContextParallelConfig) -> ModelHook:
    """ContextParallelOutput for uneven shards with any collective library: pad every shard to the longest,
    all-gather equal sizes, trim. (diffusers' `PartitionAnythingSharder.unshard_anything` all-gathers unequal
    sizes, which NCCL accepts and gloo rejects.)"""
    import torch.distributed._functional_collectives as funcol
    from diffusers.hooks import ModelHook

    all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # newer name, older torch

    class UnevenGatherHook(ModelHook):
        _is_stateful = False

        def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
            group = cp_config._flattened_mesh.get_group()
            x = output.contiguous()
            sizes = _diffusers.gather_size_by_comm(x.shape[dim], group)  # every rank's token count, in rank order
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


def apply(pipe: DiffusionPipeline, cfg: ParallelConfig, spec: ModelSpec, world: World) -> Applied:
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
    if spec.cp_plan is None:
        raise ConfigError(
            "parallel", "ulysses/ring/cfg", f"off for model family {spec.family} (it has no context-parallel plan)"
        )
    mesh = world.mesh(lay)
    transformer = pipe.transformer
    if lay.context_parallel:
        ContextParallelConfig, DiffusersParallelConfig = _diffusers.context_parallel_configs()
        # (resolve_run checked the token and head counts against the degrees before loading: check_split)
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
        plan = spec.cp_plan()
        if cfg.uneven:  # diffusers' own uneven gather needs unequal-size all_gather (NCCL has it, gloo not)
            gathers = {k: plan.pop(k) for k in [k for k, v in plan.items() if not isinstance(v, dict)]}
            for module_id, out in gathers.items():
                module = transformer.get_submodule(module_id) if module_id else transformer
                registry = HookRegistry.check_if_exists_or_initialize(module)
                registry.register_hook(_uneven_gather_hook(out.gather_dim, cp), f"cp_output---{module_id}")
        _diffusers.apply_context_parallel(transformer, cp, plan)
        if world.attention is None:
            raise RuntimeError("this World has no attention chooser (build it with backends.distributed.init_world)")
        applied.kernel = context_parallel_kernel(config, world.attention(transformer.dtype, lay.ring > 1))
        record["attention"] = applied.kernel.__name__
    if lay.cfg > 1:
        # registered last, so it wraps the context-parallel hooks: halve the batch first, gather it last
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(_guidance_hook(spec.guidance_inputs, mesh["cfg"]), "guidance_parallel")
    log.info("rank %d of %d: %s", world.rank, world.size, record)
    return applied
