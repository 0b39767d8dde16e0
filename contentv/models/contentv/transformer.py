"""ContentV's 3-D MMDiT: SD3's transformer with a per-frame patch embedding and 3-D sin-cos positions.

Adapted from diffusers' `transformer_sd3.py` (SD3Transformer2DModel); the blocks, norms and weight
names are SD3's, so `ByteDance/ContentV-8B` weights load without conversion. Only the patch
embedding and the un-patchify differ.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, JointTransformerBlock
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, get_3d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.utils import apply_lora_scale
from torch import nn


def _sincos_3d(embed_dim: int, t: int, h: int, w: int) -> torch.Tensor:
    # (1, t*h*w, D) float64 on the host: the reference's numbers (it builds the table with numpy in float64).
    pos = get_3d_sincos_pos_embed(
        embed_dim=embed_dim,
        spatial_size=(w, h),
        temporal_size=t,
        spatial_interpolation_scale=0.5,
        temporal_interpolation_scale=1.0,
        output_type="pt",
    )
    return pos.flatten(0, 1).unsqueeze(0)


class VideoPatchEmbed(nn.Module):
    """Each frame through one shared Conv2d patchifier; tokens frame-major (t, h, w); 3-D sin-cos added."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self._table: tuple[tuple, torch.Tensor] | None = None  # ((t, h, w, device, dtype), table)

    def position_table(self, t: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (1, t*h*w, D) 3-D sin-cos table in `dtype` on `device`, built once per (shape, device, dtype).

        Computed in float64 on the host like the reference, rounded to `dtype` there (same rounding as on the
        device; accelerators lack fast float64), then copied once: every later forward of the same shape copies
        nothing. Not a buffer: offload hooks and state dicts never see it (at 432x768x125, 200 MB in bf16).
        """
        key = (t, h, w, torch.device(device), dtype)
        if self._table is None or self._table[0] != key:
            self._table = None  # free the previous shape's table before building the next
            self._table = (key, _sincos_3d(self.embed_dim, t, h, w).to(dtype).to(device))
        return self._table[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape  # (B, C, T, H, W)
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.proj(x)  # (B*T, D, h, w)
        _, d, hp, wp = x.shape
        x = x.reshape(b, t, d, hp * wp).permute(0, 1, 3, 2).reshape(b, t * hp * wp, d)  # (B, T*h*w, D)
        return x + self.position_table(t, hp, wp, x.device, x.dtype)


class SD3Transformer3DModel(ModelMixin, AttentionMixin, CacheMixin, ConfigMixin, PeftAdapterMixin):
    """ContentV's transformer. Every SD3 config field is a constructor argument.

    The class name matches the published checkpoint's `transformer/config.json` (`_class_name`), and
    the config fields are exactly `SD3Transformer2DModel`'s, so a config written by either loads here.
    `sample_size` and `pos_embed_max_size` are kept for checkpoint compatibility; the 3-D sin-cos
    embedding has no maximum size.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JointTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _repeated_blocks = ["JointTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 38,
        attention_head_dim: int = 64,
        num_attention_heads: int = 38,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 2432,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 192,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = "rms_norm",
    ):
        super().__init__()
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.inner_dim = num_attention_heads * attention_head_dim

        self.pos_embed = VideoPatchEmbed(patch_size, in_channels, self.inner_dim)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=self.inner_dim, pooled_projection_dim=pooled_projection_dim
        )
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    dim=self.inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    context_pre_only=i == num_layers - 1,
                    qk_norm=qk_norm,
                    use_dual_attention=i in dual_attention_layers,
                )
                for i in range(num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels, bias=True)
        self.gradient_checkpointing = False

    def prepare_positions(self, latent_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
        """Build the position table for latents of `latent_shape` (B, C, T, H, W) before the denoising loop, so the
        loop's forwards copy nothing from the host."""
        _, _, t, h, w = latent_shape
        p = self.config.patch_size
        self.pos_embed.position_table(t, h // p, w // p, device, dtype)

    def unpatchify(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        """(B, T*h*w, p*p*C) -> (B, C, T, h*p, w*p); channel last inside each patch."""
        p, c, b = self.config.patch_size, self.out_channels, x.shape[0]
        x = x.reshape(b, t, h, w, p, p, c)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, T, h, p, w, q)
        return x.reshape(b, c, t, h * p, w * p)

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """hidden_states (B, C, T, H, W) latents; encoder_hidden_states (B, L, joint_attention_dim)."""
        _, _, t, height, width = hidden_states.shape
        p = self.config.patch_size

        hidden_states = self.pos_embed(hidden_states)  # (B, T*h*w, D)
        temb = self.time_text_embed(timestep, pooled_projections)  # (B, D)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)  # (B, L, D)

        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs
                )
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    joint_attention_kwargs=joint_attention_kwargs,
                )

        hidden_states = self.norm_out(hidden_states, temb)
        hidden_states = self.proj_out(hidden_states)  # (B, T*h*w, p*p*C)
        output = self.unpatchify(hidden_states, t, height // p, width // p)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
