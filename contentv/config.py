"""Typed run configuration. Hydra composes these (see conf/); Python users build them directly.

The dataclasses are plain (no Hydra import) and not frozen, so Hydra command-line overrides work.
Field names follow the diffusers call vocabulary (num_frames, num_inference_steps, guidance_scale, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from contentv.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only when a dtype is needed: --help and pre-flight errors stay fast
    import torch

DTYPES = ("float32", "bfloat16", "float16")
MODES = ("generate", "ui", "serve")


def parse_dtype(option: str, value: str) -> torch.dtype:
    """The torch dtype named by a config value (ConfigError naming `option` otherwise)."""
    import torch

    if value not in DTYPES:
        raise ConfigError(option, value, DTYPES)
    return getattr(torch, value)


@dataclass
class BackendConfig:
    # Registry key: auto | cpu | cuda | npu. auto: npu if USE_ASCEND_NPU=1, else cuda if visible, else cpu.
    name: str = "auto"
    # Device ordinal for cuda/npu (cuda:0, npu:0, ...).
    device_index: int = 0
    # Attention kernel; "auto" = the backend's default (sdpa on cpu/cuda, npu_fusion on npu).
    attention: str = "auto"
    # Settings of this backend alone, checked by its own file (backend.options.<name>; each backend's YAML lists
    # its own, e.g. npu: layout); {} = the backend's defaults.
    options: dict[str, Any] = field(default_factory=dict)
    # Allow TF32 matmuls on CUDA (faster fp32; no effect on bf16/fp16).
    allow_tf32: bool = True


@dataclass
class ModelConfig:
    # Display name; equals the conf/model/<name>.yaml file it came from.
    name: str = "contentv_8b"
    # Registry key of the model family (folder under contentv/models/).
    family: str = "contentv"
    # Local checkpoint folder (diffusers layout) or hub id; null with tiny=true (a tiny model is built in code).
    path: str | None = "ByteDance/ContentV-8B"
    # Weights dtype of the transformer and text encoders: float32 | bfloat16 | float16.
    dtype: str = "bfloat16"
    # VAE dtype; the reference decodes in float32.
    vae_dtype: str = "float32"
    # Text encoders' dtype; null = same as dtype.
    text_encoder_dtype: str | None = None
    # Build (once, cached) and use a tiny random-weight checkpoint of this family instead of `path`.
    tiny: bool = False
    # Seed of the tiny checkpoint's random weights.
    tiny_seed: int = 0
    # Never contact the hub; load from the local hub cache only.
    local_files_only: bool = False
    # Hub revision (branch, tag or commit) when `path` is a hub id.
    revision: str | None = None
    # This preset's sampling defaults (e.g. a tiny model's small sizes), over the family's published ones
    # (ContentV: the reference demo's; CogVideoX: the model card's); used where sampling.<field> is null.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemoryConfig:
    # Preset name; equals the conf/memory/<name>.yaml file it came from.
    name: str = "none"
    # Offload whole components to the CPU, one on the device at a time (accelerate hooks).
    model_cpu_offload: bool = False
    # Offload layer by layer (one layer's weights on the device at a time; slowest). Exclusive with model_cpu_offload.
    sequential_cpu_offload: bool = False
    # Stream transformer blocks from CPU to device in groups (diffusers group offloading).
    group_offload: bool = False
    # Transformer blocks per offload group.
    group_offload_blocks: int = 1
    # Prefetch the next group on a side stream from pinned memory (CUDA and NPU; the CPU copies without streams).
    group_offload_stream: bool = True
    # Decode the VAE one video at a time.
    vae_slicing: bool = False
    # Decode the VAE in overlapping spatial tiles: far less decode memory, but CHANGES THE OUTPUT (pixels near tile
    # seams; latents are unchanged). null = only when the planner predicts the untiled decode won't fit the
    # device budget (decided per video; the sidecar records what ran).
    vae_tiling: bool | None = False
    # Compute attention in query chunks of this many tokens; 0 = off. Same result, lower peak.
    attention_slicing: int = 0
    # Text encoders: auto | device (resident) | release (on the device only while encoding) | cpu (encode
    # on the CPU, as Wan does) | offload (layer by layer with group offload; with model/sequential offload
    # the hooks place them). auto: offload under model/sequential offload, release under group offload,
    # else device.
    text_encoders: str = "auto"
    # Weight quantization: none | bnb_int8 | bnb_nf4 | fp8 | torchao_int8. Anything but none CHANGES THE OUTPUT
    # (smaller or faster weights, slightly different frames; the sidecar lists it under output_changes).
    quantization: str = "none"
    # Components the quantization applies to; null = the model family's default (ContentV: transformer and
    # text_encoder_3 (T5); CogVideoX: transformer and text_encoder (T5)).
    quantize: list[str] | None = None
    # Classifier-free guidance: auto (batched on GPU/NPU, sequential on the CPU) | batched (one batch-2
    # forward per step) | sequential (two forwards, less activation memory).
    guidance_mode: str = "auto"
    # The device budget in GB to plan for (memory=auto chooses within it; a dry run plans for it); null = the
    # device's free memory.
    budget_gb: float | None = None
    # Refuse, before loading, a run the planner predicts won't fit this machine's device or host memory (the line
    # gives the predicted need and what the machine has); false = try anyway.
    check_fit: bool = True


@dataclass
class SamplingConfig:
    # The text to turn into a video.
    prompt: str | None = None
    # What to steer away from; null = the model's default negative prompt.
    negative_prompt: str | None = None
    # Video height in pixels; null = the model's default (model.sampling_defaults, then the family's).
    height: int | None = None
    # Video width in pixels; null = the model's default.
    width: int | None = None
    # Frames of the video (ContentV: 4k+1; CogVideoX: 8k+1); null = the model's default.
    num_frames: int | None = None
    # Denoising steps (more: slower, usually finer); null = the model's default.
    num_inference_steps: int | None = None
    # Classifier-free guidance scale (<= 1 runs one pass per step, no guidance); null = the model's default.
    guidance_scale: float | None = None
    # Frames per second of the written video; null = the model's default.
    fps: int | None = None
    # Seed of a CPU torch.Generator: the same noise on every device.
    seed: int = 42
    # Maximum T5 tokens (ContentV: 256).
    max_sequence_length: int | None = None
    # A text file with one prompt per line: one video per line in one run (weights load once).
    prompt_file: str | None = None
    # The most prompts a prompt file may hold: a longer file is refused before anything loads (raise it to run
    # them all; the count is logged at the start).
    max_prompts: int = 1000


@dataclass
class OutputConfig:
    # Output folder; null = the Hydra run directory (demo.py) or ./outputs (Python).
    dir: str | None = None
    # File stem; null = "<prompt slug>_seed<seed>". An existing file is never overwritten (a -N suffix is added).
    name: str | None = None
    # H.264 constant rate factor (0 = lossless, 51 = worst).
    crf: int = 17
    # Write <video>.json beside the video.
    sidecar: bool = True


@dataclass
class SpeedupConfig:
    # torch.compile the transformer's repeated blocks (regional compilation; first steps are slower; the same
    # math, though fused kernels may round differently in the last bits).
    compile: bool = False
    # torch.compile mode: default | reduce-overhead | max-autotune.
    compile_mode: str = "default"
    # Step caching through diffusers' cache hooks: none | first_block (FirstBlockCache). first_block CHANGES THE
    # OUTPUT (steps reuse cached residuals; the sidecar lists it under output_changes).
    cache: str = "none"
    # first_block: reuse the cached residual while the first block's output changes less than this.
    cache_threshold: float = 0.05


@dataclass
class UIConfig:
    # Interface to listen on; anything but 127.0.0.1/localhost prints a warning.
    host: str = "127.0.0.1"
    # TCP port of the page (0 = any free port).
    port: int = 7860
    # Generations waiting in the queue at most (one runs at a time). The queue is kept in <output dir>/ui-jobs.sqlite3
    # (output.dir, else outputs/ui): a page started again on the same folder runs the jobs a killed one left.
    max_queue: int = 8
    # Generations one browser session (and one remote address) may have waiting or running at once.
    max_queue_per_client: int = 2
    # Checkpoint folders the page may load besides the model presets (the page offers no other server paths).
    allowed_paths: list[str] = field(default_factory=list)


@dataclass
class ServeConfig:
    """`RunConfig.serve`: the video API server (python demo.py mode=serve; contentv/serve/)."""

    # Interface to listen on; anything but loopback (127.0.0.1, ::1, localhost) needs serve.api_key.
    host: str = "127.0.0.1"
    # TCP port of the API (0 = any free port; the server prints the one it got).
    port: int = 8000
    # The key clients send as "Authorization: Bearer <key>"; null = no authentication (loopback only).
    api_key: str | None = None
    # Jobs waiting or running at most, all clients together (more: 429, try later).
    max_queue: int = 64
    # Jobs one client may have waiting or running at once (a client = its API key, or its address without one).
    max_queue_per_key: int = 16
    # Largest request body in bytes (413 beyond it).
    max_body_bytes: int = 65536
    # Longest prompt in characters (400 beyond it).
    max_prompt_chars: int = 4000
    # Hours a finished or failed job is kept, with its video, sidecar and thumbnail; 0 = forever.
    job_ttl_hours: float = 168.0
    # Devices, one warm worker each, as BACKEND:INDEX (e.g. [cuda:0, cuda:1]); null = every visible GPU/NPU of
    # `backend`, or one worker on the CPU.
    devices: list[str] | None = None
    # Worker pool: local (one process per device on this machine) | ray (Ray actors, on serve.ray_address).
    workers: str = "local"
    # Ray cluster to join with serve.workers=ray (auto, ray://head:10001, ...); null = start a local Ray instance.
    ray_address: str | None = None
    # Ray resources each worker actor reserves with serve.workers=ray: {GPU: 1} (a GPU), {NPU: 1} (an Ascend NPU,
    # a custom resource), empty = one CPU.
    ray_resources: dict[str, float] = field(default_factory=dict)
    # Seconds a job for another model may wait while a worker keeps taking jobs for the model it has loaded.
    max_wait_s: float = 30.0
    # Model presets clients may ask for (the request's `model`); empty = the server's model only.
    models: list[str] = field(default_factory=list)
    # Memory presets clients may ask for (extra body field `memory`); empty = the server's memory setting only.
    memory_presets: list[str] = field(default_factory=list)


@dataclass
class ParallelConfig:
    """`RunConfig.parallel`: how the ranks of a torchrun (or SLURM) launch share the work.

    ranks = data_parallel_degree x (2 if cfg_parallel) x ring_degree x ulysses_degree.
    """

    # Ulysses sequence parallelism: ranks sharing one generation by all-to-all over heads. 1 = off.
    ulysses_degree: int = 1
    # Ring attention: ranks sharing one generation by passing key/value blocks around. 1 = off.
    ring_degree: int = 1
    # Guidance parallelism: the unconditional and conditional passes on two ranks (needs guidance_mode batched).
    cfg_parallel: bool = False
    # Groups generating different prompts/seeds; null = the ranks left over (world size / ranks per generation).
    data_parallel_degree: int | None = None
    # Allow uneven splits of tokens and heads (diffusers' ulysses_anything / ring_anything). false = diffusers'
    # even split: video tokens, text tokens and heads must then all divide by the degree.
    uneven: bool = True
    # Data parallel: generate every prompt with each of these seeds; null = [sampling.seed].
    seeds: list[int] | None = None


@dataclass
class SweepConfig:
    """`RunConfig.sweep`: settings of a sweep (-m) as a whole; they never change a job's frames."""

    # Job number (hydra.job.num) the others are compared with (PSNR, SSIM) in the sweep summary.
    baseline: int = 0
    # Keep a lossless copy of each video's frames beside it (<video>.frames.npz: F x H x W x 3 bytes before
    # compression) so the summary can compare jobs exactly; false saves the disk space and leaves fidelity empty.
    fidelity: bool = True


@dataclass
class RunConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    speedup: SpeedupConfig = field(default_factory=SpeedupConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # generate: make the video(s) | ui: serve the web page (python demo.py mode=ui) | serve: the video API server.
    mode: str = "generate"
    # Print the memory plan (predicted peak device memory, host RAM, speed per strategy) and exit.
    dry_run: bool = False
    # Show full Python tracebacks instead of one-line errors.
    debug: bool = False
    # Show every detail on the console: the runtime's INFO lines and the libraries' notices (they always go to the
    # run folder's demo.log); false = progress bars, the summary, and warnings and errors.
    verbose: bool = False


def load_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """`from_pretrained` keyword arguments every family's pipeline takes: dtypes and hub options."""
    kw: dict[str, Any] = dict(
        torch_dtype=parse_dtype("model.dtype", cfg.dtype),
        vae_dtype=parse_dtype("model.vae_dtype", cfg.vae_dtype),
        text_encoder_dtype=parse_dtype("model.text_encoder_dtype", cfg.text_encoder_dtype)
        if cfg.text_encoder_dtype
        else None,
        local_files_only=cfg.local_files_only,
    )
    if cfg.revision:
        kw["revision"] = cfg.revision
    return kw


def resolve_sampling(sampling: SamplingConfig, model: ModelConfig) -> SamplingConfig:
    """Fill null sampling fields from model.sampling_defaults, then the model family's published defaults;
    unknown default keys are an error."""
    from contentv.registry import get_spec

    names = {f.name for f in fields(SamplingConfig)}
    if not isinstance(model.sampling_defaults, dict):
        raise ConfigError("model.sampling_defaults", model.sampling_defaults, "a mapping of sampling fields")
    for key in model.sampling_defaults:
        if key not in names:
            raise ConfigError(f"model.sampling_defaults.{key}", model.sampling_defaults[key], sorted(names))
    defaults = {**get_spec(model.family).sampling_defaults, **model.sampling_defaults}
    filled = {k: v for k, v in defaults.items() if getattr(sampling, k) is None}
    return replace(sampling, **filled)


@dataclass
class Presets:
    """The named choices of each config group, as the entry point composed them from conf/ (Hydra): what the
    web page offers and what memory=auto chooses from. Python users: `demo.load_presets()`."""

    models: dict[str, ModelConfig] = field(default_factory=dict)
    memories: dict[str, MemoryConfig] = field(default_factory=dict)
    backends: dict[str, BackendConfig] = field(default_factory=dict)


def field_docs() -> dict[str, str]:
    """Dotted option -> its description: the comment above each field in this file (one source for --help)."""
    import ast
    import inspect
    import sys
    import typing

    source = inspect.getsource(sys.modules[__name__])
    lines = source.splitlines()
    classes = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)}

    def comment_above(lineno: int) -> str:
        text = []
        i = lineno - 2  # the line above the field (0-based)
        while i >= 0 and lines[i].strip().startswith("#"):
            text.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        return " ".join(text)

    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for node in classes[cls.__name__].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                name, hint = node.target.id, hints.get(node.target.id)
                if dataclasses.is_dataclass(hint):
                    walk(hint, f"{prefix}{name}.")
                else:
                    out[f"{prefix}{name}"] = comment_above(node.lineno)

    walk(RunConfig, "")
    return out
