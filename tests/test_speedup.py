"""Optional speed-ups: step caching (FirstBlockCache) and regional torch.compile."""

from __future__ import annotations

import pytest
import torch

from contentv import speedup
from contentv.config import SpeedupConfig
from contentv.errors import ConfigError

CALL = dict(
    prompt="a red fox walks in snow", height=32, width=48, num_frames=5, num_inference_steps=6, guidance_scale=6.0
)


def latents(pipe, mode="batched"):
    g = torch.Generator().manual_seed(3)
    return pipe(**CALL, guidance_mode=mode, generator=g, output_type="latent").frames


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_first_block_cache_skips_blocks_and_stays_close(tiny_pipe, mode):
    base = latents(tiny_pipe, mode)
    calls = []
    attn = tiny_pipe.transformer.transformer_blocks[1].attn  # not called when its block is skipped
    handle = attn.register_forward_hook(lambda *a: calls.append(1))
    applied = speedup.apply(tiny_pipe, SpeedupConfig(cache="first_block", cache_threshold=10.0))
    assert "first_block" in applied["cache"]
    cached = latents(tiny_pipe, mode)
    handle.remove()
    passes = CALL["num_inference_steps"] * (1 if mode == "batched" else 2)
    assert len(calls) < passes  # later blocks were skipped on some steps
    assert not torch.equal(cached, base)  # a huge threshold changes the result...
    assert torch.isfinite(cached).all()
    # ...and state is kept apart per pass kind, then reset between calls: a repeat gives the same latents
    torch.testing.assert_close(latents(tiny_pipe, mode), cached)


def test_first_block_cache_with_a_tiny_threshold_changes_nothing(tiny_pipe):
    base = latents(tiny_pipe)
    speedup.apply(tiny_pipe, SpeedupConfig(cache="first_block", cache_threshold=1e-12))
    torch.testing.assert_close(latents(tiny_pipe), base, rtol=1e-5, atol=1e-5)


def test_bad_speedup_settings():
    with pytest.raises(ConfigError, match="speedup.cache='teacache'"):
        speedup.check(SpeedupConfig(cache="teacache"))
    with pytest.raises(ConfigError, match="speedup.compile_mode"):
        speedup.check(SpeedupConfig(compile_mode="fast"))
    with pytest.raises(ConfigError, match="speedup.cache_threshold"):
        speedup.check(SpeedupConfig(cache_threshold=0))


def test_compile_marks_the_repeated_blocks(tiny_pipe, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    applied = speedup.apply(tiny_pipe, SpeedupConfig(compile=True, compile_mode="max-autotune"))
    assert applied["compile"] == "repeated blocks, mode max-autotune"
    assert [name for name, _ in compiled] == ["JointTransformerBlock"] * 3
    assert compiled[0][1]["mode"] == "max-autotune"


def test_the_step_cache_says_it_changes_the_output_and_compile_does_not():
    assert speedup.output_changes(SpeedupConfig()) == []
    assert speedup.output_changes(SpeedupConfig(compile=True)) == []
    (change,) = speedup.output_changes(SpeedupConfig(cache="first_block", cache_threshold=0.1))
    assert change.startswith("speedup.cache=first_block") and "0.1" in change and "frames change" in change
