"""ContentV's joint (video + text) attention with a pluggable kernel.

Adapted from diffusers' `JointAttnProcessor2_0`: same projections and QK-norm, but the kernel is
injected, because SD3's processor calls SDPA directly and diffusers' attention dispatch never reaches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from contentv.attention import AttentionKernel, sdpa

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention


class ContentVJointAttnProcessor:
    """Joint attention for SD3-style blocks: video tokens first, then text tokens, one kernel call."""

    def __init__(self, kernel: AttentionKernel = sdpa):
        self.kernel = kernel

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b = x.shape[0]
        return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # (B, H, S, D)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        if attention_mask is not None:
            raise ValueError("ContentV joint attention is dense: attention_mask is not supported")
        b, n_video = hidden_states.shape[0], hidden_states.shape[1]
        h = attn.heads

        query = self._heads(attn.to_q(hidden_states), h)  # (B, H, Sv, D)
        key = self._heads(attn.to_k(hidden_states), h)
        value = self._heads(attn.to_v(hidden_states), h)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            c_query = self._heads(attn.add_q_proj(encoder_hidden_states), h)  # (B, H, St, D)
            c_key = self._heads(attn.add_k_proj(encoder_hidden_states), h)
            c_value = self._heads(attn.add_v_proj(encoder_hidden_states), h)
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)  # (B, H, Sv+St, D)
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)

        out = self.kernel(query, key, value)  # (B, H, S, D)
        out = out.transpose(1, 2).reshape(b, -1, h * out.shape[-1]).to(query.dtype)  # (B, S, H*D)

        if encoder_hidden_states is not None:
            # The last block is context-pre-only: its text output is unused, and returning a slice of
            # `out` would keep the whole (B, S, H*D) attention output alive through the feed-forward.
            # contiguous(): with B > 1 both slices are strided, and nn.Linear on a strided half-precision input
            # rounds the matmul, then the bias add; a contiguous one rounds once, as B = 1 (sequential) does.
            context = None if attn.context_pre_only else attn.to_add_out(out[:, n_video:].contiguous())
            video = out[:, :n_video].contiguous()  # (B, Sv, H*D)
            del out
            return attn.to_out[1](attn.to_out[0](video)), context
        return attn.to_out[1](attn.to_out[0](out))
