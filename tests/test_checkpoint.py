"""Checkpoint folders are checked before weights load: each damage is one line naming model.path and the component.

The tiny checkpoints are copied and damaged as a download or a conversion could: a folder missing, pickle weights,
a truncated safetensors file, a config that isn't JSON or doesn't match the weights. Command-line cases run
demo.main in this process (one runs demo.py as a real process): exit 2, one error line, no traceback, and Hydra's
run folder never created.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from contentv import checkpoint
from contentv.checkpoint import CheckpointError
from contentv.config import ModelConfig, SamplingConfig
from contentv.errors import ConfigError
from contentv.models.cogvideox import SPEC as COG
from contentv.models.contentv import LAYOUT, SPEC
from tests.helpers import SMALL, run_demo, run_in_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path) -> Path:
    """A private copy of the tiny ContentV checkpoint, to damage."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def tiny_cog(cache_dir) -> str:
    return COG.resolve_path(ModelConfig(name="tiny_cogvideox", family="cogvideox", path=None, tiny=True))


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


# Each damage: (what it does to a copy of the tiny ContentV checkpoint, words the one line must contain).
def no_tokenizer_3(c: Path) -> None:
    shutil.rmtree(c / "tokenizer_3")


def pickle_text_encoder(c: Path) -> None:
    state = load_file(c / "text_encoder" / "model.safetensors")
    (c / "text_encoder" / "model.safetensors").unlink()
    torch.save(state, c / "text_encoder" / "pytorch_model.bin")


def truncated_transformer(c: Path) -> None:
    f = c / "transformer" / "diffusion_pytorch_model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)


def corrupt_vae_config(c: Path) -> None:
    (c / "vae" / "config.json").write_text('{\n  "_class_name": "AutoencoderKLWan",\n  "base_dim": 8,,\n}\n')


def wider_transformer(c: Path) -> None:
    edit_json(c / "transformer" / "config.json", caption_projection_dim=48)


def layers(n: int) -> Callable[[Path], None]:
    return lambda c: edit_json(c / "transformer" / "config.json", num_layers=n)


def deep_tokenizer(c: Path) -> None:
    (c / "tokenizer_3" / "tokenizer.json").write_text("[" * 50_000 + "]" * 50_000)


DAMAGES = {
    "no_tokenizer_3": (no_tokenizer_3, "tokenizer_3/ is missing"),
    "pickle_weights": (pickle_text_encoder, "text_encoder has only pickle weights (pytorch_model.bin"),
    "truncated_safetensors": (truncated_transformer, "transformer/diffusion_pytorch_model.safetensors is truncated"),
    "invalid_json": (corrupt_vae_config, "vae/config.json is not valid JSON (line 3:"),
    "shape_mismatch": (wider_transformer, "transformer: weights don't match transformer/config.json: tensor"),
    "layers_100000": (layers(100_000), "transformer/config.json: num_layers=100000 but the weights hold 3 layers"),
    "layers_negative": (layers(-1), "transformer/config.json: num_layers=-1 is negative"),
    "deep_json": (deep_tokenizer, "tokenizer_3/tokenizer.json is not a usable JSON file (JSON nested more than"),
}


# ------------------------------------------------------------------------------------------ the check, in process


def test_the_tiny_checkpoints_pass(tiny_ckpt, tiny_cog):
    SPEC.check_checkpoint(tiny_ckpt)
    COG.check_checkpoint(tiny_cog)


@pytest.mark.parametrize("name", DAMAGES)
def test_each_damage_is_one_line_naming_the_path_and_component(ckpt, name):
    damage, words = DAMAGES[name]
    damage(ckpt)
    with pytest.raises(CheckpointError) as info:
        SPEC.check_checkpoint(str(ckpt))
    message = str(info.value)
    assert message.startswith(f"model.path='{ckpt}' is not valid: ") and "\n" not in message
    assert words in message


def test_pickle_weights_get_a_way_to_convert_them_that_works(ckpt):
    pickle_text_encoder(ckpt)
    with pytest.raises(CheckpointError, match="unsafe to load.*convert them with: python -m contentv.checkpoint"):
        SPEC.check_checkpoint(str(ckpt))
    proc = subprocess.run(
        [sys.executable, "-m", "contentv.checkpoint", "convert", str(ckpt)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "text_encoder/model.safetensors" in proc.stdout
    SPEC.check_checkpoint(str(ckpt))  # now safetensors: accepted
    before = torch.load(ckpt / "text_encoder" / "pytorch_model.bin", weights_only=True)
    after = load_file(ckpt / "text_encoder" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_missing_tensor_is_named(ckpt):
    f = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    gone = sorted(state)[0]
    del state[gone]
    save_file(state, f)
    with pytest.raises(CheckpointError, match=f"vae: .*tensor '{gone}' .* is missing from the weights"):
        SPEC.check_checkpoint(str(ckpt))


def test_a_text_encoder_config_that_disagrees_with_its_weights(ckpt):
    edit_json(ckpt / "text_encoder_2" / "config.json", hidden_size=48)
    with pytest.raises(CheckpointError, match=r"text_encoder_2: weights don't match .* has shape \[\d+, 40\]"):
        SPEC.check_checkpoint(str(ckpt))


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda c: (c / "tokenizer_2" / "tokenizer.json").unlink(), "tokenizer_2/ has no vocabulary"),
        (lambda c: (c / "tokenizer" / "tokenizer.json").write_text('{"model": {}}'), "tokenizer/tokenizer.json has no"),
        (lambda c: (c / "transformer" / "config.json").write_text("[1, 2]"), "transformer/config.json is not a JSON"),
        (lambda c: (c / "scheduler" / "scheduler_config.json").write_bytes(b"\xff{}"), "scheduler_config.json is not"),
        (lambda c: (c / "model_index.json").write_text("{"), "model_index.json is not valid JSON"),
        (lambda c: (c / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x01"), "vae/diffusion_pyto"),
    ],
    ids=["no_vocab_file", "empty_vocab", "config_not_object", "config_not_utf8", "bad_index", "tiny_file"],
)
def test_more_damage(ckpt, damage, words):
    damage(ckpt)
    with pytest.raises(CheckpointError, match="model.path=") as info:
        SPEC.check_checkpoint(str(ckpt))
    assert words in str(info.value)


def test_a_header_that_lies_about_a_tensor_size(ckpt):
    f = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [*header[name]["shape"], 2]  # twice the elements in the same bytes
    raw = json.dumps(header).encode()  # offsets count from the header's end: the data stays where it belongs
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(CheckpointError, match=f"damaged header \\(tensor '{name}'"):
        SPEC.check_checkpoint(str(ckpt))


def test_real_layouts_are_accepted(ckpt):
    """Sharded weights (diffusers' and transformers' index files), spiece.model tokenizers, variant files and
    pickle copies beside the safetensors, hub files (README, .gitattributes): all load, so all pass."""
    from transformers import T5EncoderModel

    from contentv.models.contentv.transformer import SD3Transformer3DModel

    model = SD3Transformer3DModel.from_pretrained(ckpt, subfolder="transformer")
    shutil.rmtree(ckpt / "transformer")
    model.save_pretrained(ckpt / "transformer", max_shard_size="300KB")
    assert len(list((ckpt / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    t5 = T5EncoderModel.from_pretrained(ckpt, subfolder="text_encoder_3")
    shutil.rmtree(ckpt / "text_encoder_3")
    t5.save_pretrained(ckpt / "text_encoder_3", max_shard_size="2MB")
    assert (ckpt / "text_encoder_3" / "model.safetensors.index.json").is_file()
    shutil.copy(
        ckpt / "vae" / "diffusion_pytorch_model.safetensors", ckpt / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    )
    torch.save({}, ckpt / "vae" / "diffusion_pytorch_model.bin")
    (ckpt / "README.md").write_text("# model card")
    (ckpt / ".gitattributes").write_text("*.safetensors filter=lfs")
    SPEC.check_checkpoint(str(ckpt))

    (ckpt / "tokenizer_3" / "tokenizer.json").unlink()
    (ckpt / "tokenizer_3" / "spiece.model").write_bytes(b"\x00")  # the slow files a fast tokenizer converts
    SPEC.check_checkpoint(str(ckpt))


def test_a_missing_shard_and_variant_only_weights(ckpt):
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(ckpt, subfolder="text_encoder_3")
    shutil.rmtree(ckpt / "text_encoder_3")
    t5.save_pretrained(ckpt / "text_encoder_3", max_shard_size="2MB")
    shard = sorted((ckpt / "text_encoder_3").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"text_encoder_3/{shard.name} is missing \\(named in model.safetensors"):
        SPEC.check_checkpoint(str(ckpt))

    vae = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    vae.rename(vae.with_name("diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(CheckpointError, match="vae.*found only diffusion_pytorch_model.fp16.safetensors"):
        checkpoint.check_folder(str(ckpt), [p for p in LAYOUT if p.name == "vae"])


def test_a_checkpoint_fixed_in_place_is_checked_again(ckpt):
    """Passing checks are remembered per file sizes and times: a file changed afterwards is checked again."""
    SPEC.check_checkpoint(str(ckpt))
    truncated_transformer(ckpt)
    with pytest.raises(CheckpointError, match="truncated"):
        SPEC.check_checkpoint(str(ckpt))


def test_cogvideox_checks_too(tiny_cog, tmp_path):
    c = Path(shutil.copytree(tiny_cog, tmp_path / "cog"))
    shutil.rmtree(c / "text_encoder")
    (c / "text_encoder").mkdir()
    shutil.copy(Path(tiny_cog) / "text_encoder" / "config.json", c / "text_encoder")
    with pytest.raises(CheckpointError, match="text_encoder/ has no weights"):
        COG.check_checkpoint(str(c))
    # uses_rope reads the transformer config before the checkpoint check: one line there too.
    (c / "transformer" / "config.json").write_text("{oops")
    cfg = ModelConfig(name="local", family="cogvideox", path=str(c), tiny=False)
    with pytest.raises(CheckpointError, match="transformer/config.json is not valid JSON \\(line 1"):
        COG.validate_for_model(cfg, SamplingConfig(max_sequence_length=100))


# ------------------------------------------------------------------------------------------ loading


def test_a_load_failure_the_check_cannot_see_is_one_line(ckpt):
    """A damaged spiece.model passes the cheap check (it is present) and fails in the tokenizer library."""
    (ckpt / "tokenizer_3" / "tokenizer.json").unlink()
    (ckpt / "tokenizer_3" / "spiece.model").write_bytes(os.urandom(100))
    SPEC.check_checkpoint(str(ckpt))
    cfg = ModelConfig(name="local", family="contentv", path=str(ckpt), tiny=False, dtype="float32")
    with pytest.raises(CheckpointError) as info:
        SPEC.load(cfg, str(ckpt))
    assert str(info.value).startswith(f"model.path='{ckpt}' is not valid: tokenizer_3: ")
    assert info.value.component == "tokenizer_3" and "\n" not in str(info.value)


def test_pickle_weights_are_never_loaded_even_without_the_check(ckpt):
    pickle_text_encoder(ckpt)
    cfg = ModelConfig(name="local", family="contentv", path=str(ckpt), tiny=False, dtype="float32")
    with pytest.raises(
        CheckpointError, match="text_encoder: .*only pickle weights.*python -m contentv.checkpoint convert"
    ):
        SPEC.load(cfg, str(ckpt))


@pytest.mark.parametrize(
    "error,wrapped",
    [
        (OSError("disk on fire\nmore"), True),
        (KeyError("added_tokens"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), False),
        (RuntimeError("NPU out of memory. Tried to allocate"), False),
        (MemoryError(), False),
        (KeyboardInterrupt(), False),
        (ConfigError("model.dtype", "x", "float32"), False),
    ],
)
def test_load_component_wraps_library_errors_only(tmp_path, error, wrapped):
    def load():
        raise error

    with pytest.raises(BaseException) as info:
        checkpoint.load_component(str(tmp_path), "vae", load)
    if wrapped:
        assert isinstance(info.value, CheckpointError) and info.value.__cause__ is error
        assert str(info.value) in (
            f"model.path='{tmp_path}' is not valid: vae: disk on fire",
            f"model.path='{tmp_path}' is not valid: vae: KeyError: 'added_tokens'",
        )
    else:
        assert info.value is error


def test_hub_ids_are_left_to_the_runtime(tmp_path):
    """A hub id's OSError stays an OSError: the runtime explains downloads and missing network itself."""

    def load():
        raise OSError("could not connect")

    with pytest.raises(OSError, match="could not connect") as info:
        checkpoint.load_component("nobody/no-such-model", "vae", load)
    assert not isinstance(info.value, ConfigError)


# ------------------------------------------------------------------------------------------ the command line


def assert_one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one `error:` line on stderr (libraries may print their own import warnings), no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def refuse_damaged(capsys, ckpt: Path, name: str, tmp_path: Path, real_process: bool = False) -> None:
    damage, words = DAMAGES[name]
    damage(ckpt)
    run = tmp_path / "run"
    args = ["model=tiny_contentv", "model.tiny=false", "model.name=local", f"model.path={ckpt}", "backend=cpu"]
    args = [*args, *SMALL, f"hydra.run.dir={run}"]
    proc = run_demo(args) if real_process else run_in_process(capsys, args)
    assert_one_error_line(proc, f"error: model.path='{ckpt}' is not valid: ", words)
    assert not run.exists()


@pytest.mark.parametrize("name", DAMAGES)
def test_demo_refuses_a_damaged_checkpoint_before_anything_is_written(capsys, ckpt, name, tmp_path, cache_dir):
    """demo.main in this process, each damage."""
    refuse_damaged(capsys, ckpt, name, tmp_path)


@pytest.mark.slow
def test_a_real_process_refuses_a_damaged_checkpoint(capsys, ckpt, tmp_path, cache_dir):
    """Once as a real process, the damage found deepest (a tensor's shape against its config, past the imports of
    the loading libraries): exit 2 and one error line on stderr as the user sees them, no traceback, no run folder."""
    refuse_damaged(capsys, ckpt, "shape_mismatch", tmp_path, real_process=True)


def test_demo_refuses_a_cogvideox_config_that_is_not_json(capsys, tiny_cog, tmp_path, cache_dir):
    c = Path(shutil.copytree(tiny_cog, tmp_path / "cog"))
    (c / "transformer" / "config.json").write_text('{"_class_name": "CogVideoXTransformer3DModel",\n"x": }')
    run = tmp_path / "run"
    args = ["model=tiny_cogvideox", "model.tiny=false", "model.name=local", f"model.path={c}", "backend=cpu"]
    proc = run_in_process(
        capsys, [*args, "sampling.height=32", "sampling.width=48", "sampling.num_frames=9", f"hydra.run.dir={run}"]
    )
    assert_one_error_line(proc, f"model.path='{c}'", "transformer/config.json is not valid JSON (line 2")
    assert not run.exists()
