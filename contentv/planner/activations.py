"""Activation bytes: the transient memory of text encoding, one denoising forward and the VAE decode.

- transformer: a live-tensor model of one block (`activation_bytes`), checked against a meta-device trace;
- text encoders: from their widths (small next to their weights);
- VAE decode: the real decoder runs on meta tensors at a reduced size while `LiveBytes` counts the bytes
  alive at each op; the peak is scaled to the real size (`decode_bytes`).
"""

from __future__ import annotations

import copy
import json
import weakref
from typing import Any

import torch
from torch import nn

from contentv.models.common import config_get

# Latent (h, w) at which the VAE decode is traced; the result is scaled by pixel count.
TRACE_LATENT = (6, 8)


def activation_bytes(
    *,
    batch: int,
    video_tokens: int,
    text_tokens: int,
    dim: int,
    ff_dim: int,
    dtype: torch.dtype,
    heads: int = 1,
    live: float = 4.0,
    math_attention: bool = False,
    attention_chunk: int = 0,
    quantization: str = "none",
    int8_dequant: str = "fp16",
) -> int:
    """Peak transient bytes of one DiT forward over `batch` sequences of video + text tokens, width `dim`.

    Live-tensor model of one block (inference, no autograd), in units of one (B, N, dim) tensor:
    - feed-forward peak: `live` units - the block input (held by the caller), the residual after attention,
      the gated attention output, the modulated norm output - plus the FF up-projection (ff_dim) and its GELU
      output (ff_dim): live + 2 * ff_dim / dim units (12 at ff_dim = 4 * dim).
    - attention peak: input, norm output, q, k, v, kernel output and its (B, S, H*D) copy: 7 units, plus the
      kernel's workspace: O(N) for flash / memory-efficient SDPA (an fp32 logsumexp per query and head),
      O(N^2) for the math kernel (scores and softmax, per query chunk under attention slicing).
    - quantized linears add their own temporaries at the largest one, the FF up-projection (dim -> ff_dim):
      bnb_int8: `bnb_int8_bytes_per_token` (replaces the two ff_dim-wide tensors); bnb_nf4 dequantizes the
      layer's weight (ff_dim x dim in the compute dtype) for the matmul.
    Checked against a meta-device trace of the real blocks (tests/test_planner.py) and, for bnb_int8's fp32
    dequant (bitsandbytes' default kernels, the CPU's), an allocation trace of a real bitsandbytes layer (tests/test_bnb_temporaries.py).
    """
    n = video_tokens + text_tokens
    unit = batch * n * dim * dtype.itemsize
    ff_peak = unit * (live + 2 * ff_dim / dim)
    if quantization == "bnb_int8":
        ff_peak = max(ff_peak, unit * live + batch * n * bnb_int8_bytes_per_token(dim, ff_dim, int8_dequant))
    elif quantization == "bnb_nf4":
        ff_peak += ff_dim * dim * dtype.itemsize
    if math_attention:
        q = min(attention_chunk or n, n)
        workspace = 2 * batch * heads * q * n * dtype.itemsize
    else:
        workspace = batch * heads * n * 4
    return int(max(ff_peak, 7 * unit + workspace))


def bnb_int8_bytes_per_token(dim: int, ff_dim: int, dequant: str = "fp16") -> int:
    """Peak bytes per token inside a bitsandbytes int8 Linear (dim -> ff_dim, threshold 6.0, inference), its output
    included (MatMul8bitLt.forward -> int8_mixed_scaled_mm -> int8_scaled_mm): the int8 input rows (dim) and their
    fp32 scales (4) stay alive while the int32 accumulator (4 ff_dim) is dequantized. `dequant` is the backend's
    (Capabilities.bnb_int8_dequant):
      fp16: a fused kernel writes fp16 (2 ff_dim), then `.to(bf16)` (2 ff_dim) while both are alive: 8 ff_dim
        (bitsandbytes' CUDA kernel).
      fp32: the default dequant, `acc * (row * col) * c`, computes in fp32: the accumulator and three more 4-byte
        ff_dim-wide tensors alive at once: 16 ff_dim (the CPU's; tests/test_bnb_temporaries.py traces a real
        layer). Without AVX-512 the CPU's int8 matmul runs in fp32 with an fp32 copy of the weight (4 ff_dim dim
        bytes, per layer, not counted: ~1 % of the per-token bytes at ContentV-8B's 83,610 tokens).
    The input's fp16, abs and outlier-mask copies (~6 dim) are freed before the matmul."""
    return dim + 4 + (16 if dequant == "fp32" else 8) * ff_dim


def text_encoder_activation_bytes(module: nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """Peak transient bytes of one text encoder forward (one prompt): hidden states, FF and attention scores."""
    c = module.config
    d = config_get(c, "hidden_size", "d_model", default=1024)
    ff = config_get(c, "intermediate_size", "d_ff", default=4 * d)
    heads = config_get(c, "num_attention_heads", "num_heads", default=1)
    s = dtype.itemsize
    # residual, norm, q, k, v, output + gated FF (two ff-wide inputs and their product) + fp32 scores/softmax/bias
    return int(tokens * (6 * d + 3 * ff) * s + 3 * heads * tokens * tokens * 4)


class LiveBytes:
    """Counts the bytes of tensors alive during a computation on the meta device; `peak` is the maximum.

    A TorchDispatchMode sees every op's outputs; a storage is counted from the op that creates it until the
    last tensor viewing it is garbage. Tensors that existed before (weights, inputs) are not counted.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(
                self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
            ) -> Any:
                out = func(*args, **(kwargs or {}))
                inputs = {
                    a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
                }
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        counter._track(t, inputs)
                return out

        self._mode = _Mode()
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors viewing it]
        self.current = 0
        self.peak = 0

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        key = t.untyped_storage()._cdata
        entry = self.live.get(key)
        if entry is None:
            if key in inputs:  # a view or in-place result of an uncounted tensor
                return
            entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __enter__(self) -> LiveBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def _vae_trace(vae: nn.Module, dtype: torch.dtype, latent: tuple[int, int, int, int]) -> int:
    """Peak bytes alive while `vae` decodes one (C, T, h, w) latent on the meta device."""
    z = torch.empty(1, *latent, device="meta", dtype=dtype)
    with LiveBytes() as live, torch.no_grad():
        vae.decode(z)
    return live.peak


_DECODE_CACHE: dict[str, int] = {}


def decode_bytes(
    vae: nn.Module, dtype: torch.dtype, latent: tuple[int, int, int, int], trace_frames: int
) -> tuple[int, int]:
    """(peak device bytes of one video's VAE decode and post-processing, the same with spatial tiling).

    The real decoder runs on meta tensors at a small latent size (TRACE_LATENT) and `trace_frames` latent
    frames (enough for its causal cache to be full); the peak is scaled by pixel count, plus the decoded
    frames of the remaining latent frames (kept while the next chunks decode). Post-processing holds the
    video and two temporaries. Tiling: one tile's features (same bytes per pixel), plus every decoded tile
    (overlaps included), the blended rows and the output, kept until the end.
    """
    c, t, h, w = latent
    hs, ws = min(h, TRACE_LATENT[0]), min(w, TRACE_LATENT[1])
    ft = min(trace_frames, t)
    config = json.dumps(dict(vae.config), sort_keys=True, default=str)
    key = f"{type(vae).__name__}|{config}|{dtype}|{c}x{ft}x{hs}x{ws}"
    if key not in _DECODE_CACHE:
        built = next(vae.parameters()).dtype
        # nn.Module.to: ModelMixin.to() warns about fp32 modules; a copy keeps the caller's module as built.
        traced = vae if built == dtype else nn.Module.to(copy.deepcopy(vae), dtype)
        _DECODE_CACHE[key] = _vae_trace(traced, dtype, (c, ft, hs, ws))
    spatial, temporal = vae_factors(vae)
    H, W = h * spatial, w * spatial
    frame = 3 * H * W * dtype.itemsize  # one decoded RGB frame
    out = ((t - 1) * temporal + 1) * frame  # the decoded video
    features = _DECODE_CACHE[key] * (h * w) / (hs * ws)
    plain = int(max(features + (t - ft) * temporal * frame, 3 * out))

    # Tiled: tile size and stride from the VAE's own settings (diffusers' attribute names).
    th, tw = getattr(vae, "tile_sample_min_height", None), getattr(vae, "tile_sample_min_width", None)
    if not th or not tw or (H <= th and W <= tw):
        return plain, plain
    sh = getattr(vae, "tile_sample_stride_height", None) or th * (1 - getattr(vae, "tile_overlap_factor_height", 0.25))
    sw = getattr(vae, "tile_sample_stride_width", None) or tw * (1 - getattr(vae, "tile_overlap_factor_width", 0.25))
    tiles_h = sum(min(th, H - y) for y in range(0, H, max(1, int(sh))))
    tiles_w = sum(min(tw, W - x) for x in range(0, W, max(1, int(sw))))
    tiles = out * (tiles_h * tiles_w) / (H * W)
    tile_features = features * (th * tw) / (H * W)
    tiled = int(max(tile_features + tiles, tiles + 3 * out))
    return plain, min(plain, tiled)


def vae_factors(vae: nn.Module) -> tuple[int, int]:
    """(spatial, temporal) compression of a diffusers video VAE, from its config."""
    c = vae.config
    down = config_get(c, "temperal_downsample", default=None)
    blocks = config_get(c, "block_out_channels", default=None)
    spatial = config_get(c, "scale_factor_spatial", default=None) or (
        2 ** len(down) if down is not None else 2 ** (len(blocks) - 1) if blocks else 8
    )
    temporal = config_get(c, "scale_factor_temporal", "temporal_compression_ratio", default=None) or (
        2 ** sum(down) if down is not None else 4
    )
    return int(spatial), int(temporal)
