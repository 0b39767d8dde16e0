"""Memory strategies: what each one keeps on the device in each stage, and what it costs in time.

`predict` follows the mechanisms in backends/memory.py (placement, group offload groups, text-encoder modes,
quantized bytes) stage by stage: text encoding, denoising, decoding. Relative times are published anchors
(see PLACEMENT_TIME) until the GPU benchmark (benchmarks/gpu_check.sh) measures ContentV-8B.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from contentv.config import MemoryConfig, SamplingConfig
from contentv.errors import ConfigError
from contentv.memory_policy import GROUP_OFFLOAD_RUN_AHEAD, placement, text_encoder_mode
from contentv.models.common import Workload, config_get
from contentv.planner.activations import activation_bytes, decode_bytes, text_encoder_activation_bytes
from contentv.planner.weights import (
    block_groups,
    largest_direct,
    leaf_groups,
    pinned_bytes,
    sum_buffers,
    tensor_bytes,
)

GiB = 2**30
# A strategy fits when its predicted peak is at most (1 - MARGIN) * budget (allocator fragmentation,
# kernel workspaces and the estimate's own error).
MARGIN = 0.05
# Host RAM of the process itself (interpreter, torch, diffusers, CUDA/CANN host-side state); a placeholder
# until measured on the target machines.
BASE_HOST_BYTES = int(2.5 * GiB)
STAGES = ("text_encoding", "denoising", "decoding")

# Relative time (1.0 = everything resident, no quantization). Published anchors, to be replaced by ratios
# measured on ContentV-8B with benchmarks/gpu_check.sh: diffusers' memory-optimization docs (one offloading run:
# 6.6 s resident, 21.7 s model, 47.7 s group, 68.4 s sequential offload, on a short sequence where copies
# can't hide), published Flux runs on an H100 (bitsandbytes int8 2.25x, torchao int8 1.25x, fp8 layerwise
# casting 1.08x) and the long-sequence case where block prefetch hides behind compute. Offload overheads are for
# one forward per step; sequential guidance runs two, so the weight traffic (the overhead) doubles under block/layer offload.
PLACEMENT_TIME = {
    "device": 1.0,
    "model_cpu_offload": 1.02,  # each component crosses once per video
    "group_offload_stream": 1.05,  # block prefetch hides behind compute at long sequences
    "group_offload": 1.5,  # synchronous block copies
    "sequential_cpu_offload": 5.0,  # layer-by-layer synchronous copies
}
QUANT_TIME = {"none": 1.0, "bnb_int8": 2.25, "bnb_nf4": 1.5, "fp8": 1.08, "torchao_int8": 1.25}
TEXT_ENCODER_TIME = {"device": 1.0, "offload": 1.0, "release": 1.01, "cpu": 1.03}
VAE_TILING_TIME = 1.02
ATTENTION_SLICING_TIME = 1.02


@dataclass
class Strategy:
    """One memory strategy and what the planner predicts for it."""

    name: str
    memory: MemoryConfig
    device_bytes: int = 0  # predicted peak device memory (max over stages)
    stage_bytes: dict[str, int] = field(default_factory=dict)  # peak device memory per stage
    host_bytes: int = 0  # host RAM while generating (weights kept on the CPU, pinned copies, process)
    host_peak_bytes: int = 0  # including loading and pinning
    time: float = 1.0  # relative time; 1.0 = everything resident, no quantization
    fits: bool | None = None  # under the budget (with MARGIN); None without a budget
    error: str = ""  # why this strategy can't run here (it is then never chosen)
    vae_tiling: bool = False  # what the prediction assumed (memory.vae_tiling=null resolved against the budget)


@dataclass
class Plan:
    model: str
    sampling: SamplingConfig
    guidance: str  # batched | sequential | none
    weights: dict[str, int]  # component -> bytes as loaded (no quantization)
    activations: dict[str, int]  # denoising (batched / sequential), text encoding, decoding (plain / tiled)
    strategies: list[Strategy]
    budget_bytes: int | None = None
    host_budget_bytes: int | None = None  # RAM the process can use
    chosen: Strategy | None = None
    source: str = ""  # where the component configs came from


def relative_time(memory: MemoryConfig, guidance: str, streams: bool = True) -> float:
    """Relative time of a strategy from the anchors above (1.0 = everything resident)."""
    where = placement(memory)
    if where == "group_offload":
        where = "group_offload_stream" if memory.group_offload_stream and streams else "group_offload"
    t = PLACEMENT_TIME[where]
    if guidance == "sequential" and where in ("group_offload_stream", "group_offload", "sequential_cpu_offload"):
        t = 1 + 2 * (t - 1)  # two forwards per step: every block crosses twice
    if "transformer" in (memory.quantize if memory.quantize is not None else ("transformer",)):  # null: default
        t *= QUANT_TIME.get(memory.quantization, 1.0)
    t *= TEXT_ENCODER_TIME.get(text_encoder_mode(memory), 1.0)
    if memory.vae_tiling:
        t *= VAE_TILING_TIME
    if memory.attention_slicing:
        t *= ATTENTION_SLICING_TIME
    return round(t, 4)


@dataclass
class ModelCosts:
    """Everything strategy-independent: the components on meta and the workload's activation sizes."""

    components: dict[str, tuple[nn.Module, torch.dtype]]
    workload: Workload
    sampling: SamplingConfig
    math_attention: bool
    int8_dequant: str = "fp16"  # the backend's bitsandbytes int8 dequant (bnb_int8_bytes_per_token)
    _sizes: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    _pinned: dict[tuple[str, str], int] = field(default_factory=dict)

    def sizes(self, name: str, quantization: str) -> dict[int, int]:
        key = (name, quantization)
        if key not in self._sizes:
            module, dtype = self.components[name]
            self._sizes[key] = tensor_bytes(module, dtype, quantization)
        return self._sizes[key]

    def bytes(self, name: str, quantization: str = "none") -> int:
        return sum(self.sizes(name, quantization).values())

    def pinned(self, name: str, quantization: str = "none") -> int:
        """Host bytes of the component's pinned copies (group offload with streams), as the allocator rounds them."""
        key = (name, quantization)
        if key not in self._pinned:
            module, dtype = self.components[name]
            self._pinned[key] = pinned_bytes(module, dtype, quantization)
        return self._pinned[key]

    def denoise_bytes(self, batch: int, attention_chunk: int, quantization: str = "none") -> int:
        module, dtype = self.components["transformer"]
        c = module.config
        dim = config_get(c, "num_attention_heads", default=1) * config_get(c, "attention_head_dim", default=64)
        wl = self.workload
        act = activation_bytes(
            batch=batch,
            video_tokens=wl.video_tokens,
            text_tokens=wl.text_tokens,
            dim=dim,
            ff_dim=int(wl.ff_mult * dim),
            dtype=dtype,
            heads=config_get(c, "num_attention_heads", default=1),
            live=wl.block_live,
            math_attention=self.math_attention,
            attention_chunk=attention_chunk,
            quantization=quantization,
            int8_dequant=self.int8_dequant,
        )
        return act + self.resident_tensors(batch)

    def resident_tensors(self, batch: int) -> int:
        """Latents, noise predictions, scheduler temporaries, prompt embeddings and the model's per-shape tables
        kept across steps."""
        _, dtype = self.components["transformer"]
        latent = math.prod(self.workload.latent) * dtype.itemsize
        width = config_get(
            self.components["transformer"][0].config, "joint_attention_dim", "text_embed_dim", default=4096
        )
        embeds = 2 * self.workload.text_tokens * width * dtype.itemsize
        return 4 * batch * latent + embeds + self.workload.table_elements * dtype.itemsize

    def text_bytes(self) -> int:
        out = 0
        for name, tokens in self.workload.text_lengths.items():
            if name in self.components:
                module, dtype = self.components[name]
                out = max(out, text_encoder_activation_bytes(module, tokens, dtype))
        return out

    def decode(self) -> tuple[int, int]:
        if "vae" not in self.components:
            return 0, 0
        vae, dtype = self.components["vae"]
        return decode_bytes(vae, dtype, self.workload.latent, self.workload.decode_trace_frames)


def predict(model: ModelCosts, memory: MemoryConfig, guidance: str, streams: bool) -> Strategy:
    names = list(model.components)
    missing = [n for n in memory.quantize if n not in names] if memory.quantization != "none" else []
    if missing:
        raise ConfigError("memory.quantize", missing[0], names)
    quant = {n: (memory.quantization if n in memory.quantize else "none") for n in names}
    w = {n: model.bytes(n, quant[n]) for n in names}
    total = sum(w.values())
    te = [n for n in names if n.startswith("text_encoder")]
    order = [n for n in model.workload.text_encoder_order if n in te] or te
    mode = text_encoder_mode(memory)
    batch = 2 if guidance == "batched" else 1
    act = {
        "text_encoding": model.text_bytes() if mode != "cpu" else 0,
        "denoising": model.denoise_bytes(batch, memory.attention_slicing, quant.get("transformer", "none")),
        "decoding": model.decode()[1 if memory.vae_tiling else 0] + model.resident_tensors(1),
    }
    use_stream = memory.group_offload_stream and streams
    # Group offload with streams pins a copy of each tensor (rounded up to a power of two by torch's caching host
    # allocator); the loaded weights are freed after a first pass, so the pinned copies are what the host keeps.
    pinned = 0  # pinned bytes beyond the loaded weights they replace
    loaded = 0  # loaded weights alive beside their pinned copies until that first pass

    if memory.sequential_cpu_offload:
        # accelerate moves each module's own weights to the device when it runs; buffers stay there.
        def largest(group: list[str]) -> int:
            return max((largest_direct(model.components[n][0], model.sizes(n, quant[n])) for n in group), default=0)

        buffers = sum(sum_buffers(model.components[n][0], model.sizes(n, quant[n])) for n in names)
        resident = {
            "text_encoding": largest(te) + buffers,
            "denoising": largest(["transformer"]) + buffers,
            "decoding": largest(["vae"] if "vae" in names else []) + buffers,
        }
        host = total
    elif memory.model_cpu_offload:
        # accelerate's chain offloads a component when the next one in the chain runs; the negative prompt
        # runs the first encoders again while the last one (T5) is still on the device.
        text = max((w[n] for n in te), default=0)
        if guidance != "none" and len(order) > 1:
            text = w[order[-1]] + max(w[n] for n in order[:-1])
        resident = {"text_encoding": text, "denoising": w.get("transformer", 0), "decoding": w.get("vae", 0)}
        host = total - min(resident.values())
    else:
        always = sum(w[n] for n in names if n not in te and n != "transformer")  # moved to the device once
        te_all = sum(w[n] for n in te)
        if memory.group_offload:
            sizes = model.sizes("transformer", quant["transformer"])
            group, rest = block_groups(model.components["transformer"][0], sizes, memory.group_offload_blocks)
            # running block + the one prefetched (+ with streams, the freed blocks the compute stream hasn't reached)
            busy_transformer = rest + group * (2 + GROUP_OFFLOAD_RUN_AHEAD if use_stream else 1)
            idle_transformer = 0
            if use_stream:
                pinned += model.pinned("transformer", quant["transformer"]) - w["transformer"]
                loaded += w["transformer"]
        else:
            busy_transformer = idle_transformer = w.get("transformer", 0)
        if mode == "device":
            te_idle = te_busy = te_all
        elif mode == "offload":  # leaf-level group offload of each text encoder
            leaves = [leaf_groups(model.components[n][0], model.sizes(n, quant[n])) for n in te]
            te_idle = 0
            in_flight = 2 + GROUP_OFFLOAD_RUN_AHEAD if use_stream else 1
            te_busy = max((outside + leaf * in_flight for leaf, outside in leaves), default=0)
            if use_stream:
                pinned += sum(model.pinned(n, quant[n]) for n in te) - te_all
                loaded += te_all
        elif mode == "release":
            te_idle, te_busy = 0, te_all
        else:  # cpu: encoded on the CPU
            te_idle = te_busy = 0
        resident = {
            "text_encoding": always + te_busy + idle_transformer,
            "denoising": always + te_idle + busy_transformer,
            "decoding": always + te_idle + idle_transformer,
        }
        host = total - always - (te_all if mode == "device" else 0) - (0 if memory.group_offload else idle_transformer)
        host += pinned
    stage_bytes = {s: int(resident[s] + act[s]) for s in STAGES}
    full = sum(model.bytes(n) for n in names)  # loading reads every weight at full precision first
    return Strategy(
        name=memory.name,
        memory=memory,
        vae_tiling=bool(memory.vae_tiling),
        device_bytes=max(stage_bytes.values()),
        stage_bytes=stage_bytes,
        host_bytes=int(host + BASE_HOST_BYTES),
        host_peak_bytes=int(max(host + loaded, full) + BASE_HOST_BYTES),
        time=relative_time(memory, guidance, streams),
    )


def predict_for_budget(
    model: ModelCosts, memory: MemoryConfig, guidance: str, streams: bool, budget: int | None
) -> Strategy:
    """predict(), with memory.vae_tiling=null resolved: tiled only where the untiled decode would push the peak past
    the budget and tiling lowers it (tiling changes the frames, so it is never turned on for nothing)."""
    if memory.vae_tiling is not None:
        return predict(model, memory, guidance, streams)
    untiled = predict(model, dataclasses.replace(memory, vae_tiling=False), guidance, streams)
    if budget is None or untiled.device_bytes <= (1 - MARGIN) * budget:
        return untiled
    tiled = predict(model, dataclasses.replace(memory, vae_tiling=True), guidance, streams)
    return tiled if tiled.device_bytes < untiled.device_bytes else untiled
