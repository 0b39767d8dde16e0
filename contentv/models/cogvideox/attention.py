"""CogVideoX's joint (text + video) attention with a pluggable kernel.

Adapted from diffusers' `CogVideoXAttnProcessor2_0` (models/attention_processor.py, diffusers 0.42): same
token order (text first), projections, QK LayerNorm and RoPE, but the kernel is injected instead of
calling SDPA directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.models.embeddings import apply_rotary_emb

from contentv.attention import AttentionKernel, sdpa

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention


class CogVideoXKernelAttnProcessor:
    """Joint attention for CogVideoX blocks: text tokens then video tokens, one kernel call.

    Position information: 5B-style models pass `image_rotary_emb` (3-D RoPE, applied here to the video
    tokens only); 2B-style models add 3-D sin-cos embeddings in the transformer's patch embedding, so
    `image_rotary_emb` is None and nothing is rotated here.
    """

    def __init__(self, kernel: AttentionKernel = sdpa):
        self.kernel = kernel

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("CogVideoX attention is dense: attention_mask is not supported")
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, St+Sv, C)
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, S, D)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:  # RoPE on the video tokens only (text tokens come first)
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        out = self.kernel(query, key, value)  # (B, H, S, D)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)  # (B, S, H*D)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout

        encoder_hidden_states, hidden_states = out.split([text_seq_length, out.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states
