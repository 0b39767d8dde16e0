"""Memory planner: predicted peak device memory, host RAM and relative time of every memory strategy.

`memory=auto` runs the fastest strategy that fits the device's free memory (or `memory.budget_gb`);
`dry_run=true` prints the table. Nothing here loads weights or touches a device:

- weights: every component is built on the meta device from its config (a local checkpoint's config
  files, else the family's built-in full-size configs) and its bytes counted tensor by tensor at the dtype
  it is loaded in, after the strategy's quantization. Exact: tests compare with a loaded checkpoint.
- activations: the transformer's from a live-tensor model of one block (below); the text encoders' from
  their widths (small); the VAE decode's by running the real decoder on meta tensors at a reduced size
  and counting the bytes alive at each op (`LiveBytes`), scaled to the real size.
- placement: which weights sit on the device in each stage (text encoding, denoising, decoding) under
  each strategy, following backends/memory.py's mechanisms.

The device's free memory is the caller's business (the backend knows the device): `plan()` takes a budget.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
import math
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contentv.config import MemoryConfig, ModelConfig, RunConfig, SamplingConfig, parse_dtype, resolve_sampling
from contentv.errors import ConfigError

log = logging.getLogger(__name__)

GiB = 2**30
# A strategy fits when its predicted peak is at most (1 - MARGIN) * budget (allocator fragmentation,
# kernel workspaces and the estimate's own error).
MARGIN = 0.05
# Host RAM of the process itself (interpreter, torch, diffusers, CUDA/CANN host-side state); a placeholder
# until measured on the target machines.
BASE_HOST_BYTES = int(2.5 * GiB)
# Layers kept in full precision when quantizing. Must equal backends/memory.py's QUANT_SKIP (a test checks):
# bnb/torchao skip a Linear when any dotted part of its name is listed; fp8 adds them as regexes.
QUANT_SKIP = ("proj_out", "norm_out", "time_text_embed", "pos_embed", "context_embedder", "norm", "shared")
# fp8 layerwise casting also leaves these layer classes alone (backends/memory.py's skip_modules_classes).
FP8_SKIP_CLASSES: tuple[type[nn.Module], ...] = (nn.Embedding,)
STAGES = ("text_encoding", "denoising", "decoding")

# Relative time (1.0 = everything resident, no quantization). These are the published anchors of
# /work/shared/PERFORMANCE.md (diffusers' offloading run, Flux int8/fp8 on an H100, mmgp), to be replaced by
# ratios measured on ContentV-8B with the benchmarks. Offload overheads are for one forward per step;
# sequential guidance runs two, so the weight traffic (the overhead) doubles under block/layer offload.
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

# Family -> module with `components_on_meta` and `workload`, until ModelSpec carries them.
ARCHITECTURES = {
    "contentv": "contentv.models.contentv.architecture",
    "cogvideox": "contentv.models.cogvideox.architecture",
}
# Latent (h, w) at which the VAE decode is traced; the result is scaled by pixel count.
TRACE_LATENT = (6, 8)
DEFAULT_DECODE_TRACE_FRAMES = 5


# ------------------------------------------------------------------------------------------ family hooks


@dataclass(frozen=True)
class Workload:
    """What one generation processes, as the memory model needs it."""

    video_tokens: int  # transformer tokens of one video
    text_tokens: int  # text tokens joined to them (0 for cross-attention-only models)
    latent: tuple[int, int, int, int]  # (C, T, h, w) of one video's latents
    text_lengths: dict[str, int]  # text encoder -> tokens per prompt
    text_encoder_order: tuple[str, ...] = ()  # call order of the text encoders for one prompt
    decode_trace_frames: int = DEFAULT_DECODE_TRACE_FRAMES  # latent frames traced (the causal cache full)
    ff_mult: float = 4.0  # feed-forward width / model width
    # (B, N, dim) tensors alive at a block's feed-forward peak besides the FF's own (see activation_bytes).
    block_live: float = 4.0


def local_config_folder(path: str | None, probe: str, revision: str | None = None) -> Path | None:
    """The local folder holding `path`'s config files: `path` itself, or its snapshot in the local hub
    cache for a hub id (never the network); None if neither has `probe`."""
    if not path:
        return None
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder if (folder / probe).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, probe, revision=revision)
    except Exception:  # noqa: BLE001 - not a valid repo id, or no cache: nothing local
        return None
    if not isinstance(found, str):
        return None
    root = Path(found)
    for _ in Path(probe).parts:
        root = root.parent
    return root


def build_on_meta(library: str, class_name: str, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """Construct `library.class_name` from a config dict on the meta device, as its loader would.

    transformers models are constructed under the load dtype as default dtype (as `from_pretrained` does),
    so buffers made at construction get the same dtype as when loading; diffusers models in float32.
    """
    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(library), class_name)
    config = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")}
    is_transformers = cls.__module__.startswith("transformers.")
    old = torch.get_default_dtype()
    try:
        if is_transformers:
            torch.set_default_dtype(dtype)
        with torch.device("meta"), init_empty_weights(include_buffers=True):
            if is_transformers:
                module = cls(cls.config_class.from_dict(config))
            else:
                module = cls.from_config(config)
    finally:
        torch.set_default_dtype(old)
    return module.eval()


def _class_of(folder: Path, name: str, entry: list | None) -> tuple[str, str] | None:
    """(library, class) of a component subfolder from its own config (else model_index.json)."""
    config_file = folder / name / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if config.get("_class_name"):
        return "diffusers", config["_class_name"]
    if config.get("architectures"):
        return "transformers", config["architectures"][0]
    return (entry[0], entry[1]) if entry else None


def generic_components_on_meta(cfg: ModelConfig, path: str | None) -> dict[str, tuple[nn.Module, torch.dtype]]:
    """Components of any diffusers-layout checkpoint whose configs are local, built on the meta device.

    dtypes follow the families' loaders: text_encoder* in text_encoder_dtype (else dtype), vae in
    vae_dtype, everything else in dtype.
    """
    folder = local_config_folder(path, "model_index.json", cfg.revision)
    if folder is None:
        raise ConfigError(
            "model.path",
            path,
            f"a local checkpoint folder (or one in the local hub cache) for the memory plan: family "
            f"{cfg.family!r} has no built-in full-size configs",
        )
    index = json.loads((folder / "model_index.json").read_text())
    dtype = parse_dtype("model.dtype", cfg.dtype)
    te_dtype = parse_dtype("model.text_encoder_dtype", cfg.text_encoder_dtype) if cfg.text_encoder_dtype else dtype
    vae_dtype = parse_dtype("model.vae_dtype", cfg.vae_dtype)
    out = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        found = _class_of(folder, name, entry)
        if found is None:
            continue
        library, class_name = found
        cls = getattr(importlib.import_module(library), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue
        want = te_dtype if name.startswith("text_encoder") else vae_dtype if name == "vae" else dtype
        config = json.loads((folder / name / "config.json").read_text())
        out[name] = (build_on_meta(library, class_name, config, want), want)
    return out


def _config_get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


def generic_workload(components: dict[str, tuple[nn.Module, torch.dtype]], s: SamplingConfig) -> Workload:
    """Workload from diffusers-style transformer and VAE configs (CogVideoX-like video DiTs)."""
    tc = components["transformer"][0].config
    vc = components["vae"][0].config if "vae" in components else {}
    temporal = _config_get(vc, "scale_factor_temporal", "temporal_compression_ratio", default=4)
    block_out = _config_get(vc, "block_out_channels", default=None)
    spatial = _config_get(vc, "scale_factor_spatial", default=2 ** (len(block_out) - 1) if block_out else 8)
    p = _config_get(tc, "patch_size", default=2)
    pt = _config_get(tc, "patch_size_t", default=1)
    t = (s.num_frames - 1) // temporal + 1
    h, w = s.height // spatial, s.width // spatial
    text = _config_get(tc, "max_text_seq_length", default=s.max_sequence_length or 0)
    encoders = tuple(sorted(n for n in components if n.startswith("text_encoder")))
    return Workload(
        video_tokens=math.ceil(t / pt) * (h // p) * (w // p),
        text_tokens=text,
        latent=(_config_get(tc, "in_channels", default=16), t, h, w),
        text_lengths={n: s.max_sequence_length or text or 77 for n in encoders},
        text_encoder_order=encoders,
    )


def family_hooks(family: str) -> tuple[Callable, Callable]:
    """(components_on_meta, workload) of a model family: its ModelSpec's, its module's, or the generic ones."""
    from contentv.registry import FAMILIES, get_spec

    spec = get_spec(family)
    sources: list[Any] = [spec, importlib.import_module(FAMILIES[family])]
    if family in ARCHITECTURES:
        sources.append(importlib.import_module(ARCHITECTURES[family]))

    def find(name: str, default: Callable) -> Callable:
        for source in sources:
            fn = getattr(source, name, None)
            if callable(fn):
                return fn
        return default

    return find("components_on_meta", generic_components_on_meta), find("workload", generic_workload)


# ------------------------------------------------------------------------------------------ weight bytes


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _is_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") or any(
        c.__module__.startswith("transformers.modeling_utils") for c in type(module).__mro__
    )


def _keep_fp32(module: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Whether a state-dict entry stays float32 when the component loads in `dtype` (the loaders' rules)."""
    if _is_transformers(module):
        # transformers: _keep_in_fp32_modules for fp16 only; the _strict list for fp16 and bf16; glob search.
        names = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
        patterns = [re.compile(re.escape(n).replace(r"\*", ".*")) for n in names]
        return lambda key: dtype != torch.float32 and any(p.search(key) for p in patterns)
    # diffusers: _keep_in_fp32_modules for any dtype, matched against dotted name parts.
    names = set(getattr(type(module), "_keep_in_fp32_modules", None) or ())
    return lambda key: any(n in key.split(".") for n in names)


def _skip_parts(module: nn.Module) -> tuple[str, ...]:
    return QUANT_SKIP + tuple(getattr(module, "_keep_in_fp32_modules", None) or ())


def _quantizable(name: str, module: nn.Module, skip: tuple[str, ...]) -> bool:
    # backends/memory.py's rule: plain nn.Linear, no dotted name part in the skip list.
    return type(module) is nn.Linear and not any(part in skip for part in name.split("."))


def _fp8_layers(module: nn.Module) -> list[nn.Module]:
    """Layers diffusers' layerwise casting stores in fp8, with backends/memory.py's skip patterns."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = tuple(dict.fromkeys(DEFAULT_SKIP_MODULES_PATTERN + _skip_parts(module)))
    if hasattr(module, "enable_layerwise_casting"):  # ModelMixin adds its class patterns
        patterns += tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
        patterns += tuple(getattr(module, "_skip_layerwise_casting_patterns", None) or ())
    found: list[nn.Module] = []

    def walk(m: nn.Module, prefix: str) -> None:
        if isinstance(m, FP8_SKIP_CLASSES) or any(re.search(p, prefix) for p in patterns):
            return
        if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            found.append(m)
            return
        for name, child in m.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(module, "")
    return found


def _nf4_bytes(numel: int) -> int:
    # bitsandbytes Params4bit (blocksize 64, compress_statistics=True): packed 4-bit data, uint8 absmax per
    # block, its fp32 absmax per 256 blocks, the 256-entry fp32 code of the nested state, the 16-entry NF4
    # code and an fp32 offset. The state's tensors travel with the layer (one copy per layer on the device).
    blocks = math.ceil(numel / 64)
    return (numel + 1) // 2 + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 16 * 4 + 4


def tensor_bytes(module: nn.Module, dtype: torch.dtype, quantization: str = "none") -> dict[int, int]:
    """id(tensor) -> bytes it takes once loaded in `dtype` and quantized; one entry per unique tensor.

    Parameters and persistent buffers: floating ones in `dtype` (float32 where the loader keeps them so),
    others as built. Non-persistent buffers: as built (loaders don't cast them). A quantized Linear's
    weight entry also holds its scales (bnb int8: fp32 row scales; nf4: absmax and codes; torchao int8:
    fp32 row scale and int8 zero point).
    """
    keep = _keep_fp32(module, dtype)
    out: dict[int, int] = {}
    persistent = module.state_dict(keep_vars=True)
    for key, t in persistent.items():
        if id(t) in out:
            continue
        want = (torch.float32 if keep(key) else dtype) if t.is_floating_point() else t.dtype
        out[id(t)] = t.numel() * want.itemsize
    for t in module.buffers():
        out.setdefault(id(t), t.numel() * t.dtype.itemsize)
    if quantization == "none":
        return out
    if quantization == "fp8":
        for layer in _fp8_layers(module):
            for t in [*layer.parameters(), *layer.buffers()]:
                if t.is_floating_point():
                    out[id(t)] = t.numel()  # float8_e4m3fn: 1 byte
        return out
    skip = _skip_parts(module)
    for name, m in module.named_modules():
        if not _quantizable(name, m, skip):
            continue
        w = m.weight
        rows, n = w.shape[0], w.numel()
        if quantization == "bnb_int8":
            out[id(w)] = n + rows * 4  # int8 rows + fp32 row scales (SCB)
        elif quantization == "bnb_nf4":
            out[id(w)] = _nf4_bytes(n)
        elif quantization == "torchao_int8":
            out[id(w)] = n + rows * 4 + rows  # torchao Int8Tensor: int8 data, fp32 row scale, int8 zero point
        else:
            raise ConfigError("memory.quantization", quantization, ("none", *QUANT_TIME))
    return out


def weight_bytes(module: nn.Module, dtype: torch.dtype, quantization: str = "none") -> int:
    """Exact bytes of one component's parameters and buffers once loaded in `dtype` and quantized."""
    return sum(tensor_bytes(module, dtype, quantization).values())


def _sum(module: nn.Module, sizes: dict[int, int], recurse: bool = True) -> int:
    tensors = _unique([*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)])
    return sum(sizes.get(id(t), 0) for t in tensors)


def _block_groups(module: nn.Module, sizes: dict[int, int], per_group: int) -> tuple[int, int]:
    """diffusers block-level group offload: (largest group of `per_group` blocks, the rest of the model)."""
    groups, in_groups = [], 0
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            for i in range(0, len(child), per_group):
                groups.append(sum(_sum(b, sizes) for b in child[i : i + per_group]))
            in_groups += sum(_sum(b, sizes) for b in child)
    return max(groups, default=0), sum(sizes.values()) - in_groups


def _leaf_groups(module: nn.Module, sizes: dict[int, int]) -> tuple[int, int]:
    """diffusers leaf-level group offload: (largest leaf layer, weights outside leaf layers)."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    leaves = [m for m in module.modules() if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS)]
    largest = max((_sum(m, sizes) for m in leaves), default=0)
    in_leaves = sum(sizes.get(id(t), 0) for t in _unique(t for m in leaves for t in [*m.parameters(), *m.buffers()]))
    return largest, sum(sizes.values()) - in_leaves


def _largest_direct(module: nn.Module, sizes: dict[int, int]) -> int:
    """accelerate's sequential offload moves each module's own parameters when it runs: the largest set."""
    return max((_sum(m, sizes, recurse=False) for m in module.modules()), default=0)


# ------------------------------------------------------------------------------------------ activations


def activation_bytes(
    *,
    batch: int,
    video_tokens: int,
    text_tokens: int,
    dim: int,
    ff_dim: int,
    dtype: torch.dtype,
    heads: int = 1,
    live: float = 4.0,
    math_attention: bool = False,
    attention_chunk: int = 0,
) -> int:
    """Peak transient bytes of one DiT forward over `batch` sequences of video + text tokens, width `dim`.

    Live-tensor model of one block (inference, no autograd), in units of one (B, N, dim) tensor:
    - feed-forward peak: `live` units - the block input (held by the caller), the residual after attention,
      the gated attention output, the modulated norm output - plus the FF up-projection (ff_dim) and its GELU
      output (ff_dim): live + 2 * ff_dim / dim units (12 at ff_dim = 4 * dim).
    - attention peak: input, norm output, q, k, v, kernel output and its (B, S, H*D) copy: 7 units, plus the
      kernel's workspace: O(N) for flash / memory-efficient SDPA (an fp32 logsumexp per query and head),
      O(N^2) for the math kernel (scores and softmax, per query chunk under attention slicing).
    Checked against a meta-device trace of the real blocks (tests/test_planner.py).
    """
    n = video_tokens + text_tokens
    unit = batch * n * dim * dtype.itemsize
    ff_peak = unit * (live + 2 * ff_dim / dim)
    if math_attention:
        q = min(attention_chunk or n, n)
        workspace = 2 * batch * heads * q * n * dtype.itemsize
    else:
        workspace = batch * heads * n * 4
    return int(max(ff_peak, 7 * unit + workspace))


def text_encoder_activation_bytes(module: nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """Peak transient bytes of one text encoder forward (one prompt): hidden states, FF and attention scores."""
    c = module.config
    d = _config_get(c, "hidden_size", "d_model", default=1024)
    ff = _config_get(c, "intermediate_size", "d_ff", default=4 * d)
    heads = _config_get(c, "num_attention_heads", "num_heads", default=1)
    s = dtype.itemsize
    # residual, norm, q, k, v, output + gated FF (two ff-wide inputs and their product) + fp32 scores/softmax/bias
    return int(tokens * (6 * d + 3 * ff) * s + 3 * heads * tokens * tokens * 4)


class LiveBytes:
    """Counts the bytes of tensors alive during a computation on the meta device; `peak` is the maximum.

    A TorchDispatchMode sees every op's outputs; a storage is counted from the op that creates it until the
    last tensor viewing it is garbage. Tensors that existed before (weights, inputs) are not counted.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {
                    a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
                }
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        counter._track(t, inputs)
                return out

        self._mode = _Mode()
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors viewing it]
        self.current = 0
        self.peak = 0

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        key = t.untyped_storage()._cdata
        entry = self.live.get(key)
        if entry is None:
            if key in inputs:  # a view or in-place result of an uncounted tensor
                return
            entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __enter__(self) -> LiveBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def _vae_trace(vae: nn.Module, dtype: torch.dtype, latent: tuple[int, int, int, int]) -> int:
    """Peak bytes alive while `vae` decodes one (C, T, h, w) latent on the meta device."""
    z = torch.empty(1, *latent, device="meta", dtype=dtype)
    with LiveBytes() as live, torch.no_grad():
        vae.decode(z)
    return live.peak


_DECODE_CACHE: dict[str, int] = {}


def decode_bytes(
    vae: nn.Module, dtype: torch.dtype, latent: tuple[int, int, int, int], trace_frames: int
) -> tuple[int, int]:
    """(peak device bytes of one video's VAE decode and post-processing, the same with spatial tiling).

    The real decoder runs on meta tensors at a small latent size (TRACE_LATENT) and `trace_frames` latent
    frames (enough for its causal cache to be full); the peak is scaled by pixel count, plus the decoded
    frames of the remaining latent frames (kept while the next chunks decode). Post-processing holds the
    video and two temporaries. Tiling: one tile's features (same bytes per pixel), plus every decoded tile
    (overlaps included), the blended rows and the output, kept until the end.
    """
    c, t, h, w = latent
    hs, ws = min(h, TRACE_LATENT[0]), min(w, TRACE_LATENT[1])
    ft = min(trace_frames, t)
    config = json.dumps(dict(vae.config), sort_keys=True, default=str)
    key = f"{type(vae).__name__}|{config}|{dtype}|{c}x{ft}x{hs}x{ws}"
    if key not in _DECODE_CACHE:
        built = next(vae.parameters()).dtype
        # nn.Module.to: ModelMixin.to() warns about fp32 modules; a copy keeps the caller's module as built.
        traced = vae if built == dtype else nn.Module.to(copy.deepcopy(vae), dtype)
        _DECODE_CACHE[key] = _vae_trace(traced, dtype, (c, ft, hs, ws))
    spatial, temporal = vae_factors(vae)
    H, W = h * spatial, w * spatial
    frame = 3 * H * W * dtype.itemsize  # one decoded RGB frame
    out = ((t - 1) * temporal + 1) * frame  # the decoded video
    features = _DECODE_CACHE[key] * (h * w) / (hs * ws)
    plain = int(max(features + (t - ft) * temporal * frame, 3 * out))

    # Tiled: tile size and stride from the VAE's own settings (diffusers' attribute names).
    th, tw = getattr(vae, "tile_sample_min_height", None), getattr(vae, "tile_sample_min_width", None)
    if not th or not tw or (H <= th and W <= tw):
        return plain, plain
    sh = getattr(vae, "tile_sample_stride_height", None) or th * (1 - getattr(vae, "tile_overlap_factor_height", 0.25))
    sw = getattr(vae, "tile_sample_stride_width", None) or tw * (1 - getattr(vae, "tile_overlap_factor_width", 0.25))
    tiles_h = sum(min(th, H - y) for y in range(0, H, max(1, int(sh))))
    tiles_w = sum(min(tw, W - x) for x in range(0, W, max(1, int(sw))))
    tiles = out * (tiles_h * tiles_w) / (H * W)
    tile_features = features * (th * tw) / (H * W)
    tiled = int(max(tile_features + tiles, tiles + 3 * out))
    return plain, min(plain, tiled)


def vae_factors(vae: nn.Module) -> tuple[int, int]:
    """(spatial, temporal) compression of a diffusers video VAE, from its config."""
    c = vae.config
    down = _config_get(c, "temperal_downsample", default=None)
    blocks = _config_get(c, "block_out_channels", default=None)
    spatial = _config_get(c, "scale_factor_spatial", default=None) or (
        2 ** len(down) if down is not None else 2 ** (len(blocks) - 1) if blocks else 8
    )
    temporal = _config_get(c, "scale_factor_temporal", "temporal_compression_ratio", default=None) or (
        2 ** sum(down) if down is not None else 4
    )
    return int(spatial), int(temporal)


# ------------------------------------------------------------------------------------------ strategies


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


@dataclass
class Plan:
    model: str
    sampling: SamplingConfig
    guidance: str  # batched | sequential | none
    weights: dict[str, int]  # component -> bytes as loaded (no quantization)
    activations: dict[str, int]  # denoising (batched / sequential), text encoding, decoding (plain / tiled)
    strategies: list[Strategy]
    budget_bytes: int | None = None
    chosen: Strategy | None = None
    source: str = ""  # where the component configs came from


def load_presets(conf_dir: Path) -> dict[str, MemoryConfig]:
    """Every conf/memory/*.yaml preset (Hydra `defaults` of the same group are merged), plus `none`.

    `auto` is the planner itself, not a strategy.
    """
    from omegaconf import OmegaConf

    folder = Path(conf_dir) / "memory"

    def node(name: str, chain: tuple[str, ...]) -> Any:
        if name in chain:
            raise ConfigError("memory", name, f"a preset without a defaults cycle ({' -> '.join((*chain, name))})")
        path = folder / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError("memory", name, f"a preset in {folder}")
        raw = OmegaConf.load(path)
        defaults = list(raw.pop("defaults", []) or [])
        parts = []
        for item in defaults:
            if item == "_self_":
                parts.append(raw)
            elif isinstance(item, str):
                parts.append(node(item.split("/")[-1], (*chain, name)))
            else:
                raise ConfigError("memory", name, "a defaults list of preset names")
        if not any(p is raw for p in parts):
            parts.append(raw)  # Hydra >= 1.1: _self_ last unless placed
        return OmegaConf.merge(*parts)

    presets: dict[str, MemoryConfig] = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.stem == "auto":
            continue
        try:
            merged = OmegaConf.merge(OmegaConf.structured(MemoryConfig), node(path.stem, ()))
            memory = OmegaConf.to_object(merged)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken preset is a config error naming its file
            raise ConfigError("memory", path.stem, f"a valid preset ({path}: {exc})") from exc
        memory.name = path.stem
        presets[path.stem] = memory
    presets.setdefault("none", MemoryConfig(name="none"))
    return presets


def text_encoder_mode(memory: MemoryConfig) -> str:
    """backends/memory.py's rule: offload under model/sequential offload; auto -> release under group offload."""
    if memory.model_cpu_offload or memory.sequential_cpu_offload:
        return "offload"
    if memory.text_encoders == "auto":
        return "release" if memory.group_offload else "device"
    return memory.text_encoders


def guidance_of(memory: MemoryConfig, sampling: SamplingConfig) -> str:
    """batched | sequential | none (guidance_scale <= 1 runs one pass); auto means batched."""
    if (sampling.guidance_scale or 0) <= 1:
        return "none"
    return "batched" if memory.guidance_mode == "auto" else memory.guidance_mode


def relative_time(memory: MemoryConfig, guidance: str, streams: bool = True) -> float:
    """Relative time of a strategy from the anchors above (1.0 = everything resident)."""
    if memory.sequential_cpu_offload:
        placement = "sequential_cpu_offload"
    elif memory.model_cpu_offload:
        placement = "model_cpu_offload"
    elif memory.group_offload:
        placement = "group_offload_stream" if memory.group_offload_stream and streams else "group_offload"
    else:
        placement = "device"
    t = PLACEMENT_TIME[placement]
    if guidance == "sequential" and placement in ("group_offload_stream", "group_offload", "sequential_cpu_offload"):
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
class _Model:
    """Everything strategy-independent: the components on meta and the workload's activation sizes."""

    components: dict[str, tuple[nn.Module, torch.dtype]]
    workload: Workload
    sampling: SamplingConfig
    math_attention: bool
    _sizes: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)

    def sizes(self, name: str, quantization: str) -> dict[int, int]:
        key = (name, quantization)
        if key not in self._sizes:
            module, dtype = self.components[name]
            self._sizes[key] = tensor_bytes(module, dtype, quantization)
        return self._sizes[key]

    def bytes(self, name: str, quantization: str = "none") -> int:
        return sum(self.sizes(name, quantization).values())

    def denoise_bytes(self, batch: int, attention_chunk: int) -> int:
        module, dtype = self.components["transformer"]
        c = module.config
        dim = _config_get(c, "num_attention_heads", default=1) * _config_get(c, "attention_head_dim", default=64)
        wl = self.workload
        act = activation_bytes(
            batch=batch,
            video_tokens=wl.video_tokens,
            text_tokens=wl.text_tokens,
            dim=dim,
            ff_dim=int(wl.ff_mult * dim),
            dtype=dtype,
            heads=_config_get(c, "num_attention_heads", default=1),
            live=wl.block_live,
            math_attention=self.math_attention,
            attention_chunk=attention_chunk,
        )
        return act + self.resident_tensors(batch)

    def resident_tensors(self, batch: int) -> int:
        """Latents, noise predictions, scheduler temporaries and prompt embeddings kept across steps."""
        _, dtype = self.components["transformer"]
        latent = math.prod(self.workload.latent) * dtype.itemsize
        width = _config_get(
            self.components["transformer"][0].config, "joint_attention_dim", "text_embed_dim", default=4096
        )
        embeds = 2 * self.workload.text_tokens * width * dtype.itemsize
        return 4 * batch * latent + embeds

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


def _predict(model: _Model, memory: MemoryConfig, guidance: str, streams: bool) -> Strategy:
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
        "denoising": model.denoise_bytes(batch, memory.attention_slicing),
        "decoding": model.decode()[1 if memory.vae_tiling else 0] + model.resident_tensors(1),
    }
    use_stream = memory.group_offload_stream and streams
    pinned = 0  # pinned host copies made beside the loaded weights (freed, the loaded ones, after a first pass)

    if memory.sequential_cpu_offload:
        # accelerate moves each module's own weights to the device when it runs; buffers stay there.
        def largest(group: list[str]) -> int:
            return max((_largest_direct(model.components[n][0], model.sizes(n, quant[n])) for n in group), default=0)

        buffers = sum(_sum_buffers(model.components[n][0], model.sizes(n, quant[n])) for n in names)
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
            group, rest = _block_groups(model.components["transformer"][0], sizes, memory.group_offload_blocks)
            busy_transformer = rest + group * (2 if use_stream else 1)  # running block + the one prefetched
            idle_transformer = 0
            pinned += w["transformer"] if use_stream else 0
        else:
            busy_transformer = idle_transformer = w.get("transformer", 0)
        if mode == "device":
            te_idle = te_busy = te_all
        elif mode == "offload":  # leaf-level group offload of each text encoder
            leaves = [_leaf_groups(model.components[n][0], model.sizes(n, quant[n])) for n in te]
            te_idle = 0
            te_busy = max((outside + leaf * (2 if use_stream else 1) for leaf, outside in leaves), default=0)
            pinned += te_all if use_stream else 0
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
    stage_bytes = {s: int(resident[s] + act[s]) for s in STAGES}
    full = sum(model.bytes(n) for n in names)  # loading reads every weight at full precision first
    return Strategy(
        name=memory.name,
        memory=memory,
        device_bytes=max(stage_bytes.values()),
        stage_bytes=stage_bytes,
        host_bytes=int(host + BASE_HOST_BYTES),
        host_peak_bytes=int(max(host + pinned, full) + BASE_HOST_BYTES),
        time=relative_time(memory, guidance, streams),
    )


def _sum_buffers(module: nn.Module, sizes: dict[int, int]) -> int:
    # accelerate's sequential offload keeps buffers on the device (offload_buffers=False).
    return sum(sizes.get(id(t), 0) for t in _unique(module.buffers()))


# ------------------------------------------------------------------------------------------ the plan


_COMPONENTS: dict[str, dict[str, tuple[nn.Module, torch.dtype]]] = {}


def budget_from(memory: MemoryConfig, budget_bytes: int | None) -> int | None:
    """memory.budget_gb (GiB, as cards are sold: a "16 GB" card has 16 GiB) wins over the caller's figure."""
    if memory.budget_gb is not None:
        if memory.budget_gb <= 0:
            raise ConfigError("memory.budget_gb", memory.budget_gb, "a positive number of GB (or null)")
        return int(memory.budget_gb * GiB)
    return budget_bytes


def plan(
    cfg: RunConfig,
    conf_dir: Path,
    budget_bytes: int | None = None,
    *,
    streams: bool = True,
    math_attention: bool = False,
    check: Callable[[MemoryConfig], None] | None = None,
) -> Plan:
    """Predict every memory preset in `conf_dir`/memory (plus `none`) for this run; choose the fastest that fits.

    The budget is `memory.budget_gb` if set, else `budget_bytes` (the device's free memory, from the
    backend); None means no choice is made (the table only). `streams`: the backend can prefetch offloaded
    blocks on a side stream. `check(memory)` may raise ConfigError for presets the backend can't run
    (backends.memory.check); such rows are shown and never chosen. Raises ConfigError naming
    memory.budget_gb when nothing fits. No weights are loaded.
    """
    spec_components, spec_workload = family_hooks(cfg.model.family)
    from contentv.registry import get_spec

    spec = get_spec(cfg.model.family)
    sampling = resolve_sampling(cfg.sampling, cfg.model)
    # The prompt doesn't change memory: a dry run may have none.
    spec.validate(dataclasses.replace(sampling, prompt=sampling.prompt or "dry run"))
    path = spec.resolve_path(cfg.model)
    m = cfg.model
    key = json.dumps([m.family, path, m.dtype, m.vae_dtype, m.text_encoder_dtype, m.revision])
    if key not in _COMPONENTS:
        _COMPONENTS.clear()  # one model at a time: meta modules hold no storage, but many Python objects
        _COMPONENTS[key] = spec_components(cfg.model, path)
    components = _COMPONENTS[key]
    model = _Model(components, spec_workload(components, sampling), sampling, math_attention)
    budget = budget_from(cfg.memory, budget_bytes)

    presets = load_presets(conf_dir)
    if cfg.memory.name not in ("auto", *presets) or (
        cfg.memory.name in presets and _differs(cfg.memory, presets[cfg.memory.name])
    ):
        presets[f"{cfg.memory.name} (as configured)"] = cfg.memory
    default_quantize = list(getattr(spec, "quantize_default", ("transformer",)))
    strategies = []
    for name, memory in presets.items():
        guidance = guidance_of(memory, sampling)
        try:
            if check is not None:
                check(memory)
            # memory.quantize null = the family's default components (as Backend.prepare resolves it)
            resolved = memory if memory.quantize is not None else dataclasses.replace(memory, quantize=default_quantize)
            strategy = _predict(model, resolved, guidance, streams)
            strategy.memory = memory
        except ConfigError as exc:
            strategy = Strategy(name=name, memory=memory, error=str(exc), time=math.inf)
        strategy.name = name
        if budget is not None and not strategy.error:
            strategy.fits = strategy.device_bytes <= (1 - MARGIN) * budget
        strategies.append(strategy)
    strategies.sort(key=lambda s: (s.time, s.device_bytes))

    guidance = guidance_of(cfg.memory if cfg.memory.name != "auto" else MemoryConfig(), sampling)
    plain, tiled = model.decode()
    result = Plan(
        model=cfg.model.name,
        sampling=sampling,
        guidance=guidance,
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
        source=str(path)
        if local_config_folder(path, "model_index.json", m.revision)
        else f"the built-in configs ({path})",
    )
    if budget is not None:
        fitting = [s for s in strategies if s.fits]
        if not fitting:
            runnable = [s for s in strategies if not s.error]
            smallest = min(runnable, key=lambda s: s.device_bytes) if runnable else None
            need = f"{smallest.device_bytes / (1 - MARGIN) / GiB:.1f}" if smallest else "?"
            raise ConfigError(
                "memory.budget_gb",
                round(budget / GiB, 2),
                f"at least {need} (GiB) for {cfg.model.name} at {sampling.height}x{sampling.width}, "
                f"{sampling.num_frames} frames: the smallest predicted peak is "
                + (f"{smallest.device_bytes / GiB:.2f} GiB ({smallest.name})" if smallest else "unknown")
                + "; fewer frames or a smaller size lower it",
            )
        result.chosen = fitting[0]
    return result


def _differs(a: MemoryConfig, b: MemoryConfig) -> bool:
    skip = {"name", "budget_gb"}
    return any(getattr(a, f.name) != getattr(b, f.name) for f in dataclasses.fields(MemoryConfig) if f.name not in skip)


def format_plan(p: Plan) -> str:
    """The plan as a table: strategy, predicted peak device memory (and per stage), host RAM, relative time, fits."""
    s = p.sampling
    lines = [
        f"memory plan: {p.model}, {s.height}x{s.width}, {s.num_frames} frames, guidance {p.guidance}; "
        f"configs from {p.source}; no weights loaded",
        "weights GiB:     " + ", ".join(f"{n} {v / GiB:.2f}" for n, v in p.weights.items()),
        "activations GiB: " + ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in p.activations.items()),
        "",
    ]
    fits = f"fits {p.budget_bytes / GiB:.1f} GiB" if p.budget_bytes is not None else "fits"
    width = max([len("strategy"), *(len(x.name) for x in p.strategies)])
    header = (
        f"{'strategy':<{width}}  {'peak GiB':>8}  {'text':>6}  {'denoise':>7}  {'decode':>6}  "
        f"{'host GiB':>8}  {'host peak':>9}  {'rel. time':>9}  {fits}"
    )
    lines += [header, "-" * len(header)]
    for x in p.strategies:
        if x.error:
            lines.append(f"{x.name:<{width}}  unavailable: {x.error}")
            continue
        st = [x.stage_bytes[k] / GiB for k in STAGES]
        verdict = "-" if x.fits is None else ("yes" if x.fits else "no")
        lines.append(
            f"{x.name:<{width}}  {x.device_bytes / GiB:8.2f}  {st[0]:6.2f}  {st[1]:7.2f}  {st[2]:6.2f}  "
            f"{x.host_bytes / GiB:8.2f}  {x.host_peak_bytes / GiB:9.2f}  {x.time:9.2f}  {verdict}"
            + ("  <- chosen" if p.chosen is x else "")
        )
    lines += [
        "",
        "peak = max over stages (text encoding, denoising, decoding) of resident weights + activations; "
        f"fits = peak <= {1 - MARGIN:.0%} of the budget.",
        "host GiB = RAM while generating (weights kept on the CPU, pinned copies, process); host peak includes "
        "loading. rel. time: published anchors (PERFORMANCE.md), 1.00 = all resident.",
    ]
    if p.chosen is not None:
        lines.append(f"chosen: {p.chosen.name}")
    return "\n".join(lines)
