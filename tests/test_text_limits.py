"""Issue 18 §6: a T5 prompt longer than the model allows is refused per model before loading (ContentV's T5: 512
tokens, as diffusers' SD3 pipeline and the reference refuse; CogVideoX: 226, its training length)."""

from __future__ import annotations

import pytest

from contentv.config import ModelConfig, SamplingConfig
from contentv.errors import ConfigError
from contentv.models import cogvideox, contentv


def sampling(n: int, family) -> SamplingConfig:
    s = SamplingConfig(prompt="a cat", max_sequence_length=n)
    for key, value in family.SAMPLING_DEFAULTS.items():
        if key != "max_sequence_length" and getattr(s, key, None) is None:
            setattr(s, key, value)
    return s


@pytest.mark.parametrize(("family", "limit"), [(contentv, 512), (cogvideox, 226)])
def test_max_sequence_length_is_refused_above_the_model_limit(family, limit):
    family.SPEC.validate(sampling(limit, family))
    with pytest.raises(ConfigError, match=f"sampling.max_sequence_length={limit + 1}.*1..{limit}"):
        family.SPEC.validate(sampling(limit + 1, family))


def test_the_2b_style_cogvideox_takes_exactly_226():
    cfg = ModelConfig(name="tiny_cogvideox", family="cogvideox", tiny=True)
    cogvideox.SPEC.validate_for_model(cfg, sampling(226, cogvideox))
    with pytest.raises(ConfigError, match="sampling.max_sequence_length=225"):
        cogvideox.SPEC.validate_for_model(cfg, sampling(225, cogvideox))
