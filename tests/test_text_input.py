"""Text and files at scale: invalid bytes, prompt files (BOM, Unicode line breaks, line numbers, size and count
caps), web-page numbers beyond a float's precision, and the NPU switch read as a boolean.

All in process but one: the command line's refusal of a Latin-1 byte is a process's (argv decoding, exit 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contentv import prompt_file
from contentv.config import RunConfig, SamplingConfig
from contentv.errors import ConfigError
from contentv.form import convert
from contentv.validation import check_settings, check_text, read_prompt_file

ROOT = Path(__file__).resolve().parents[1]
LATIN1_E9 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 terminal's "café"


# ------------------------------------------------------------------------------------------ invalid bytes


@pytest.mark.parametrize("text", [LATIN1_E9, "a \ud800 lone surrogate from JSON"])
def test_text_that_is_not_utf8_is_refused_up_front(text):
    with pytest.raises(ConfigError, match=r"sampling.prompt=.* is not valid: UTF-8 text \(character \d+ is"):
        check_text("sampling.prompt", text)


def test_every_text_field_of_a_run_is_checked(tiny_model_cfg):
    cfg = RunConfig(model=tiny_model_cfg, sampling=SamplingConfig(prompt="a cat", negative_prompt=LATIN1_E9))
    with pytest.raises(ConfigError, match="sampling.negative_prompt=.*UTF-8 text"):
        check_settings(cfg)


@pytest.mark.slow
def test_the_command_line_refuses_a_latin1_byte_before_loading(tmp_path, cache_dir):
    env = {**os.environ, "CONTENTV_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    args = [b"model=tiny_contentv", b"backend=cpu", b"sampling.prompt=caf\xe9 au lait", f"hydra.run.dir={run}".encode()]
    proc = subprocess.run(
        [sys.executable.encode(), str(ROOT / "demo.py").encode(), *args],
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "UTF-8 text" in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert not run.exists()


# ------------------------------------------------------------------------------------------ prompt files


def write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    return str(path)


def test_a_byte_order_mark_does_not_make_a_comment_a_prompt(tmp_path):
    path = write(tmp_path, "\ufeff# my prompts\na cat\r\na dog\n".encode())
    assert read_prompt_file(path) == ["a cat", "a dog"]


@pytest.mark.parametrize("brk", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c"])
def test_unicode_line_breaks_do_not_split_a_prompt(tmp_path, brk):
    """str.splitlines() splits at each of these; a prompt file is split at \\n only. Control characters among
    them are then refused as control characters (with the line number), never turned into two videos."""
    path = write(tmp_path, f"first\nsecond{brk}half\nthird\n".encode())
    if ord(brk) < 32:
        with pytest.raises(ConfigError, match="line 2: text without control characters"):
            read_prompt_file(path)
    else:
        assert read_prompt_file(path) == ["first", f"second{brk}half", "third"]


def test_a_bad_line_is_refused_with_its_number(tmp_path):
    path = write(tmp_path, b"# header\na cat\n\na dog \x07 barking\n")
    with pytest.raises(ConfigError, match=r"is not valid: line 4: text without control characters \(found '\\x07'\)"):
        read_prompt_file(path)
    path = write(tmp_path, b"a cat\n" + b"x" * 20_001 + b"\n")
    with pytest.raises(ConfigError, match="line 2: at most 20000 characters"):
        read_prompt_file(path)
    path = write(tmp_path, b"a cat\na dog\ncaf\xe9\n")
    with pytest.raises(ConfigError, match=r"a UTF-8 text file \(line 3: byte 15 is not UTF-8\)"):
        read_prompt_file(path)


def test_a_huge_file_is_refused_from_its_size_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    with path.open("wb") as f:
        f.truncate(2**30)  # sparse: reading it whole would take a gigabyte
    read = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self))
    with pytest.raises(ConfigError, match=r"a prompt file of at most 16 MiB \(1024 MiB, over the 16 MiB limit\)"):
        read_prompt_file(str(path))
    assert not read


def test_too_many_prompts_are_refused_saying_how_to_allow_them(tmp_path):
    path = write(tmp_path, "".join(f"prompt {i}\n" for i in range(10_000)).encode())
    with pytest.raises(ConfigError, match=r"at most sampling.max_prompts=1000 prompts \(the file has 10000\); .*"):
        read_prompt_file(path, SamplingConfig().max_prompts)
    assert len(read_prompt_file(path, 10_000)) == 10_000


def test_max_prompts_is_checked_and_reaches_the_run(tmp_path, tiny_model_cfg):
    path = write(tmp_path, b"a\nb\nc\n")
    cfg = RunConfig(model=tiny_model_cfg, sampling=SamplingConfig(prompt_file=path, max_prompts=2))
    with pytest.raises(ConfigError, match="sampling.max_prompts=2 prompts"):
        check_settings(cfg)
    cfg.sampling.max_prompts = 0
    with pytest.raises(ConfigError, match="sampling.max_prompts=0 is not valid"):
        check_settings(cfg)
    cfg.sampling.max_prompts = 3
    assert check_settings(cfg).prompts == ["a", "b", "c"]


def test_the_size_cap_is_sane():
    assert prompt_file.MAX_BYTES >= 1000 * 100  # a thousand ordinary prompts fit many times over


# ------------------------------------------------------------------------------------------ web-page numbers


def test_a_seed_beyond_float_precision_is_never_changed():
    big = 2**53 + 1
    assert convert("sampling.seed", big, int) == big  # a JSON integer stays exact
    assert convert("sampling.seed", str(big), int) == big
    with pytest.raises(ConfigError, match=r"sampling.seed=.* an integer of at most 2\*\*53"):
        convert("sampling.seed", float(2**60), int)
    assert convert("sampling.seed", 42.0, int) == 42  # gradio's Number sends floats
    with pytest.raises(ConfigError, match="an integer"):
        convert("sampling.seed", 1.5, int)


# ------------------------------------------------------------------------------------------ the NPU switch


@pytest.mark.parametrize("value", ["false", "False", "0", "no", "off", "", " 0 "])
def test_use_ascend_npu_false_does_not_pick_the_npu(monkeypatch, value):
    import backends

    monkeypatch.setenv("USE_ASCEND_NPU", value)
    assert backends.resolve_name("auto") != "npu"


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_use_ascend_npu_true_picks_the_npu(monkeypatch, value):
    import backends

    monkeypatch.setenv("USE_ASCEND_NPU", value)
    assert backends.resolve_name("auto") == "npu"


def test_a_bad_use_ascend_npu_value_names_the_variable(monkeypatch):
    import backends

    monkeypatch.setenv("USE_ASCEND_NPU", "maybe")
    with pytest.raises(ConfigError, match=r"^USE_ASCEND_NPU='maybe' is not valid: 1/true/yes/on for the NPU"):
        backends.resolve_name("auto")


def test_the_web_page_refuses_a_lone_surrogate_and_an_inexact_seed_before_queueing(cache_dir, tmp_path):
    """JSON sent to the page can carry "\\ud800" and 1e17; both are refused by the page's pre-flight check."""
    import copy
    import json

    import demo
    from backends import build_backend
    from contentv.config import BackendConfig, OutputConfig
    from contentv.studio import Studio

    presets = demo.load_presets()
    cfg = RunConfig(model=copy.deepcopy(presets.models["tiny_contentv"]), backend=BackendConfig(name="cpu"))
    cfg.output = OutputConfig(dir=str(tmp_path))
    studio = Studio(cfg, presets, build_backend)
    try:
        form = studio.defaults()
        form.sampling.update(prompt=json.loads('"a cat \\ud800"'), width=48, height=32, num_frames=5)
        job, message = studio.prepare(form)
        assert job is None and message.startswith("error: sampling.prompt=") and "UTF-8 text" in message
        form.sampling.update(prompt="a cat", seed=json.loads("1e17"))
        job, message = studio.prepare(form)
        assert job is None and "sampling.seed=1e+17 is not valid: an integer of at most 2**53" in message
    finally:
        studio.close()
