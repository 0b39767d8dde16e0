"""Memory planner: predicted peak device memory, host RAM and relative time of every memory strategy.

`memory=auto` runs the fastest strategy that fits both the device (its free memory, or `memory.budget_gb`)
and the host (its available RAM); `dry_run=true` prints the table. Nothing here loads weights or touches a
device:

- weights (`weights.py`): every component built on the meta device by its family's description
  (`contentv/models/<family>/architecture.py`, read through the registry) and counted tensor by tensor at
  the dtype it is loaded in, after quantization. Exact: tests compare with loaded checkpoints.
- activations (`activations.py`): the transformer's from a live-tensor model of one block, the text
  encoders' from their widths, the VAE decode's from a meta-device trace of the real decoder.
- strategies (`strategies.py`): what each placement keeps on the device in each stage.
- report (`report.py`): the table.

The presets and the device's capabilities and budgets are the caller's business (the entry point composes
the presets; the backend knows the device): `plan()` takes them as arguments.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import torch
from torch import nn

from contentv import speedup
from contentv.config import MemoryConfig, RunConfig, resolve_sampling
from contentv.errors import ConfigError
from contentv.memory_policy import Capabilities, check, guidance_passes, with_defaults
from contentv.models.common import generic_components_on_meta, generic_workload, local_config_folder
from contentv.planner.report import format_plan
from contentv.planner.strategies import MARGIN, STAGES, GiB, ModelCosts, Plan, Strategy, predict_for_budget
from contentv.planner.weights import tensor_bytes, weight_bytes

__all__ = [
    "GiB",
    "MARGIN",
    "STAGES",
    "Plan",
    "Strategy",
    "check_fits",
    "format_plan",
    "host_available",
    "own_strategy",
    "plan",
    "resolve_vae_tiling",
    "tensor_bytes",
    "weight_bytes",
]

_COMPONENTS: dict[str, dict[str, tuple[nn.Module, torch.dtype]]] = {}


def budget_from(memory: MemoryConfig, budget_bytes: int | None) -> int | None:
    """memory.budget_gb (GiB, as cards are sold: a "16 GB" card has 16 GiB) wins over the caller's figure."""
    return int(memory.budget_gb * GiB) if memory.budget_gb is not None else budget_bytes


def plan(
    cfg: RunConfig,
    presets: Mapping[str, MemoryConfig],
    caps: Capabilities | None = None,
    *,
    budget_bytes: int | None = None,
    host_budget_bytes: int | None = None,
    math_attention: bool = False,
    choose: bool = True,
) -> Plan:
    """Predict every preset (plus `none`, and cfg.memory if it differs from its preset) for this run, and choose
    the fastest that fits.

    Device budget: `memory.budget_gb` if set, else `budget_bytes` (the device's free memory); host budget:
    `host_budget_bytes` (the RAM the process can use). Without a device budget no choice is made (table only).
    `caps`: the backend's capabilities (offload streams, quantizations, guidance preference); presets it
    can't run are shown with the reason and never chosen. Raises ConfigError naming memory.budget_gb when
    nothing fits (choose=False: predictions and `fits` only, no choice). No weights are loaded.
    """
    from contentv.registry import get_spec

    spec = get_spec(cfg.model.family)
    sampling = resolve_sampling(cfg.sampling, cfg.model)
    # The prompt doesn't change memory: a dry run may have none.
    spec.validate(dataclasses.replace(sampling, prompt=sampling.prompt or "dry run"))
    if hasattr(caps, "check_attention"):  # a dry run refuses what the real run would
        caps.check_attention(cfg.backend.attention, cfg.model.dtype)
    path = spec.resolve_path(cfg.model)
    m = cfg.model
    key = json.dumps([m.family, path, m.dtype, m.vae_dtype, m.text_encoder_dtype, m.revision])
    if key not in _COMPONENTS:
        _COMPONENTS.clear()  # one model at a time: meta modules hold no storage, but many Python objects
        _COMPONENTS[key] = (spec.components_on_meta or generic_components_on_meta)(cfg.model, path)
    components = _COMPONENTS[key]
    workload = (spec.workload or generic_workload)(components, sampling)
    model = ModelCosts(components, workload, sampling, math_attention, getattr(caps, "bnb_int8_dequant", "fp16"))
    budget = budget_from(cfg.memory, budget_bytes)
    streams = caps.supports_offload_streams if caps is not None else True
    batched = getattr(caps, "batched_guidance", True)

    candidates = {n: p for n, p in presets.items() if n != "auto"}
    candidates.setdefault("none", MemoryConfig(name="none"))
    if cfg.memory.name != "auto" and (
        cfg.memory.name not in candidates or _differs(cfg.memory, candidates[cfg.memory.name])
    ):
        candidates[f"{cfg.memory.name} (as configured)"] = cfg.memory
    strategies = []
    for name, memory in candidates.items():
        guidance = guidance_passes(memory, sampling.guidance_scale, batched)
        try:
            check(memory, caps)
            speedup.check(cfg.speedup, memory)
            strategy = predict_for_budget(
                model, with_defaults(memory, spec.quantize_default), guidance, streams, budget
            )
            strategy.memory = memory
        except ConfigError as exc:
            strategy = Strategy(name=name, memory=memory, error=str(exc), time=math.inf)
        strategy.name = name
        if budget is not None and not strategy.error:
            strategy.fits = strategy.device_bytes <= (1 - MARGIN) * budget and (
                host_budget_bytes is None or strategy.host_peak_bytes <= host_budget_bytes
            )
        strategies.append(strategy)
    strategies.sort(key=lambda s: (s.time, s.device_bytes))

    plain, tiled = model.decode()
    result = Plan(
        model=cfg.model.name,
        sampling=sampling,
        guidance=guidance_passes(
            cfg.memory if cfg.memory.name != "auto" else MemoryConfig(), sampling.guidance_scale, batched
        ),
        weights={n: model.bytes(n) for n in components},
        activations={
            "text_encoding": model.text_bytes(),
            "denoising_batched": model.denoise_bytes(2, 0),
            "denoising_sequential": model.denoise_bytes(1, 0),
            "decoding": plain,
            "decoding_tiled": tiled,
        },
        strategies=strategies,
        budget_bytes=budget,
        host_budget_bytes=host_budget_bytes,
        source=str(path)
        if local_config_folder(path, "model_index.json", m.revision)
        else f"the built-in configs ({path})",
    )
    if budget is not None and choose:
        fitting = [s for s in strategies if s.fits]
        if not fitting:
            raise ConfigError("memory.budget_gb", round(budget / GiB, 2), _nothing_fits(result))
        result.chosen = fitting[0]
    return result


def _nothing_fits(p: Plan) -> str:
    """What the budget would have to be, with the numbers."""
    s = p.sampling
    runnable = [x for x in p.strategies if not x.error]
    if not runnable:
        return "a budget some strategy can run in: none of the presets can run on this backend"
    smallest = min(runnable, key=lambda x: x.device_bytes)
    text = (
        f"at least {smallest.device_bytes / (1 - MARGIN) / GiB:.1f} (GiB) for {p.model} at {s.height}x{s.width}, "
        f"{s.num_frames} frames: the smallest predicted peak is {smallest.device_bytes / GiB:.2f} GiB "
        f"({smallest.name})"
    )
    if p.host_budget_bytes is not None:
        lightest = min(runnable, key=lambda x: x.host_peak_bytes)
        text += (
            f"; host RAM: {p.host_budget_bytes / GiB:.1f} GiB available, the least any strategy needs is "
            f"{lightest.host_peak_bytes / GiB:.1f} GiB ({lightest.name})"
        )
    return text + "; fewer frames or a smaller size lower it"


def check_fits(
    cfg: RunConfig,
    caps: Capabilities,
    budget_bytes: int | None,
    host_budget_bytes: int,
    device: str = "the device",
    own: tuple[Strategy, Plan] | None = None,
) -> None:
    """ConfigError (naming memory, the predicted need and what the machine has) if this run's memory strategy is
    predicted not to fit: the device (its free memory, or memory.budget_gb) or the host RAM. Where the device has
    no memory of its own (the CPU), weights, activations and the process all count against the host. `own`: the
    prediction `own_strategy` already made for this run (so the planner runs once)."""
    budget = budget_from(cfg.memory, budget_bytes)
    strategy, p = own or own_strategy(cfg, caps, budget_bytes)
    if strategy.error:
        return  # the policy check reports it
    s = p.sampling
    what = f"{p.model} at {s.height}x{s.width}, {s.num_frames} frames (memory={cfg.memory.name})"
    fix = "fewer frames, a smaller size or a lighter memory preset (python demo.py dry_run=true lists them), or "
    fix += "memory.check_fit=false to try anyway"
    if budget is not None and strategy.device_bytes > budget:
        raise ConfigError(
            "memory",
            cfg.memory.name,
            f"a strategy that fits: {what} is predicted to need {strategy.device_bytes / GiB:.1f} GiB on "
            f"{device}, which has {budget / GiB:.1f} GiB free; {fix}",
        )
    host_need = strategy.host_peak_bytes
    if budget_bytes is None:  # one memory: resident weights and activations live in host RAM too
        host_need = max(host_need, strategy.device_bytes + strategy.host_bytes)
    if host_need > host_budget_bytes:
        raise ConfigError(
            "memory",
            cfg.memory.name,
            f"a strategy that fits: {what} is predicted to need {host_need / GiB:.1f} GiB of host RAM, this "
            f"machine has {host_budget_bytes / GiB:.1f} GiB available; {fix}",
        )


def own_strategy(cfg: RunConfig, caps: Capabilities | None, budget_bytes: int | None) -> tuple[Strategy, Plan]:
    """The prediction for cfg.memory itself (vae_tiling=null resolved against memory.budget_gb, else
    `budget_bytes`), and its plan."""
    budget = budget_from(cfg.memory, budget_bytes)
    memory = dataclasses.replace(cfg.memory, budget_gb=None)  # the caller compares the budget, with the numbers
    p = plan(dataclasses.replace(cfg, memory=memory), {memory.name: memory}, caps, budget_bytes=budget, choose=False)
    return next(x for x in p.strategies if x.memory is memory), p


def resolve_vae_tiling(cfg: RunConfig, caps: Capabilities | None, budget_bytes: int | None) -> MemoryConfig:
    """cfg.memory with vae_tiling=null decided for this video and device budget (memory.budget_gb, else
    `budget_bytes`): tiled only where the untiled decode is predicted not to fit. Set values are kept."""
    if cfg.memory.vae_tiling is not None:
        return cfg.memory
    strategy, _ = own_strategy(cfg, caps, budget_bytes)
    return dataclasses.replace(cfg.memory, vae_tiling=strategy.vae_tiling)


def host_available() -> int:
    """RAM this process can still use: what the system has available plus what the process already holds."""
    import psutil

    return psutil.virtual_memory().available + psutil.Process().memory_info().rss


def _differs(a: MemoryConfig, b: MemoryConfig) -> bool:
    skip = {"name", "budget_gb", "check_fit"}
    return any(getattr(a, f.name) != getattr(b, f.name) for f in dataclasses.fields(MemoryConfig) if f.name not in skip)
