"""CogVideoX-2B as PaddleNLP ships it: Paddle weights loaded as torch modules, checked, converted, pickles read safely.

tests/fixtures/paddle_tiny_cogvideox was saved by the real Paddle libraries (paddlepaddle 3.3.1, paddlenlp 2.8.1,
ppdiffusers 0.29.0; tests/fixtures/make_paddle_fixture.py) from the same random weights as the diffusers-layout
tests/fixtures/paddle_tiny_cogvideox_torch: sharded T5 pickles, a sharded Paddle-safetensors transformer, Linear
weights stored [in, out].
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from contentv import checkpoint, paddle_format
from contentv.checkpoint import CheckpointError
from contentv.config import MemoryConfig, ModelConfig, RunConfig, SamplingConfig
from contentv.models.cogvideox import SPEC
from contentv.paddle_pickle import UnsafePickle, load_pdparams

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PADDLE = FIXTURES / "paddle_tiny_cogvideox"
TWIN = FIXTURES / "paddle_tiny_cogvideox_torch"
T5_SHARD = "text_encoder/model_state-00001-of-00004.pdparams"


def model_cfg(path: Path, dtype: str = "float32") -> ModelConfig:
    return ModelConfig(name="cogvideox_2b", family="cogvideox", path=str(path), dtype=dtype, vae_dtype=dtype)


@pytest.fixture
def copy(tmp_path) -> Path:
    """A private copy of the Paddle fixture, to damage."""
    return Path(shutil.copytree(PADDLE, tmp_path / "paddle"))


def one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert message.startswith(f"model.path='{path}' is not valid: ") and "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ layout, equality


def test_the_layout_is_read_from_the_files():
    assert paddle_format.detect_layout(PADDLE) == "paddle"
    assert paddle_format.detect_layout(TWIN) == "diffusers"
    assert paddle_format.detect_layout("THUDM/CogVideoX-2b") is None  # a hub id: nothing local to read
    SPEC.check_checkpoint(str(PADDLE))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_loaded_modules_equal_the_diffusers_copy(dtype):
    """Every tensor, its dtype (T5's wo kept in float32 where transformers keeps it) and the tokenizer's ids."""
    ours, theirs = SPEC.load(model_cfg(PADDLE, dtype), str(PADDLE)), SPEC.load(model_cfg(TWIN, dtype), str(TWIN))
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)
    assert ours.tokenizer("a red fox walks").input_ids == theirs.tokenizer("a red fox walks").input_ids


@pytest.fixture(scope="module")
def runtime():
    from backends import build_backend
    from contentv.config import BackendConfig
    from contentv.runtime import Runtime

    return Runtime(build_backend(BackendConfig(name="cpu")))


def run(runtime, path: Path, memory: MemoryConfig | None = None):
    cfg = RunConfig()
    cfg.model = model_cfg(path)
    cfg.memory = memory or MemoryConfig()
    cfg.sampling = SamplingConfig(prompt="a red fox in snow", height=32, width=48, num_frames=9, num_inference_steps=2)
    result = runtime.generate(cfg)
    return result, runtime.record(cfg, result)


@pytest.mark.parametrize(
    "memory",
    [None, MemoryConfig(model_cpu_offload=True, text_encoders="auto"), MemoryConfig(group_offload=True)],
    ids=["default", "model_cpu_offload", "group_offload"],
)
def test_the_video_equals_the_diffusers_copys_and_the_sidecar_says_paddle(runtime, single_thread, memory):
    ours, ours_record = run(runtime, PADDLE, memory)
    theirs, theirs_record = run(runtime, TWIN, memory)
    assert ours.frames.shape == (9, 32, 48, 3) and ours.frames.std() > 0.01
    np.testing.assert_allclose(ours.frames, theirs.frames, rtol=0, atol=1e-5)
    assert ours_record["checkpoint"]["layout"] == "paddle"
    assert theirs_record["checkpoint"]["layout"] == "diffusers"


# ------------------------------------------------------------------------------------------ pickles


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pdparams_that_would_run_code_is_refused_and_nothing_runs(copy, tmp_path):
    marker = tmp_path / "ran"
    with open(copy / T5_SHARD, "wb") as fh:
        pickle.dump({"shared.weight": RunsCode(marker)}, fh, protocol=4)
    with pytest.raises(UnsafePickle):
        load_pdparams(copy / T5_SHARD)
    with pytest.raises(CheckpointError) as info:
        SPEC.load(model_cfg(copy), str(copy))
    message = one_line(info, copy)
    assert f"{T5_SHARD} is refused: its pickle asks for {os.system.__module__}.system" in message
    assert not marker.exists()


def test_paddles_own_eval_reduction_is_refused_too(tmp_path):
    # paddle.save pickles a raw DenseTensor as (eval, ("data", {"data": array})): code, so not read.
    class DenseTensor:
        def __reduce__(self):
            return (eval, ("data", {"data": np.zeros(2)}))

    file = tmp_path / "model_state.pdparams"
    file.write_bytes(pickle.dumps({"w": DenseTensor()}, protocol=4))
    with pytest.raises(UnsafePickle, match="builtins.eval"):
        load_pdparams(file)


def test_the_fixtures_pickles_hold_only_arrays():
    state = load_pdparams(PADDLE / T5_SHARD)
    assert state and all(isinstance(v, np.ndarray) for v in state.values())
    assert "StructuredToParameterName@@" not in state  # Paddle's name table is not a tensor


# ------------------------------------------------------------------------------------------ damaged folders


def missing_shard(c: Path) -> None:
    (c / "transformer" / "diffusion_paddle_model-00002-of-00002.safetensors").unlink()


def index_names_a_missing_file(c: Path) -> None:
    f = c / "text_encoder" / "model_state.pdparams.index.json"
    index = json.loads(f.read_text())
    index["weight_map"]["encoder.final_layer_norm.weight"] = "model_state-00009-of-00009.pdparams"
    f.write_text(json.dumps(index))


def truncated_safetensors(c: Path) -> None:
    f = c / "vae" / "diffusion_paddle_model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)


def wider_transformer(c: Path) -> None:
    f = c / "transformer" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "time_embed_dim": 24}))


# The same words as for a damaged diffusers folder (tests/test_checkpoint.py).
DAMAGES = {
    "missing_shard": (
        missing_shard,
        "transformer/diffusion_paddle_model-00002-of-00002.safetensors is missing (named in "
        "diffusion_paddle_model.safetensors.index.json)",
    ),
    "index_names_a_missing_file": (
        index_names_a_missing_file,
        "text_encoder/model_state-00009-of-00009.pdparams is missing (named in model_state.pdparams.index.json)",
    ),
    "truncated_safetensors": (truncated_safetensors, "vae/diffusion_paddle_model.safetensors is truncated"),
    "shape_mismatch": (wider_transformer, "transformer: weights don't match transformer/config.json: tensor"),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_each_damage_is_one_line_before_loading(copy, name):
    damage, words = DAMAGES[name]
    damage(copy)
    with pytest.raises(CheckpointError) as info:
        SPEC.check_checkpoint(str(copy))
    assert words in one_line(info, copy)


def test_a_transposed_shape_is_compared_in_torchs_order(copy):
    """A pickle has no header: its shapes are checked when it is read, before anything is assigned."""
    f = copy / "text_encoder" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "d_ff": 24}))
    SPEC.check_checkpoint(str(copy))  # pickles aren't read by the check
    with pytest.raises(CheckpointError) as info:
        SPEC.load(model_cfg(copy), str(copy))
    assert (
        "text_encoder: weights don't match text_encoder/config.json: tensor "
        "'encoder.block.0.layer.1.DenseReluDense.wi_0.weight' has shape [16, 32] in the weights, [24, 32] from the config"
    ) in one_line(info, copy)


def test_a_truncated_pickle_is_one_line(copy):
    f = copy / T5_SHARD
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(CheckpointError) as info:
        SPEC.load(model_cfg(copy), str(copy))
    assert f"{T5_SHARD} is truncated or not a Paddle state dict" in one_line(info, copy)


# ------------------------------------------------------------------------------------------ conversion


def test_convert_writes_the_diffusers_copy(tmp_path, capsys):
    out = tmp_path / "converted"
    assert checkpoint.main(["convert", str(PADDLE), str(out)]) == 0
    assert f"model.path={out}" in capsys.readouterr().out
    assert paddle_format.detect_layout(out) == "diffusers"
    SPEC.check_checkpoint(str(out))
    for name, stem in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):  # fmt: skip
        ours = {k: v for f in sorted((out / name).glob(f"{stem}*.safetensors")) for k, v in load_file(f).items()}
        theirs = load_file(TWIN / name / f"{stem}.safetensors")
        assert set(theirs) <= set(ours) and all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert "_diffusers_version" in config and "_ppdiffusers_version" not in config
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKLCogVideoX"]


@pytest.mark.parametrize(
    "damage,words",
    [
        (truncated_safetensors, "vae/diffusion_paddle_model.safetensors is truncated"),  # found by the check
        (lambda c: os.truncate(c / T5_SHARD, 100), f"{T5_SHARD} is truncated or not a Paddle state dict"),  # on reading
    ],
    ids=["safetensors", "pickle"],
)
def test_convert_refuses_a_damaged_folder_in_one_line(copy, tmp_path, capsys, damage, words):
    damage(copy)
    assert checkpoint.main(["convert", str(copy), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err
    assert not (tmp_path / "out").exists()  # nothing half-written left behind
