"""What every model family shares: the meta-device description the planner reads, the T5-XXL encoder
config, and the pipelines' stage and text-encoder placement plumbing.

A family's folder describes itself with these (its `architecture.py` builds components on the meta device
and says what one video costs as a `Workload`); the planner reads that through the registry and never the
reverse, so nothing in a model folder imports the planner.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contentv.config import ModelConfig, SamplingConfig, parse_dtype
from contentv.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where components are built or placed: pre-flight checks stay light
    import torch
    from torch import nn

StageContext = Callable[[str], contextlib.AbstractContextManager]
# Latent frames a VAE decode is traced with when a family doesn't say (its causal cache full by then).
DEFAULT_DECODE_TRACE_FRAMES = 5

# T5-v1.1-XXL, encoder only: ContentV's text_encoder_3 and CogVideoX's text_encoder (SD3's config.json).
T5_XXL: dict[str, Any] = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    tie_word_embeddings=False,
    is_encoder_decoder=False,
    use_cache=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


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
    # (B, N, dim) tensors alive at a block's feed-forward peak besides the FF's own (planner.activations).
    block_live: float = 4.0
    # Elements of per-shape tables the model keeps on the device while denoising (ContentV: its 3-D sin-cos
    # position table, video_tokens x dim), in the transformer's dtype.
    table_elements: int = 0


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


def read_config(folder: Path, name: str, file: str = "config.json") -> dict[str, Any]:
    """`<folder>/<name>/<file>` parsed with limits (size, nesting, counts; contentv.untrusted): a config that lies
    is one ConfigError line naming model.path, not a RecursionError or a build of 100,000 layers."""
    from contentv import untrusted
    from contentv.checkpoint_limits import check_counts

    rel = f"{name}/{file}" if name else file

    def fail(problem: str) -> ConfigError:
        return ConfigError("model.path", str(folder), problem)

    try:
        data = untrusted.load_file(Path(folder) / name / file)
    except (OSError, ValueError) as exc:
        raise fail(f"{rel} {untrusted.why(exc)}") from exc
    if not isinstance(data, dict):
        raise fail(f"{rel} is not a JSON object")
    check_counts(data, None, fail, rel)
    return data


def build_on_meta(library: str, class_name: str, config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """Construct `library.class_name` from a config dict on the meta device, as its loader would.

    transformers models are constructed under the load dtype as default dtype (as `from_pretrained` does),
    so buffers made at construction get the same dtype as when loading; diffusers models in float32.
    """
    import torch
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


# ------------------------------------------------------------------------------------------ any diffusers checkpoint


def _class_of(folder: Path, name: str, entry: list | None) -> tuple[str, str] | None:
    """(library, class) of a component subfolder from its own config (else model_index.json)."""
    config_file = folder / name / "config.json"
    if not config_file.is_file():
        return None
    config = read_config(folder, name)
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
    index = read_config(folder, "", "model_index.json")
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
        if not (isinstance(cls, type) and issubclass(cls, _module_class())):
            continue
        want = te_dtype if name.startswith("text_encoder") else vae_dtype if name == "vae" else dtype
        config = read_config(folder, name)
        out[name] = (build_on_meta(library, class_name, config, want), want)
    return out


def generic_workload(components: dict[str, tuple[nn.Module, torch.dtype]], s: SamplingConfig) -> Workload:
    """Workload from diffusers-style transformer and VAE configs (CogVideoX-like video DiTs)."""
    tc = components["transformer"][0].config
    vc = components["vae"][0].config if "vae" in components else {}
    temporal = config_get(vc, "scale_factor_temporal", "temporal_compression_ratio", default=4)
    block_out = config_get(vc, "block_out_channels", default=None)
    spatial = config_get(vc, "scale_factor_spatial", default=2 ** (len(block_out) - 1) if block_out else 8)
    p = config_get(tc, "patch_size", default=2)
    pt = config_get(tc, "patch_size_t", default=1)
    t = (s.num_frames - 1) // temporal + 1
    h, w = s.height // spatial, s.width // spatial
    text = config_get(tc, "max_text_seq_length", default=s.max_sequence_length or 0)
    encoders = tuple(sorted(n for n in components if n.startswith("text_encoder")))
    return Workload(
        video_tokens=math.ceil(t / pt) * (h // p) * (w // p),
        text_tokens=text,
        latent=(config_get(tc, "in_channels", default=16), t, h, w),
        text_lengths={n: s.max_sequence_length or text or 77 for n in encoders},
        text_encoder_order=encoders,
    )


def config_get(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` set in a config (dict or object), else `default`."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


# ------------------------------------------------------------------------------------------ pipelines


def _module_class() -> type:
    from torch import nn

    return nn.Module


def null_stage(_name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class RuntimePlacement:
    """Pipeline mixin: where the backend says denoising and text encoding run (injected, never decided here).

    `execution_device`: where denoising runs (None = diffusers' inference from weights and hooks).
    `text_encoder_placement`: "resident" | "release" (onto the device for encoding, back to the host after)
    | "cpu" (encode on the host, move the embeddings).
    """

    execution_device: torch.device | None = None
    text_encoder_placement: str = "resident"

    @property
    def _execution_device(self) -> torch.device:
        return self.execution_device or super()._execution_device

    def text_encoder_modules(self) -> list[nn.Module]:
        names = [n for n in self.components if n.startswith("text_encoder")]
        return [m for n in sorted(names) if isinstance(m := getattr(self, n, None), _module_class())]

    @contextlib.contextmanager
    def _text_encoding_device(self, device: torch.device) -> Iterator[torch.device]:
        """Yield the device text encoding runs on, placing the encoders per `text_encoder_placement`."""
        import torch

        placement = self.text_encoder_placement
        if placement == "cpu":
            yield torch.device("cpu")
            return
        if placement == "release":
            for module in self.text_encoder_modules():
                module.to(device)
        try:
            yield device
        finally:
            if placement == "release":
                for module in self.text_encoder_modules():
                    module.to("cpu")


# ------------------------------------------------------------------------------------------ loading

# diffusers' DiffusionPipeline.from_pretrained arguments passed on to every component's loader.
HUB_ARGS = ("revision", "local_files_only", "cache_dir", "token", "force_download", "proxies")
# ... and to the weight-bearing components only (device_map: one device, named as torch names it, for every component).
WEIGHT_ARGS = ("device_map", "max_memory", "offload_folder", "low_cpu_mem_usage")
# diffusers' other loader arguments: refused with the reason, in one line.
UNSUPPORTED_ARGS = {
    "quantization_config": "quantize with the runtime (memory.quantization) or pass quantized components by name",
    "custom_pipeline": "these pipelines run no code from a checkpoint",
    "custom_revision": "these pipelines run no code from a checkpoint",
    "from_flax": "only safetensors weights are loaded",
    "use_onnx": "only safetensors weights are loaded",
    "dduf_file": "load the unpacked folder",
    "output_loading_info": "from_pretrained returns the pipeline only",
    "parallel_config": "context parallelism is set up by the runtime (parallel=ulysses or ring)",
}
VARIANT_MISSING = (
    "You are trying to load the model files of the `variant={variant}`, but no such modeling files are "
    "available in {path} (diffusers' wording); leave variant out to load the default weights"
)


@dataclass
class LoadArgs:
    """A pipeline's from_pretrained arguments sorted out once: per-component dtypes, hub and weight options."""

    path: str
    dtypes: dict[str, Any]  # component -> torch dtype, or the "default" key
    hub: dict[str, Any]  # to tokenizers and schedulers (and models)
    weights: dict[str, Any]  # to models (safetensors only)
    given: dict[str, Any]  # components passed by name, used as given
    variant: str | None = None

    def dtype(self, name: str, override: Any = None) -> torch.dtype:
        """The dtype `name` loads in: an explicit per-component argument, else torch_dtype's (dict or one dtype)."""
        import torch

        if override is not None:
            return override
        return self.dtypes.get(name, self.dtypes.get("default", torch.float32))

    def model_kwargs(self, name: str, override: Any = None) -> dict[str, Any]:
        """Keyword arguments for a model component's from_pretrained (subfolder, dtype, hub, variant)."""
        kw = {"subfolder": name, "dtype": self.dtype(name, override), **self.weights}
        if self.variant and has_variant(self.path, name, self.variant) is not False:
            kw["variant"] = self.variant  # a local component without the variant loads its default files
        return kw


def parse_load_args(
    cls_name: str, path: str, components: tuple[str, ...], torch_dtype: Any, kwargs: dict[str, Any]
) -> LoadArgs:
    """Sort diffusers' from_pretrained arguments: components by name, hub and weight options, a variant, dtypes
    (one dtype, or a dict per component with "default", as diffusers takes it). Raises ValueError for what
    diffusers accepts but these pipelines refuse (naming why) and TypeError for unknown arguments."""
    import torch

    if torch_dtype is None:
        torch_dtype = kwargs.pop("dtype", None)
    kwargs.pop("dtype", None)
    if isinstance(torch_dtype, dict):
        unknown = sorted(set(torch_dtype) - {*components, "default"})
        if unknown:
            raise ValueError(f"torch_dtype: no component {unknown[0]!r}; keys are {', '.join(components)}, default")
        dtypes = dict(torch_dtype)
    else:
        dtypes = {"default": torch_dtype or torch.float32}
    given = {k: kwargs.pop(k) for k in components if k in kwargs}
    hub = {k: kwargs.pop(k) for k in HUB_ARGS if k in kwargs}
    weights = {**hub, **{k: kwargs.pop(k) for k in WEIGHT_ARGS if k in kwargs}}
    if kwargs.pop("use_safetensors", None) is False:
        raise ValueError(
            f"use_safetensors=False: {cls_name} loads safetensors only (unpickling runs code); convert pickle "
            "weights with: python -m contentv.checkpoint convert <folder>"
        )
    weights["use_safetensors"] = True
    variant = kwargs.pop("variant", None)
    for name in sorted(kwargs):
        if name in UNSUPPORTED_ARGS:
            raise ValueError(f"{name}: not taken by {cls_name}.from_pretrained ({UNSUPPORTED_ARGS[name]})")
    if kwargs:
        raise TypeError(f"{cls_name}.from_pretrained: unexpected arguments: {', '.join(sorted(kwargs))}")
    if variant and Path(path).expanduser().is_dir():
        if not any(has_variant(path, name, variant) for name in components if name not in given):
            raise ValueError(VARIANT_MISSING.format(variant=variant, path=path))
    return LoadArgs(path, dtypes, hub, weights, given, variant)


def has_variant(path: str, name: str, variant: str) -> bool | None:
    """Whether the local component folder has weight files of `variant` (`*.{variant}.safetensors`, shards
    included); None for a hub id or a folder without weight files (e.g. a tokenizer)."""
    sub = Path(path).expanduser() / name
    if not sub.is_dir():
        return None
    names = [p.name for p in sub.iterdir() if p.is_file() and (".safetensors" in p.name or ".bin" in p.name)]
    if not names:
        return None
    return any(f".{variant}." in n for n in names)  # model.fp16.safetensors, ...-00001-of-00002.fp16.safetensors


def load_scheduler(path: str, hub: dict[str, Any], allowed: tuple[str, ...] | None = None) -> Any:
    """The scheduler named by scheduler/scheduler_config.json's _class_name: any diffusers scheduler (as diffusers
    loads it), or one of `allowed` if given."""
    import diffusers
    from diffusers import DDIMScheduler, SchedulerMixin

    config = DDIMScheduler.load_config(path, subfolder="scheduler", **hub)  # any scheduler's config file
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)) or (allowed and name not in allowed):
        what = ", ".join(allowed) if allowed else "a diffusers scheduler class"
        raise ValueError(f"scheduler/scheduler_config.json names {name!r}: must be {what}")
    return cls.from_config(config)


def load_parts(args: LoadArgs, loaders: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Every component: as given, else loaded by its loader (one line naming a failing one; OSError for missing
    files, as diffusers raises), with the libraries' own "Loading weights" bars off, in eval mode."""
    import torch

    from contentv.checkpoint import load_component
    from contentv.progress import library_bars_off

    # What diffusers' DiffusionPipeline.from_pretrained logs per component, on its logger (shown at INFO verbosity).
    log = logging.getLogger("diffusers.pipelines.pipeline_utils")
    parts = {}
    with library_bars_off():
        for name, load in loaders.items():
            if name in args.given:
                parts[name] = args.given[name]
                continue
            parts[name] = load_component(args.path, name, load)
            log.info("Loaded %s as %s from `%s` subfolder of %s.", name, type(parts[name]).__name__, name, args.path)
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return parts


class DiffusersName:
    """Pipeline mixin: the `_class_name` written to model_index.json (save_pretrained) is the diffusers pipeline's,
    so `DiffusionPipeline.from_pretrained` loads a saved folder (this class loads either name)."""

    diffusers_class_name: str | None = None

    def to_json_string(self) -> str:
        text = super().to_json_string()
        if not self.diffusers_class_name:
            return text
        data = json.loads(text)
        data["_class_name"] = self.diffusers_class_name
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
