"""CogVideoX-2B/5B component configs, and each component built on the meta device (no weights read).

Full-size configs are the public checkpoints' (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b): the transformer is
diffusers' CogVideoXTransformer3DModel (2B = its defaults; 5B: 48 heads, 42 layers, 3-D RoPE), the VAE is
AutoencoderKLCogVideoX's defaults (scaling factor 1.15258426 / 0.7), the text encoder T5-v1.1-XXL's encoder.
"""

from __future__ import annotations

from typing import Any

from contentv.config import ModelConfig, SamplingConfig, parse_dtype
from contentv.errors import ConfigError
from contentv.models.common import T5_XXL, Workload, build_on_meta, local_config_folder, read_config

TRANSFORMER_2B: dict[str, Any] = dict(
    num_attention_heads=30,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    time_embed_dim=512,
    text_embed_dim=4096,
    num_layers=30,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
)
TRANSFORMER_5B: dict[str, Any] = {
    **TRANSFORMER_2B,
    "num_attention_heads": 48,
    "num_layers": 42,
    "use_rotary_positional_embeddings": True,
}
VAE: dict[str, Any] = dict(
    block_out_channels=[128, 256, 256, 512],
    latent_channels=16,
    layers_per_block=3,
    temporal_compression_ratio=4,
    sample_height=480,
    sample_width=720,
)
FULL_SIZE = {
    "THUDM/CogVideoX-2b": {
        "transformer": TRANSFORMER_2B,
        "vae": {**VAE, "scaling_factor": 1.15258426},
        "text_encoder": T5_XXL,
    },
    "THUDM/CogVideoX-5b": {
        "transformer": TRANSFORMER_5B,
        "vae": {**VAE, "scaling_factor": 0.7},
        "text_encoder": T5_XXL,
    },
}
CLASSES = {
    "transformer": ("diffusers", "CogVideoXTransformer3DModel"),
    "vae": ("diffusers", "AutoencoderKLCogVideoX"),
    "text_encoder": ("transformers", "T5EncoderModel"),
}
# Latent frames traced for the VAE decode: the first batch of 3 latent frames is the largest.
DECODE_TRACE_FRAMES = 5


def components_on_meta(cfg: ModelConfig, path: str | None) -> dict:
    """name -> (component on the meta device, dtype it is loaded in); a local folder's configs, else built-in."""
    folder = local_config_folder(path, "transformer/config.json", cfg.revision) if path else None
    if folder is not None:
        configs = {n: read_config(folder, n) for n in CLASSES}
    elif path in FULL_SIZE:
        configs = FULL_SIZE[path]
    else:
        raise ConfigError("model.path", path, f"a local checkpoint folder or one of {', '.join(FULL_SIZE)}")
    dtype = parse_dtype("model.dtype", cfg.dtype)
    dtypes = {
        "transformer": dtype,
        "vae": parse_dtype("model.vae_dtype", cfg.vae_dtype),
        "text_encoder": parse_dtype("model.text_encoder_dtype", cfg.text_encoder_dtype)
        if cfg.text_encoder_dtype
        else dtype,
    }
    return {n: (build_on_meta(*CLASSES[n], configs[n], dtypes[n]), dtypes[n]) for n in CLASSES}


def workload(components: dict, s: SamplingConfig) -> Workload:
    c = components["transformer"][0].config
    t = (s.num_frames - 1) // 4 + 1
    h, w = s.height // 8, s.width // 8
    return Workload(
        video_tokens=t * (h // c.patch_size) * (w // c.patch_size),
        text_tokens=c.max_text_seq_length,  # the transformer takes exactly this many T5 tokens
        latent=(c.in_channels, t, h, w),
        text_lengths={"text_encoder": s.max_sequence_length or c.max_text_seq_length},
        text_encoder_order=("text_encoder",),
        decode_trace_frames=DECODE_TRACE_FRAMES,
    )


# ------------------------------------------------------------------------------------------ context parallelism

# Transformer keyword arguments that carry the guidance batch (B = 2: uncond, cond).
GUIDANCE_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs")


def cp_plan() -> dict:
    """Context-parallel plan (diffusers' format): text and video are embedded together, then sliced apart inside
    forward, so split at the first block's inputs; the 5B RoPE table (Sv, D) is split on its token dim exactly
    like the video tokens."""
    from contentv._diffusers import context_parallel_plan_types

    Input, Output = context_parallel_plan_types()
    return {
        "": {"image_rotary_emb": (Input(split_dim=0, expected_dims=2), Input(split_dim=0, expected_dims=2))},
        "transformer_blocks.0": {
            "hidden_states": Input(split_dim=1, expected_dims=3),  # (B, Sv, D)
            "encoder_hidden_states": Input(split_dim=1, expected_dims=3),  # (B, St, D)
        },
        "proj_out": Output(gather_dim=1, expected_dims=3),
    }
