"""The transformer matches the published ContentV-8B checkpoint's architecture, weight names and math."""

from __future__ import annotations

import inspect

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import get_3d_sincos_pos_embed

from contentv.models.contentv.attention import ContentVJointAttnProcessor
from contentv.models.contentv.transformer import SD3Transformer3DModel

# The published transformer/config.json: SD3's fields at the 8B values (CONTENTV.md).
CONTENTV_8B = dict(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    num_layers=38,
    num_attention_heads=38,
    attention_head_dim=64,
    caption_projection_dim=2432,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    sample_size=128,
    dual_attention_layers=(),
)
SMALL = dict(
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    caption_projection_dim=32,
    joint_attention_dim=48,
    pooled_projection_dim=24,
    in_channels=4,
    out_channels=4,
)


def test_config_fields_are_exactly_sd3s():
    ours = set(inspect.signature(SD3Transformer3DModel.__init__).parameters) - {"self"}
    sd3 = set(inspect.signature(SD3Transformer2DModel.__init__).parameters) - {"self"}
    assert ours == sd3


def test_defaults_are_contentv_8b():
    params = inspect.signature(SD3Transformer3DModel.__init__).parameters
    for key, value in CONTENTV_8B.items():
        assert params[key].default == value, key


@pytest.fixture(scope="module")
def meta_models():
    with init_empty_weights(include_buffers=True):
        ours = SD3Transformer3DModel(**CONTENTV_8B)
        sd3 = SD3Transformer2DModel(**CONTENTV_8B)
    return ours, sd3


def test_state_dict_keys_and_shapes_match_the_checkpoint(meta_models):
    ours, sd3 = meta_models
    expected = {k: v.shape for k, v in sd3.state_dict().items() if k != "pos_embed.pos_embed"}
    got = {k: v.shape for k, v in ours.state_dict().items()}
    assert got == expected
    # Names from the published checkpoint: the per-frame patchifier and QK-norm weights, no 2-D table.
    for key in ("pos_embed.proj.weight", "transformer_blocks.37.attn.norm_added_k.weight", "proj_out.bias"):
        assert key in got
    assert "pos_embed.pos_embed" not in got
    assert got["pos_embed.proj.weight"] == (2432, 16, 2, 2)


def test_parameter_count_is_8b(meta_models):
    ours, _ = meta_models
    n = sum(p.numel() for p in ours.parameters())
    assert 7.9e9 < n < 8.3e9, n


def test_config_written_by_the_reference_class_loads():
    # The reference's config.json carries _class_name SD3Transformer3DModel and every SD3 field.
    config = {
        "_class_name": "SD3Transformer3DModel",
        "_diffusers_version": "0.33.1",
        **SMALL,
        "dual_attention_layers": [],
    }
    model = SD3Transformer3DModel.from_config(config)
    for key, value in SMALL.items():
        assert model.config[key] == value


def small_model(seed: int = 0) -> SD3Transformer3DModel:
    torch.manual_seed(seed)
    return SD3Transformer3DModel(**SMALL).eval()


def test_patch_embedding_is_per_frame_conv_plus_3d_sincos():
    model = small_model()
    b, c, t, h, w = 2, 4, 3, 6, 10  # h != w catches a swapped spatial size
    x = torch.randn(b, c, t, h, w)
    with torch.no_grad():
        got = model.pos_embed(x)
        frames = [model.pos_embed.proj(x[:, :, i]) for i in range(t)]  # each (B, D, h/2, w/2)
        tokens = torch.stack([f.flatten(2).transpose(1, 2) for f in frames], dim=1).flatten(1, 2)  # (B, t*h*w, D)
        pos = (
            get_3d_sincos_pos_embed(
                embed_dim=32,
                spatial_size=(w // 2, h // 2),
                temporal_size=t,
                spatial_interpolation_scale=0.5,
                temporal_interpolation_scale=1.0,
                output_type="pt",
            )
            .flatten(0, 1)
            .to(torch.float32)
        )
    torch.testing.assert_close(got, tokens + pos, rtol=0, atol=1e-6)


def test_unpatchify_inverts_channel_last_patching():
    model = small_model()
    b, c, t, hp, wp, p = 2, 4, 3, 2, 5, 2
    video = torch.randn(b, c, t, hp * p, wp * p)
    # "b c t (h p) (w q) -> b (t h w) (p q c)", written out independently
    tokens = video.reshape(b, c, t, hp, p, wp, p).permute(0, 2, 3, 5, 4, 6, 1).reshape(b, t * hp * wp, p * p * c)
    torch.testing.assert_close(model.unpatchify(tokens, t, hp, wp), video, rtol=0, atol=0)


def test_our_processor_equals_diffusers_joint_processor():
    model = small_model()
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 8, 12),
        encoder_hidden_states=torch.randn(2, 7, 48),
        pooled_projections=torch.randn(2, 24),
        timestep=torch.tensor([500.0, 20.0]),
    )
    with torch.no_grad():
        model.set_attn_processor(JointAttnProcessor2_0())
        expected = model(**inputs).sample
        model.set_attn_processor(ContentVJointAttnProcessor())
        got = model(**inputs).sample
    assert got.shape == (2, 4, 3, 8, 12)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_processor_calls_the_injected_kernel():
    model = small_model()
    calls = []

    def kernel(q, k, v):
        calls.append(tuple(q.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    model.set_attn_processor(ContentVJointAttnProcessor(kernel))
    with torch.no_grad():
        model(torch.randn(1, 4, 2, 4, 4), torch.randn(1, 5, 48), torch.randn(1, 24), torch.tensor([10.0]))
    # 2 layers; joint sequence = 2 frames * 2 * 2 video tokens + 5 text tokens, (B, H, S, D)
    assert calls == [(1, 2, 13, 16)] * 2
