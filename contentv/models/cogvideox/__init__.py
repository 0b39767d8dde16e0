"""CogVideoX-2B/5B family (THUDM; diffusers' CogVideoXPipeline): spec for the registry.

Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from contentv import checkpoint, paddle_format
from contentv.config import ModelConfig, SamplingConfig, load_kwargs
from contentv.errors import ConfigError
from contentv.models.cogvideox import architecture
from contentv.models.cogvideox.tiny import TINY_SPECS
from contentv.registry import ModelSpec
from contentv.validation import check_common_sampling, check_local_checkpoint, check_size, diffusers_call_kwargs

if TYPE_CHECKING:  # torch and diffusers load with the pipeline
    from contentv.attention import AttentionKernel
    from contentv.models.cogvideox.pipeline import CogVideoXRuntimePipeline

# Files every CogVideoX checkpoint folder has (tokenizer files vary: spiece.model or tokenizer.json).
REQUIRED_FILES = {
    "model_index.json": "pipeline index",
    "transformer/config.json": "transformer config",
    "vae/config.json": "VAE config",
    "text_encoder/config.json": "T5 config",
    "tokenizer/tokenizer_config.json": "T5 tokenizer config",
    "scheduler/scheduler_config.json": "scheduler config",
}
EXPECTED_CLASSES = {
    "transformer/config.json": ("CogVideoXTransformer3DModel",),
    "vae/config.json": ("AutoencoderKLCogVideoX",),
    "scheduler/scheduler_config.json": ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"),
}


def _a_diffusers_scheduler(name: object) -> bool:
    """`name` is a scheduler class diffusers has."""
    if not isinstance(name, str) or not name.endswith("Scheduler") or not name.isidentifier():
        return False
    import diffusers

    return hasattr(diffusers, name)


# Every subfolder CogVideoXRuntimePipeline.from_pretrained loads, checked before any weights load.
LAYOUT = (
    checkpoint.tokenizer("tokenizer", "T5 tokenizer", checkpoint.T5_TOKENIZER_FILES),
    checkpoint.model("text_encoder", "T5 text encoder", architecture.CLASSES["text_encoder"]),
    checkpoint.model("vae", "CogVideoX VAE", architecture.CLASSES["vae"]),
    checkpoint.model("transformer", "CogVideoX transformer", architecture.CLASSES["transformer"]),
    checkpoint.scheduler(),
)
# Frames 4k+1 (VAE 4x time compression). Sizes: multiples of VAE x8 * patch x2.
TEMPORAL, SPATIAL = 4, 16
# T5 tokens the transformers were trained with (transformer.config.max_text_seq_length).
MAX_TEXT_TOKENS = 226
# The model card's sampling settings (THUDM/CogVideoX-2b and -5b; the same for both).
SAMPLING_DEFAULTS = {
    "negative_prompt": "",  # no recommended negative prompt: diffusers' default
    "height": 480,  # 720x480 (width x height) is the only resolution the models were trained at
    "width": 720,
    "num_frames": 49,  # 6 s at 8 fps plus the first frame = 13 latent frames (8k+1: an odd latent count)
    "num_inference_steps": 50,
    "guidance_scale": 6.0,
    "fps": 8,
    "max_sequence_length": MAX_TEXT_TOKENS,  # longer prompts are truncated, with a warning
}


def resolve_path(cfg: ModelConfig) -> str:
    if not cfg.tiny:
        if not cfg.path:
            raise ConfigError("model.path", cfg.path, "a checkpoint folder or hub id (or model.tiny=true)")
        return cfg.path
    from contentv.models.cogvideox.tiny import build_tiny_cogvideox
    from contentv.tiny import cached_build

    # The tiny variant is chosen by model name (2B-style sin-cos or 5B-style RoPE).
    if cfg.name not in TINY_SPECS:
        raise ConfigError("model.name", cfg.name, f"with model.tiny=true, one of: {', '.join(TINY_SPECS)}")
    spec = {**TINY_SPECS[cfg.name], "seed": cfg.tiny_seed}
    return str(
        cached_build(cfg.name, spec, lambda out: build_tiny_cogvideox(out, TINY_SPECS[cfg.name], seed=cfg.tiny_seed))
    )


def check_checkpoint(path: str) -> None:
    """A local folder: the files and classes of a CogVideoX text-to-video checkpoint, then every component
    (configs, tokenizer files, safetensors headers against the configs' shapes); no weights are read."""
    folder = check_local_checkpoint("model.path", path, REQUIRED_FILES)
    if not folder.exists():  # a hub id: checked when downloaded
        return
    checkpoint.read_json(path, "", "model_index.json")
    configs = {f: checkpoint.read_json(path, *f.split("/")) or {} for f in EXPECTED_CLASSES}
    for f, expected in EXPECTED_CLASSES.items():
        found = configs[f].get("_class_name")
        if f.startswith("scheduler/") and _a_diffusers_scheduler(found):
            continue  # any diffusers scheduler loads (a pipeline saved with DDIMScheduler, as diffusers allows)
        if found not in expected:
            raise ConfigError(
                "model.path", path, f"a CogVideoX checkpoint ({f} names {found!r}, expected {' or '.join(expected)})"
            )
    t = configs["transformer/config.json"]
    if t.get("in_channels", 16) != (t.get("out_channels") or 16):  # I2V models take image latents too
        raise ConfigError(
            "model.path",
            path,
            f"a text-to-video CogVideoX checkpoint (transformer in_channels {t.get('in_channels')} != "
            f"out_channels {t.get('out_channels')}: an image-to-video model)",
        )
    # PaddleNLP's copy (Paddle weights, same layout otherwise): contentv.paddle_format checks it the same way.
    if paddle_format.detect_layout(path, LAYOUT) == paddle_format.LAYOUT_PADDLE:
        paddle_format.check_folder(path, LAYOUT)
        return
    checkpoint.check_folder(path, LAYOUT)


def load(cfg: ModelConfig, path: str):
    from contentv.models.cogvideox.pipeline import CogVideoXRuntimePipeline

    kwargs = load_kwargs(cfg)
    # PaddleNLP's copy: its Paddle model parts as torch modules, the rest (tokenizer, scheduler) as usual.
    kwargs.update(paddle_format.load_paddle_parts(path, LAYOUT, kwargs))
    return CogVideoXRuntimePipeline.from_pretrained(path, **kwargs)


def install_attention(pipe: CogVideoXRuntimePipeline, kernel: AttentionKernel) -> None:
    from contentv.models.cogvideox.attention import CogVideoXKernelAttnProcessor

    pipe.transformer.set_attn_processor(CogVideoXKernelAttnProcessor(kernel))


def decoded_frames(num_frames: int) -> int:
    """Frames the CogVideoX VAE returns when asked for `num_frames`: T = (n-1)//4+1 latent frames decode in pairs
    after a first group of three (diffusers' AutoencoderKLCogVideoX), so an odd T gives 4T-3 frames, an even T 4T."""
    t = (num_frames - 1) // TEMPORAL + 1
    return 4 * t - 3 if t % 2 else 4 * t


def frames_rule_text(num_frames: int) -> str:
    """What is allowed, for a frame count the VAE would not return as asked (the command line's and the pipeline's
    message; diffusers silently returns the other length)."""
    t = (num_frames - 1) // TEMPORAL + 1
    return (
        f"of the form 8k+1, e.g. 9, 17, 25, 33, 41, 49 ({t} latent frames decode to {decoded_frames(num_frames)} "
        "frames; the CogVideoX VAE needs an odd latent frame count)"
    )


def validate(s: SamplingConfig) -> None:
    check_common_sampling(s)
    n = s.num_frames
    if n is None or n < 1 or (n - 1) % TEMPORAL:
        raise ConfigError("sampling.num_frames", n, f"of the form {TEMPORAL}k+1 (the VAE compresses time 4x), e.g. 49")
    if ((n - 1) // TEMPORAL) % 2:
        raise ConfigError("sampling.num_frames", n, frames_rule_text(n))
    check_size(s.height, s.width, SPATIAL)
    if s.max_sequence_length is not None and not 1 <= s.max_sequence_length <= MAX_TEXT_TOKENS:
        raise ConfigError("sampling.max_sequence_length", s.max_sequence_length, f"an integer in 1..{MAX_TEXT_TOKENS}")


def uses_rope(cfg: ModelConfig) -> bool | None:
    """5B-style 3-D RoPE (any text length) or 2B-style sin-cos (exactly 226 text tokens); None if unknown."""
    if cfg.tiny:
        return cfg.name.endswith("_5b")
    path = Path(cfg.path or "").expanduser() / "transformer" / "config.json"
    if path.is_file():  # read as the checkpoint check reads it: invalid JSON is one line, not a traceback
        config = checkpoint.read_json(cfg.path, "transformer", "config.json") or {}
        return bool(config.get("use_rotary_positional_embeddings", False))
    name = (cfg.path or "").lower()
    return True if name.endswith(("-5b", "-5b-i2v", "1.5-5b")) else False if name.endswith("-2b") else None


def validate_for_model(cfg: ModelConfig, s: SamplingConfig) -> None:
    if s.max_sequence_length not in (None, MAX_TEXT_TOKENS) and uses_rope(cfg) is False:
        raise ConfigError(
            "sampling.max_sequence_length",
            s.max_sequence_length,
            f"{MAX_TEXT_TOKENS} for {cfg.name} (its sin-cos position table has exactly {MAX_TEXT_TOKENS} text slots)",
        )


SPEC = ModelSpec(
    family="cogvideox",
    tiny_names=tuple(TINY_SPECS),
    frames_multiple=2 * TEMPORAL,  # 8k+1: an odd latent frame count (validate)
    sampling_defaults=SAMPLING_DEFAULTS,
    resolve_path=resolve_path,
    check_checkpoint=check_checkpoint,
    load=load,
    install_attention=install_attention,
    validate=validate,
    call_kwargs=diffusers_call_kwargs,
    components_on_meta=architecture.components_on_meta,
    workload=architecture.workload,
    cp_plan=architecture.cp_plan,
    guidance_inputs=architecture.GUIDANCE_INPUTS,
    validate_for_model=validate_for_model,
    components=("transformer", "vae", "text_encoder"),
    quantize_default=("transformer", "text_encoder"),  # the model card quantizes text encoder and transformer
)

__all__ = ["SPEC"]
