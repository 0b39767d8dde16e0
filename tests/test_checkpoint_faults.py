"""Checkpoint files that lie or attack the parser: refused in one line, before anything is built from them.

Counts in a config are bounded by the weights present (num_layers=100000 beside three layers, num_layers=-1),
weights the model would not read are refused, and JSON (configs, tokenizer files, safetensors headers) is
parsed with a size cap and a nesting cap (50,000 levels of `[` is one line, not a RecursionError).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from contentv import untrusted
from contentv.checkpoint import CheckpointError
from contentv.checkpoint_limits import longest_run
from contentv.models.contentv import SPEC


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def refused(ckpt: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        SPEC.check_checkpoint(str(ckpt))
    line = str(info.value)
    assert "\n" not in line
    for w in words:
        assert w in line, line
    return line


def test_a_layer_count_far_beyond_the_weights_is_refused_at_once(ckpt):
    """The tiny transformer has 3 blocks; 100000 would be built block by block (minutes, gigabytes) before."""
    edit_json(ckpt / "transformer" / "config.json", num_layers=100_000)
    start = time.monotonic()
    refused(ckpt, "transformer/config.json: num_layers=100000", "3 layers at most")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("value", [-1, 0, 2])
def test_fewer_layers_than_the_weights_hold_is_refused(ckpt, value):
    """-1 is negative; 0 or 2 would build a model that silently leaves the other blocks' weights unused."""
    edit_json(ckpt / "transformer" / "config.json", num_layers=value)
    words = {
        -1: "num_layers=-1 is negative",
        0: "tensors in the weights are not used by the model it describes (e.g. 'transformer_blocks.",
        2: "weights don't match transformer/config.json",  # the last block differs (context_pre_only)
    }
    refused(ckpt, words[value])


def test_text_encoder_layers_are_bounded_too(ckpt):
    edit_json(ckpt / "text_encoder" / "config.json", num_hidden_layers=5000)
    refused(ckpt, "text_encoder/config.json: num_hidden_layers=5000")


def test_an_absurd_size_or_list_is_refused(ckpt):
    edit_json(ckpt / "transformer" / "config.json", sample_size=2**40)
    refused(ckpt, "sample_size=1099511627776 is larger than any real model")
    edit_json(ckpt / "transformer" / "config.json", sample_size=32, dual_attention_layers=list(range(500)))
    refused(ckpt, "dual_attention_layers has 500 entries")


def test_ids_may_be_negative(ckpt):
    edit_json(ckpt / "text_encoder" / "config.json", pad_token_id=-1)
    SPEC.check_checkpoint(str(ckpt))


def test_deeply_nested_json_is_one_line_not_a_recursion_error(ckpt):
    (ckpt / "tokenizer_3" / "tokenizer.json").write_text("[" * 50_000 + "]" * 50_000)
    refused(ckpt, "tokenizer_3/tokenizer.json is not a usable JSON file (JSON nested more than 100 levels deep)")


def test_a_deeply_nested_safetensors_header_is_one_line(ckpt):
    raw = ('{"a":' + "[" * 50_000 + "]" * 50_000 + "}").encode()
    f = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(len(raw).to_bytes(8, "little") + raw)
    refused(ckpt, "vae/diffusion_pytorch_model.safetensors has a damaged header (JSON nested more than")


def test_a_huge_tokenizer_file_is_refused_before_reading(ckpt, monkeypatch):
    monkeypatch.setattr(untrusted, "MAX_JSON_BYTES", 1000)
    refused(ckpt, "tokenizer", "is too large", "over the 1000 bytes limit")


def test_a_huge_config_is_refused_before_reading(ckpt, monkeypatch):
    with (ckpt / "transformer" / "config.json").open("a") as f:  # sparse: 3 GB that reading would load whole
        f.truncate(3 * 2**30)
    monkeypatch.setattr(untrusted, "read_capped", untrusted.read_capped)
    refused(ckpt, "transformer/config.json is too large (3072 MiB, over the 128 MiB limit)")


def test_depth_scan():
    assert untrusted.json_depth(b'{"a": [1, {"b": "[[[[[["}]}') <= 3
    deep = "[" * 300 + "]" * 300
    assert untrusted.json_depth(deep) == 300
    assert untrusted.json_depth('["\\"[[[' + "[" * 200 + '"]') == 1  # brackets inside a string (escaped quote)
    with pytest.raises(untrusted.TooDeep):
        untrusted.loads(deep)
    assert untrusted.loads('{"a": [[1]]}') == {"a": [[1]]}


def test_longest_run():
    assert longest_run(["blocks.0.w", "blocks.2.w", "x.w", "enc.layers.7.b.0.c"]) == 8
    assert longest_run(["w"]) == 0


def test_memory_planning_reads_configs_with_limits(ckpt):
    """The planner builds components on the meta device from configs alone: bounded and depth-capped too."""
    from contentv.errors import ConfigError
    from contentv.models.contentv.architecture import component_configs

    edit_json(ckpt / "transformer" / "config.json", num_layers=100_000)
    with pytest.raises(ConfigError, match="transformer/config.json: num_layers=100000"):
        component_configs(str(ckpt))
    (ckpt / "transformer" / "config.json").write_text("[" * 50_000)
    with pytest.raises(ConfigError, match="nested more than 100 levels"):
        component_configs(str(ckpt))


@pytest.mark.parametrize("family", ["contentv", "cogvideox-2b", "cogvideox-5b"])
def test_the_real_models_configs_pass_the_bounds(family):
    """The published full-size configs against the tensor names their models hold: no false refusal."""
    import torch

    from contentv.checkpoint_limits import check_counts
    from contentv.models.common import build_on_meta
    from contentv.models.contentv import architecture as cv

    if family == "contentv":
        configs, classes = cv.FULL_SIZE, cv.CLASSES
    else:
        from contentv.models.cogvideox import architecture as cog

        configs, classes = cog.FULL_SIZE[f"THUDM/CogVideoX-{family.split('-')[1]}"], cog.CLASSES

    def fail(problem: str) -> Exception:
        return AssertionError(problem)

    for name, config in configs.items():
        module = build_on_meta(*classes[name], dict(config), torch.bfloat16)
        check_counts(dict(config), dict.fromkeys(module.state_dict()), fail, f"{name}/config.json")
