"""Memory mechanisms shared by every backend; each takes the backend's device explicitly.

The rules (what each `memory.*` setting means, allowed combinations, skip lists) live in
contentv/memory_policy.py; these functions apply diffusers', accelerate's, bitsandbytes' and torchao's
mechanisms accordingly. Device capabilities (streams, quantizations) come from the backend.

Order (Backend.prepare): check -> quantize (weights left on the CPU) -> attention -> vae_options -> place -> text encoders.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from contentv import _diffusers
from contentv.config import MemoryConfig
from contentv.errors import ConfigError
from contentv.memory_policy import (
    GROUP_OFFLOAD_RUN_AHEAD,
    QUANTIZATION_PACKAGES,
    fp8_skip_classes,
    fp8_skip_patterns,
    quantizable,
    skip_parts,
    text_encoder_mode,
)

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from backends.base import Backend  # imports this module

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ quantization


def _components(pipe: DiffusionPipeline, names: list[str]) -> dict[str, nn.Module]:
    out = {}
    for name in names:
        module = getattr(pipe, name, None)
        if not isinstance(module, nn.Module):
            raise ConfigError(
                "memory.quantize", name, [k for k, v in pipe.components.items() if isinstance(v, nn.Module)]
            )
        out[name] = module
    return out


def _swap_linears(root: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every quantizable nn.Linear under `root` by make(linear); returns how many."""
    skip = skip_parts(root)
    targets = [(n, m) for n, m in root.named_modules() if quantizable(n, m, skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, make(linear))
    return len(targets)


@functools.cache
def _bnb_classes():
    """bitsandbytes layer classes, made on first use (bitsandbytes is optional and imported lazily)."""
    import bitsandbytes as bnb

    class Int8Linear(bnb.nn.Linear8bitLt):
        """Linear8bitLt whose int8 weight and row scales are read where `.to()` and offload hooks put them."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Own code because bitsandbytes caches CB/SCB in `self.state` on the first call and moves them only
            # on this layer's own .to(): a parent's .to(), accelerate's and diffusers' hooks move `weight` and
            # buffers. Point the state at those for this call and drop it after, so no stale copy pins memory.
            self.weight.CB = self.weight.SCB = None
            self.state.CB, self.state.SCB = self.weight.data, self.weight_scale
            try:
                return super().forward(x)
            finally:
                self.state.CB = self.state.SCB = None

    class NF4Linear(bnb.nn.Linear4bit):
        """Linear4bit whose quantization state follows the input's device."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Own code because Params4bit moves its quant state only in its own .to(); group-offload hooks swap
            # `.data` only. The state (absmax, ~1/64 of the weight bytes) then stays on the device.
            state = self.weight.quant_state
            if x.device.type != "cpu" and getattr(state, "packing_format_for_cpu", False):
                # Packed for the AVX512-BF16 CPU kernel by a CPU call; only Params4bit.cuda()/.xpu() unpack, not
                # the .to() of a module or an offload hook: unpack here, or the device path reads a wrong layout.
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                self.weight.data, state = _convert_weight_packed_for_cpu_inverse(self.weight.data, state)
                self.weight.quant_state = state
            if state is not None and state.absmax.device != x.device:
                state.to(x.device)
            return super().forward(x)

    return Int8Linear, NF4Linear


def _bnb_int8(linear: nn.Linear, device: torch.device = CPU) -> nn.Module:
    """A bitsandbytes int8 copy of `linear`, quantized on `device` (fast on a GPU), kept on the CPU."""
    import bitsandbytes as bnb

    int8_linear, _ = _bnb_classes()
    # LLM.int8() with bitsandbytes' (and diffusers' BitsAndBytesConfig's) default outlier threshold 6.0.
    q = int8_linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=6.0,
        device="meta",
    )
    weight = bnb.nn.Int8Params(linear.weight.data.contiguous(), requires_grad=False, has_fp16_weights=False)
    # The first move quantizes: data becomes the int8 rows (weight.CB), SCB their fp32 scales. Back on the
    # CPU one layer at a time, so the device never holds more than one layer here; placement moves it later.
    q.weight = weight.to(device).to(CPU)
    q.register_buffer("weight_scale", q.weight.SCB)  # (out,) moved with the module by every hook
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.train(linear.training)  # train mode would re-quantize the int8 weight on every call


def _bnb_nf4(linear: nn.Linear, device: torch.device = CPU) -> nn.Module:
    """A bitsandbytes NF4 copy of `linear`, quantized on `device`, kept on the CPU."""
    import bitsandbytes as bnb

    _, nf4_linear = _bnb_classes()
    # Compute in the component's own dtype (bf16 for ContentV-8B); weights are stored as 4-bit NF4 + absmax.
    q = nf4_linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        quant_type="nf4",
        device="meta",
    )
    weight = bnb.nn.Params4bit(linear.weight.data.contiguous(), requires_grad=False, quant_type="nf4", module=q)
    q.weight = weight.to(device).to(CPU)  # quantizes on `device`; Params4bit.to() moves the quant state along
    if q.compute_dtype != torch.bfloat16 or linear.out_features % 32 or linear.in_features % q.weight.blocksize:
        # On a CPU with AVX512-BF16, bitsandbytes' Linear4bit.forward repacks the weight in place for its fused
        # gemv_4bit kernel whenever the input is a CPU tensor; that kernel rounds the input to bf16 whatever the
        # compute dtype. Keep it for bf16 layers it can take (out % 32 == 0, in % blocksize (64) == 0: all of
        # ContentV-8B's); every other layer takes the generic path (dequantize_4bit, then F.linear in the compute
        # dtype) that every other CPU and every device runs, so an fp32 run's result does not depend on the ISA.
        q.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.train(linear.training)


def _fp8(module: nn.Module) -> int:
    """diffusers layerwise casting: weights stored in float8_e4m3fn, upcast per layer to the module's dtype."""
    from diffusers.hooks import apply_layerwise_casting

    compute = next(module.parameters()).dtype  # bf16 for ContentV-8B; fp32 for the tiny test model
    kw = dict(
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=compute,
        skip_modules_pattern=fp8_skip_patterns(module),
        skip_modules_classes=fp8_skip_classes(),
    )
    if hasattr(module, "enable_layerwise_casting"):  # diffusers models add their own skip patterns
        module.enable_layerwise_casting(**kw)
    else:
        apply_layerwise_casting(module, **kw)
    return sum(1 for m in module.modules() if _diffusers.layerwise_casting_hook(m) is not None)


def _torchao_int8(module: nn.Module) -> int:
    """torchao int8 weight-only (per-row scales), quantized on the CPU (torchao's kernels vary by device)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    skip = skip_parts(module)
    n = sum(1 for name, m in module.named_modules() if quantizable(name, m, skip))
    # set_inductor_config=False: torchao would otherwise change torch._inductor settings for the whole process.
    quantize_(
        module, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, fqn: quantizable(fqn, m, skip)
    )
    return n


def _once_filter(record: logging.LogRecord) -> bool:
    """Let bitsandbytes' 'inputs will be cast ... to float16' warning through once; it is logged on every call."""
    if "will be cast" not in record.getMessage():
        return True
    seen, _once_filter.seen = getattr(_once_filter, "seen", False), True
    return not seen


def quantize(pipe: DiffusionPipeline, memory: MemoryConfig, backend: Backend) -> str:
    """Quantize the chosen components' weights in place, leaving them on the CPU; placement moves them.

    bitsandbytes quantizes one layer at a time on the backend's device (only CUDA and the CPU offer it; on the
    CPU ContentV-8B's 8e9 transformer weights take minutes), so the device never holds more than a layer.
    fp8 and torchao quantize on the CPU, where every backend can.
    """
    method = memory.quantization
    if method == "none":
        return "none"
    if method in QUANTIZATION_PACKAGES:
        _diffusers.use_quantization_library(QUANTIZATION_PACKAGES[method][0])
    parts = _components(pipe, memory.quantize)
    for name, module in parts.items():
        if method == "bnb_int8":
            n = _swap_linears(module, functools.partial(_bnb_int8, device=backend.device))
            bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
            if _once_filter not in bnb_log.filters:
                bnb_log.addFilter(_once_filter)
        elif method == "bnb_nf4":
            n = _swap_linears(module, functools.partial(_bnb_nf4, device=backend.device))
        elif method == "fp8":
            n = _fp8(module)
        else:  # torchao_int8
            n = _torchao_int8(module)
        log.info("quantized %s with %s (%d layers)", name, method, n)
    return f"{method}: {', '.join(parts)}"


# ------------------------------------------------------------------------------------------ placement


def vae_options(pipe: DiffusionPipeline, memory: MemoryConfig) -> dict:
    """Tiled (spatial tiles) and sliced (one video at a time) VAE decoding, diffusers' own switches."""
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        if memory.vae_slicing:
            vae.enable_slicing()
        if memory.vae_tiling:
            vae.enable_tiling()
    return {"vae_slicing": memory.vae_slicing, "vae_tiling": bool(memory.vae_tiling)}


def _text_encoders(pipe: DiffusionPipeline) -> dict[str, nn.Module]:
    return {k: v for k, v in pipe.components.items() if k.startswith("text_encoder") and isinstance(v, nn.Module)}


def _group_offload(module: nn.Module, device: torch.device, blocks: int, use_stream: bool) -> None:
    """diffusers group offloading: block-level for diffusers models, leaf-level for anything else.

    transformers' text encoders keep their blocks below the top level (T5: encoder.block), where
    block-level offload finds no ModuleList and would onload the whole encoder at once.
    """
    from diffusers.hooks import apply_group_offloading

    common = dict(
        onload_device=device,
        offload_device=CPU,
        non_blocking=use_stream,  # copies from pinned memory on the side stream; diffusers syncs before use
        use_stream=use_stream,
        # The onloaded copies are used on the compute stream: record that, so offloading a group doesn't have to
        # synchronize the host first (diffusers syncs at every offload without it).
        record_stream=use_stream,
        low_cpu_mem_usage=False,  # pin all host copies once: faster transfers, more host RAM
    )
    if hasattr(module, "enable_group_offload"):
        module.enable_group_offload(offload_type="block_level", num_blocks_per_group=blocks, **common)
        blocks_lists = [c for c in module.children() if isinstance(c, (nn.ModuleList, nn.Sequential))]
        groups = [block for child in blocks_lists for block in child]
    else:
        apply_group_offloading(module, offload_type="leaf_level", **common)
        groups = [m for m in module.modules() if isinstance(m, _diffusers.group_offload_layer_types())]
    if use_stream:
        bound_run_ahead(groups, device, GROUP_OFFLOAD_RUN_AHEAD)


def bound_run_ahead(groups: list[nn.Module], device: torch.device, depth: int) -> None:
    """Make the host wait for the compute stream once it is `depth` groups ahead.

    With record_stream the device memory of an offloaded group is reused only after the compute stream has run past
    it; the host waits only for copies, so without a bound it could queue the whole model: reserved memory would
    climb towards all the weights while allocated memory stays at two groups. An event per group's forward, and
    a host wait on the one `depth` groups back."""
    from collections import deque

    pending: deque = deque()
    streams = getattr(torch, device.type)  # torch.cuda / torch.npu: the module diffusers' group offload uses too

    def done(_module: nn.Module, _args: tuple, _output: object) -> None:
        pending.append(streams.current_stream(device).record_event())
        while len(pending) > depth:
            pending.popleft().synchronize()

    for group in groups:
        group.register_forward_hook(done)


def _sequential_offload(pipe: DiffusionPipeline, device: torch.device) -> None:
    """diffusers' sequential CPU offload (accelerate hooks on every layer), executing on `device`."""
    from accelerate.hooks import AlignDevicesHook
    from diffusers import DiffusionPipeline

    # The base class's method: StableDiffusion3Pipeline's override reads `image_encoder`, which ContentV lacks.
    DiffusionPipeline.enable_sequential_cpu_offload(pipe, device=device)
    # diffusers hands accelerate torch.device(f"{type}:{index}"); "cpu:0" makes accelerate's weight setter
    # copy Parameters into plain tensors, which the next offload rejects. Execute on the device as given.
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            for module in component.modules():
                hook = getattr(module, "_hf_hook", None)
                for h in getattr(hook, "hooks", (hook,)):
                    if isinstance(h, AlignDevicesHook):
                        h.execution_device = device


def place(pipe: DiffusionPipeline, memory: MemoryConfig, device: torch.device, streams: bool) -> str:
    """Put the pipeline on `device` by the configured placement; returns its name."""
    pipe.execution_device = device
    if memory.sequential_cpu_offload:
        _sequential_offload(pipe, device)
        return "sequential_cpu_offload"
    if memory.model_cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
        return "model_cpu_offload"
    keep_off = set(_text_encoders(pipe)) if text_encoder_mode(memory) in ("release", "cpu") else set()
    if memory.group_offload:
        use_stream = memory.group_offload_stream and streams
        if memory.group_offload_stream and not streams:
            log.info("group offload without streams: this backend has no offload streams")
        offloaded = ["transformer"] + (list(_text_encoders(pipe)) if memory.text_encoders == "offload" else [])
        for name, module in pipe.components.items():
            if not isinstance(module, nn.Module):
                continue
            if name in offloaded:
                _group_offload(module, device, memory.group_offload_blocks, use_stream)
            elif name not in keep_off:
                module.to(device)
        return f"group_offload (blocks per group {memory.group_offload_blocks}, stream {use_stream})"
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module) and name not in keep_off:
            module.to(device)
    return "device"


def place_text_encoders(pipe: DiffusionPipeline, memory: MemoryConfig, device: torch.device) -> str:
    """Tell the pipeline where text encoding runs: resident, released after use, or on the CPU."""
    mode = text_encoder_mode(memory)
    pipe.text_encoder_placement = {"device": "resident", "release": "release", "cpu": "cpu", "offload": "resident"}[
        mode
    ]
    return mode
