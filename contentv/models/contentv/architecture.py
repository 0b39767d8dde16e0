"""ContentV-8B's component configs, and each component built on the meta device (no weights read).

The memory planner (contentv/planner/) reads these through the registry. The full-size configs are the public checkpoint's (`ByteDance/ContentV-8B`): the transformer is our class's defaults; the text
encoders are SD3.5-Large's (CLIP-L, OpenCLIP bigG, T5-v1.1-XXL encoder); the VAE is Wan2.1's, which is
diffusers' `AutoencoderKLWan` defaults. Parameter counts: transformer 8.06e9, CLIP-L 0.124e9, CLIP-G
0.695e9, T5 4.76e9, VAE 0.127e9 (tests check them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from contentv.config import ModelConfig, SamplingConfig, parse_dtype
from contentv.models.common import T5_XXL, Workload, build_on_meta, local_config_folder, read_config

if TYPE_CHECKING:
    import torch
    from torch import nn

HUB_ID = "ByteDance/ContentV-8B"

# SD3Transformer3DModel's constructor defaults are ContentV-8B's (a test keeps them in sync).
TRANSFORMER: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,  # inner dim 38 * 64 = 2432
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    dual_attention_layers=[],
    qk_norm="rms_norm",
)
# text_encoder: CLIP ViT-L/14 text tower with projection (SD3's text_encoder/config.json).
CLIP_L: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# text_encoder_2: OpenCLIP ViT-bigG/14 text tower with projection (SD3's text_encoder_2/config.json).
CLIP_G: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# text_encoder_3: T5-v1.1-XXL, encoder only (shared with CogVideoX): contentv.models.common.T5_XXL.
# vae: Wan2.1 video VAE = AutoencoderKLWan's defaults (4x time, 8x space, 16 latent channels).
WAN_VAE: dict[str, Any] = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)
FULL_SIZE: dict[str, dict[str, Any]] = {
    "transformer": TRANSFORMER,
    "vae": WAN_VAE,
    "text_encoder": CLIP_L,
    "text_encoder_2": CLIP_G,
    "text_encoder_3": T5_XXL,
}
# Component -> (library, class) it is loaded with (contentv/models/contentv/pipeline.py's loaders).
CLASSES: dict[str, tuple[str, str]] = {
    "transformer": ("contentv.models.contentv.transformer", "SD3Transformer3DModel"),
    "vae": ("diffusers", "AutoencoderKLWan"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
}
CLIP_TOKENS = 77  # both CLIP tokenizers pad to 77
TEMPORAL, SPATIAL = 4, 8  # Wan VAE compression
# Latent frames the planner traces a VAE decode with: the Wan decoder runs one latent frame per chunk and
# its causal cache is full from the third chunk on; later chunks only add their decoded frames.
DECODE_TRACE_FRAMES = 3
# (B, N, 2432) tensors alive at a block's feed-forward peak besides the FF's (the processor returns no
# text slice from the last, context-pre-only block, so no extra attention-output copy stays alive).
BLOCK_LIVE = 4.0


def component_configs(path: str | None, revision: str | None = None) -> tuple[dict[str, dict[str, Any]], str]:
    """Each component's config and where it came from: a local checkpoint folder, the local hub cache
    (never the network), or the built-in full-size ContentV-8B configs."""
    folder = local_config_folder(path, "transformer/config.json", revision) if path else None
    if folder is None:
        return {name: dict(config) for name, config in FULL_SIZE.items()}, f"built-in {HUB_ID} configs"
    return {name: read_config(folder, name) for name in CLASSES}, str(folder)


def component_dtypes(cfg: ModelConfig) -> dict[str, torch.dtype]:
    """The dtype each component is loaded in (ContentVPipeline.from_pretrained's rules)."""
    dtype = parse_dtype("model.dtype", cfg.dtype)
    te = parse_dtype("model.text_encoder_dtype", cfg.text_encoder_dtype) if cfg.text_encoder_dtype else dtype
    vae = parse_dtype("model.vae_dtype", cfg.vae_dtype)
    return {"transformer": dtype, "vae": vae, "text_encoder": te, "text_encoder_2": te, "text_encoder_3": te}


def components_on_meta(cfg: ModelConfig, path: str | None) -> dict[str, tuple[nn.Module, torch.dtype]]:
    """name -> (component built on the meta device, dtype it is loaded in); no weights are read.

    `path` is a local checkpoint folder (its config files are read) or a hub id (the local hub cache is
    looked at, else the built-in full-size configs are used).
    """
    configs, _ = component_configs(path, cfg.revision)
    dtypes = component_dtypes(cfg)
    return {name: (build_on_meta(*CLASSES[name], configs[name], dtypes[name]), dtypes[name]) for name in CLASSES}


def workload(components: dict[str, tuple[nn.Module, torch.dtype]], s: SamplingConfig) -> Workload:
    """Token counts and latent shape of one video at sampling settings `s` (resolved, no nulls)."""
    transformer = components["transformer"][0]
    p = transformer.config.patch_size
    t = (s.num_frames - 1) // TEMPORAL + 1
    h, w = s.height // SPATIAL, s.width // SPATIAL
    t5_tokens = s.max_sequence_length or 256
    return Workload(
        video_tokens=t * (h // p) * (w // p),
        text_tokens=CLIP_TOKENS + t5_tokens,  # CLIP-L|G (77) and T5 concatenated on the sequence
        latent=(transformer.config.in_channels, t, h, w),
        text_lengths={"text_encoder": CLIP_TOKENS, "text_encoder_2": CLIP_TOKENS, "text_encoder_3": t5_tokens},
        # SD3's encode_prompt runs text_encoder, _2, _3 for the prompt, then again for the negative prompt.
        text_encoder_order=("text_encoder", "text_encoder_2", "text_encoder_3"),
        decode_trace_frames=DECODE_TRACE_FRAMES,
        block_live=BLOCK_LIVE,
        # the 3-D sin-cos table kept on the device for the whole video (transformer.VideoPatchEmbed)
        table_elements=t
        * (h // p)
        * (w // p)
        * transformer.config.num_attention_heads
        * transformer.config.attention_head_dim,
    )


# ------------------------------------------------------------------------------------------ context parallelism

# Transformer keyword arguments that carry the guidance batch (B = 2: uncond, cond).
GUIDANCE_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")


def cp_plan() -> dict:
    """Context-parallel plan (diffusers' format): split the patch-embedded video tokens and the projected text
    tokens right where they are made (after the 3-D sin-cos positions are added), gather the video tokens after
    proj_out. Text tokens split like video tokens: attention has no position terms inside it, so key order
    doesn't matter (see contentv/parallel/context.py)."""
    from contentv._diffusers import context_parallel_plan_types

    Input, Output = context_parallel_plan_types()
    return {
        "pos_embed": {0: Input(split_dim=1, expected_dims=3, split_output=True)},  # (B, T*h*w, D)
        "context_embedder": {0: Input(split_dim=1, expected_dims=3, split_output=True)},  # (B, 333, D)
        "proj_out": Output(gather_dim=1, expected_dims=3),  # (B, T*h*w, p*p*C)
    }
