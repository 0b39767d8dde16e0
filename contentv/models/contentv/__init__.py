"""ContentV-8B family: spec for the registry. Heavy imports happen inside the functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from contentv import checkpoint
from contentv.config import ModelConfig, SamplingConfig, load_kwargs
from contentv.errors import ConfigError
from contentv.models.contentv import architecture
from contentv.registry import ModelSpec
from contentv.validation import (
    check_common_sampling,
    check_frames,
    check_local_checkpoint,
    check_size,
    diffusers_call_kwargs,
)

if TYPE_CHECKING:  # torch and diffusers load with the pipeline
    from contentv.attention import AttentionKernel
    from contentv.models.contentv.pipeline import ContentVPipeline

# Files every ContentV checkpoint folder has (tokenizer files vary: tokenizer.json or vocab/spiece).
REQUIRED_FILES = {
    "model_index.json": "pipeline index",
    "transformer/config.json": "transformer config",
    "vae/config.json": "VAE config",
    "text_encoder/config.json": "CLIP-L config",
    "text_encoder_2/config.json": "CLIP-G config",
    "text_encoder_3/config.json": "T5 config",
    "scheduler/scheduler_config.json": "scheduler config",
}
EXPECTED_CLASSES = {"transformer": "SD3Transformer3DModel", "vae": "AutoencoderKLWan"}
# Every subfolder ContentVPipeline.from_pretrained loads, checked before any weights load (contentv.checkpoint).
LAYOUT = (
    checkpoint.model("transformer", "MMDiT transformer", architecture.CLASSES["transformer"]),
    checkpoint.model("vae", "Wan video VAE", architecture.CLASSES["vae"]),
    checkpoint.model("text_encoder", "CLIP-L text encoder", architecture.CLASSES["text_encoder"]),
    checkpoint.model("text_encoder_2", "CLIP-G text encoder", architecture.CLASSES["text_encoder_2"]),
    checkpoint.model("text_encoder_3", "T5 text encoder", architecture.CLASSES["text_encoder_3"]),
    checkpoint.tokenizer("tokenizer", "CLIP-L tokenizer", checkpoint.CLIP_TOKENIZER_FILES),
    checkpoint.tokenizer("tokenizer_2", "CLIP-G tokenizer", checkpoint.CLIP_TOKENIZER_FILES),
    checkpoint.tokenizer("tokenizer_3", "T5 tokenizer", checkpoint.T5_TOKENIZER_FILES),
    checkpoint.scheduler(),
)
TEMPORAL, SPATIAL = 4, 16  # frames of the form 4k+1; sizes multiples of VAE x8 * patch x2
# The reference demo's sampling settings (bytedance/ContentV demo.py).
SAMPLING_DEFAULTS = {
    "negative_prompt": "overexposed, low quality, deformation, a poor composition, bad hands, bad teeth, "
    "bad eyes, bad limbs, distortion",
    "height": 432,
    "width": 768,
    "num_frames": 125,
    "num_inference_steps": 50,
    "guidance_scale": 6.0,
    "fps": 24,
    "max_sequence_length": 256,
}


def resolve_path(cfg: ModelConfig) -> str:
    if not cfg.tiny:
        if not cfg.path:
            raise ConfigError("model.path", cfg.path, "a checkpoint folder or hub id (or model.tiny=true)")
        return cfg.path
    from contentv.models.contentv.tiny import TINY_SPEC, build_tiny_contentv
    from contentv.tiny import cached_build

    spec = {**TINY_SPEC, "seed": cfg.tiny_seed}
    return str(cached_build("tiny_contentv", spec, lambda out: build_tiny_contentv(out, seed=cfg.tiny_seed)))


def check_checkpoint(path: str) -> None:
    """A local folder: the files and classes of a ContentV checkpoint, then every component (configs, tokenizer
    files, safetensors headers against the configs' shapes); no weights are read. Hub ids pass."""
    folder = check_local_checkpoint("model.path", path, REQUIRED_FILES)
    if not folder.exists():  # a hub id: checked when downloaded
        return
    checkpoint.read_json(path, "", "model_index.json")
    for sub, expected in EXPECTED_CLASSES.items():
        found = (checkpoint.read_json(path, sub, "config.json") or {}).get("_class_name")
        if found != expected:
            raise ConfigError(
                "model.path", path, f"a ContentV checkpoint ({sub}/config.json names {found!r}, expected {expected!r})"
            )
    checkpoint.check_folder(path, LAYOUT)


def load(cfg: ModelConfig, path: str):
    from contentv.models.contentv.pipeline import ContentVPipeline

    return ContentVPipeline.from_pretrained(path, **load_kwargs(cfg))


def install_attention(pipe: ContentVPipeline, kernel: AttentionKernel) -> None:
    from contentv.models.contentv.attention import ContentVJointAttnProcessor

    pipe.transformer.set_attn_processor(ContentVJointAttnProcessor(kernel))


def validate(s: SamplingConfig) -> None:
    check_common_sampling(s)
    check_frames(s.num_frames, TEMPORAL)
    check_size(s.height, s.width, SPATIAL)
    if s.max_sequence_length is not None and not 1 <= s.max_sequence_length <= 512:
        raise ConfigError("sampling.max_sequence_length", s.max_sequence_length, "an integer in 1..512")


SPEC = ModelSpec(
    family="contentv",
    tiny_names=("tiny_contentv",),
    frames_multiple=TEMPORAL,
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
    components=("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
    quantize_default=("transformer", "text_encoder_3"),  # the 8B transformer and the 4.8B T5
)

__all__ = ["SPEC"]
