"""A tiny random-weight ContentV checkpoint in the real folder layout, built offline and deterministically.

It keeps the interfaces of the 8B model that the pipeline and the reference code depend on: 16 latent
channels, a Wan VAE with 4x temporal / 8x spatial compression, CLIP-L/G pooled widths summing to 2048,
T5 width 4096 (= joint_attention_dim), 77 CLIP + 256 T5 text tokens. Everything else is small.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_SPEC = {
    "format": 3,  # bump when the builder changes: it is part of the cache key
    "transformer": dict(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=3,  # FirstBlockCache needs head, tail and the final context-pre-only block
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=4096,
        caption_projection_dim=32,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
        dual_attention_layers=[],
        qk_norm="rms_norm",
    ),
    "vae": dict(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ),
    "clip_l": dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=768
    ),
    "clip_g": dict(
        hidden_size=40, intermediate_size=43, num_hidden_layers=2, num_attention_heads=4, projection_dim=1280
    ),
    "t5": dict(d_model=4096, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8),
    "scheduler": dict(num_train_timesteps=1000, shift=3.0),
}


def build_tiny_contentv(out: Path, seed: int = 0, spec: dict = TINY_SPEC) -> None:
    """Write a complete tiny ContentV checkpoint to `out` (deterministic for a given seed and torch)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from contentv.models.contentv.transformer import SD3Transformer3DModel
    from contentv.tiny import save_seeded, tiny_clip_tokenizer, tiny_t5_encoder, tiny_t5_tokenizer

    out = Path(out)
    tokenizers = {
        "tokenizer": tiny_clip_tokenizer(),
        "tokenizer_2": tiny_clip_tokenizer(),
        "tokenizer_3": tiny_t5_tokenizer(),
    }
    for name, tok in tokenizers.items():
        tok.save_pretrained(out / name)

    def clip(cfg: dict) -> CLIPTextModelWithProjection:
        tok = tokenizers["tokenizer"]
        config = CLIPTextConfig(
            vocab_size=len(tok),
            max_position_embeddings=tok.model_max_length,
            hidden_act="gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **cfg,
        )
        return CLIPTextModelWithProjection(config)

    t5_tok = tokenizers["tokenizer_3"]
    builders = {
        "transformer": lambda: SD3Transformer3DModel(**spec["transformer"]),
        "vae": lambda: AutoencoderKLWan(**spec["vae"]),
        "text_encoder": lambda: clip(spec["clip_l"]),
        "text_encoder_2": lambda: clip(spec["clip_g"]),
        "text_encoder_3": lambda: tiny_t5_encoder(t5_tok, **spec["t5"]),
    }
    save_seeded(builders, out, seed)
    FlowMatchEulerDiscreteScheduler(**spec["scheduler"]).save_pretrained(out / "scheduler")

    # Written last: its presence marks a complete checkpoint. The transformer entry names the SD3 base
    # class so that the reference ContentV code (which passes its own subclass) can load this folder too.
    import diffusers

    index = {
        "_class_name": "ContentVPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
