"""Tiny random-weight CogVideoX checkpoints in the real folder layout, built offline and deterministically.

Two variants, chosen by model name: `tiny_cogvideox` (2B-style: 3-D sin-cos positions in the patch
embedding, DDIM scheduler, VAE scaling 1.15) and `tiny_cogvideox_5b` (5B-style: 3-D RoPE in attention,
DPM scheduler, VAE scaling 0.7). Both keep the interfaces the pipeline depends on: 16 latent channels,
a VAE with 4x temporal / 8x spatial compression, patch size 2 (sizes multiples of 16), T5 width 4096
(= text_embed_dim) and 226 text tokens. Everything else is small.
"""

from __future__ import annotations

import json
from pathlib import Path

TEXT_TOKENS = 226  # CogVideoX's max_text_seq_length and T5 tokenizer length

_TRANSFORMER = dict(
    num_attention_heads=2,
    attention_head_dim=16,  # RoPE splits it 4 (time) + 6 + 6 (space): must be a multiple of 8
    in_channels=16,
    out_channels=16,
    time_embed_dim=32,
    text_embed_dim=4096,
    num_layers=2,
    # Latent size of the default video: 96x64 pixels, 9 frames (3 latent frames).
    sample_width=12,
    sample_height=8,
    sample_frames=9,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=TEXT_TOKENS,
)
_VAE = dict(
    block_out_channels=[8, 8, 8, 8],  # 4 levels: 8x spatial compression
    latent_channels=16,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
    # Tiles are half these: 48x40 pixels (6x5 latents), so vae_tiling really tiles the 64x96 video. Like the
    # real 480x720 (tiles 30x45 latents), the tile overlaps (1/6, 1/5) then round to whole latents: other
    # sizes make diffusers' tiled_decode return a larger video.
    sample_height=96,
    sample_width=80,
)
_T5 = dict(d_model=4096, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8)
_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    steps_offset=0,
    timestep_spacing="trailing",
)

TINY_SPECS = {
    "tiny_cogvideox": {
        "format": 1,
        "transformer": {**_TRANSFORMER, "use_rotary_positional_embeddings": False},
        "vae": {**_VAE, "scaling_factor": 1.15258426},
        "t5": _T5,
        "scheduler": {"class": "CogVideoXDDIMScheduler", **_SCHEDULER, "snr_shift_scale": 3.0},
    },
    "tiny_cogvideox_5b": {
        "format": 1,
        "transformer": {**_TRANSFORMER, "use_rotary_positional_embeddings": True},
        "vae": {**_VAE, "scaling_factor": 0.7},
        "t5": _T5,
        "scheduler": {"class": "CogVideoXDPMScheduler", **_SCHEDULER, "snr_shift_scale": 1.0},
    },
}


def build_tiny_cogvideox(out: Path, spec: dict, seed: int = 0) -> None:
    """Write a complete tiny CogVideoX checkpoint to `out` (deterministic for a given seed and torch)."""
    import diffusers
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    from contentv.models.cogvideox.pipeline import SCHEDULERS
    from contentv.tiny import save_seeded, tiny_t5_encoder, tiny_t5_tokenizer

    out = Path(out)
    tok = tiny_t5_tokenizer(model_max_length=TEXT_TOKENS)
    tok.save_pretrained(out / "tokenizer")
    builders = {
        "transformer": lambda: CogVideoXTransformer3DModel(**spec["transformer"]),
        "vae": lambda: AutoencoderKLCogVideoX(**spec["vae"]),
        "text_encoder": lambda: tiny_t5_encoder(tok, **spec["t5"]),
    }
    save_seeded(builders, out, seed)
    sched = dict(spec["scheduler"])
    scheduler_class = sched.pop("class")
    SCHEDULERS[scheduler_class](**sched).save_pretrained(out / "scheduler")

    # Written last: its presence marks a complete checkpoint. Same entries as the THUDM checkpoints, so
    # diffusers' own CogVideoXPipeline.from_pretrained loads this folder too.
    index = {
        "_class_name": "CogVideoXPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
