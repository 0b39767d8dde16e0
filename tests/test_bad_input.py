"""Bad settings from the command line, by class: one line naming the option, the value and what is allowed; exit 2;
no traceback; checked before weights load and before Hydra creates any folder; nothing written.

Most cases run `demo.main` in this process (its pre-flight check ends before Hydra starts); a few run demo.py as a
real process to check the exit status and the output stream as a user sees them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import demo
from tests import helpers
from tests.helpers import run_demo

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=tiny_contentv", "backend=cpu"]

# (override, the option the line must name)
CASES = [
    # 1. hard limits: the encoder's, the scheduler's timesteps, sane frame rates
    ("sampling.num_frames=100001", "sampling.num_frames"),
    ("sampling.num_inference_steps=1000000", "sampling.num_inference_steps"),
    ("sampling.width=1000000000", "sampling.width"),
    ("sampling.height=100000", "sampling.height"),
    ("sampling.width=16400", "sampling.width"),
    ("sampling.fps=1000000000", "sampling.fps"),
    ("sampling.fps=0", "sampling.fps"),
    # 2. non-finite and unchecked numbers, every field of every group whatever the other choices
    ("sampling.guidance_scale=nan", "sampling.guidance_scale"),
    ("sampling.guidance_scale=inf", "sampling.guidance_scale"),
    ("sampling.guidance_scale=-1", "sampling.guidance_scale"),
    ("sampling.seed=99999999999999999999999", "sampling.seed"),
    ("sampling.max_sequence_length=0", "sampling.max_sequence_length"),
    ("memory.budget_gb=-4", "memory.budget_gb"),
    ("memory.budget_gb=nan", "memory.budget_gb"),
    ("memory.budget_gb=0", "memory.budget_gb"),
    ("memory.attention_slicing=-5", "memory.attention_slicing"),
    ("memory.group_offload_blocks=0", "memory.group_offload_blocks"),
    ("memory.quantization=int3", "memory.quantization"),
    ("memory.text_encoders=gpu", "memory.text_encoders"),
    ("memory.guidance_mode=parallel", "memory.guidance_mode"),
    ("+backend.options.fast=1", "backend.options.fast"),  # the CPU backend has no options of its own
    ("backend.device_index=-1", "backend.device_index"),
    ("backend.attention=magic", "backend.attention"),
    ("debug=2", "debug"),
    ("memory.vae_tiling=maybe", "memory.vae_tiling"),  # true, false or null
    ("sweep.baseline=-1", "sweep.baseline"),
    ("dry_run=yes", "dry_run"),
    ("mode=daemon", "mode"),
    ("serve.port=70000", "serve.port"),
    ("serve.max_queue_per_key=1000", "serve.max_queue_per_key"),  # more than serve.max_queue
    ("serve.workers=slurm", "serve.workers"),
    ("output.crf=52", "output.crf"),
    ("speedup.cache=teacache", "speedup.cache"),
    ("speedup.cache_threshold=nan", "speedup.cache_threshold"),
    ("speedup.cache_threshold=-1", "speedup.cache_threshold"),
    ("speedup.compile_mode=fastest", "speedup.compile_mode"),
    ("ui.port=70000", "ui.port"),
    ("ui.host=not_a:host!", "ui.host"),
    ("ui.max_queue=0", "ui.max_queue"),
    ("parallel.ulysses_degree=0", "parallel.ulysses_degree"),
    ("parallel.ulysses_degree=2", "parallel.ulysses_degree"),  # without a launcher
    ("model.tiny_seed=-1", "model.tiny_seed"),
    ("model.dtype=float64", "model.dtype"),
    ("model.text_encoder_dtype=int8", "model.text_encoder_dtype"),
    ("model.family=sd3", "model.family"),
    # 3. output names are file names
    ("output.name=../x", "output.name"),
    ("output.name=/tmp/abs", "output.name"),
    ("output.name=a/b", "output.name"),
    ("output.name=..", "output.name"),
    ("output.name=.hidden", "output.name"),
    ("output.name=" + "x" * 300, "output.name"),
    # 4. a tiny model is built in code: a path beside it is refused, never ignored
    ("model.path=/tmp", "model.path"),
    # prompts
    ("sampling.prompt=", "sampling.prompt"),
    ("sampling.prompt=" + "a" * 30_000, "sampling.prompt"),
    ("sampling.prompt=caf\udce9", "sampling.prompt"),  # 0xE9 from a Latin-1 terminal (surrogateescape)
    ("sampling.max_prompts=0", "sampling.max_prompts"),
]


def run_in_process(capsys, tmp_path: Path, *args: str) -> tuple[int, str]:
    proc = helpers.run_in_process(capsys, [*BASE, f"hydra.run.dir={tmp_path / 'run'}", *args])
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(("override", "option"), CASES, ids=[c[0][:50] for c in CASES])
def test_bad_setting_is_one_line_exit_2_nothing_written(capsys, tmp_path, cache_dir, override, option):
    code, err = run_in_process(capsys, tmp_path, override)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"error: {option}"), err
    assert "is not valid" in lines[0] and "Traceback" not in err
    assert len(lines[0]) < 600  # a 30,000-character value is shown cut short
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["hydra.run.dir", "output.dir"])
def test_a_folder_that_cannot_be_made_is_one_line(capsys, tmp_path, option):
    code = demo.main([*BASE, f"{option}=/proc/contentv-{os.getpid()}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {option}='/proc/contentv-") and "can be created" in err
    assert err.count("\n") == 1


def test_a_sweep_checks_every_job_and_names_the_sweep_folder(capsys, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "file.txt").write_text("")
    code = demo.main(["-m", *BASE, "sampling.seed=1,2", f"hydra.sweep.dir={tmp_path}/a/file.txt/x"])
    err = capsys.readouterr().err
    assert code == 2 and "error: hydra.sweep.dir=" in err and "is a file" in err
    code = demo.main(["-m", *BASE, "sampling.fps=8,0", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert code == 2 and "sampling.fps=0" in capsys.readouterr().err and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_real_process_exits_2_with_one_line_on_stderr(tmp_path, cache_dir):
    """Once as a real process (the other settings run in this process above): the status and the streams as the
    shell sees them, and nothing written in the folder it runs in, not even outputs/ or a Hydra log."""
    proc = run_demo([*BASE, "sampling.guidance_scale=nan"], cache_dir, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_sweep_baseline_beyond_the_sweep_is_one_line(capsys, tmp_path, cache_dir):
    """sweep.baseline names a job of this sweep: checked against the number of jobs before any job runs."""
    code = demo.main(["-m", *BASE, f"hydra.sweep.dir={tmp_path / 'sweep'}", "sampling.seed=1,2", "sweep.baseline=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: sweep.baseline=2 is not valid: a job number of this sweep: 0..1"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ round three: files and env


@pytest.mark.parametrize("option", ["hydra.run.dir", "output.dir"])
@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_folder_through_a_broken_link_is_one_line(capsys, tmp_path, option, kind):
    link = tmp_path / "link"
    if kind == "dangling":
        link.symlink_to(tmp_path / "nowhere")
    else:
        link.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(link)
    code = demo.main([*BASE, f"{option}={link / 'run'}"])
    err = capsys.readouterr().err
    words = "is a symbolic link loop" if kind == "loop" else "which doesn't exist"
    assert code == 2 and err.startswith(f"error: {option}=") and words in err and err.count("\n") == 1, err


def test_a_prompt_file_too_long_is_refused_saying_how_to_allow_it(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(10_000)))
    code, err = run_in_process(capsys, tmp_path / "x", f"sampling.prompt_file={prompts}")
    assert code == 2 and "set sampling.max_prompts=10000" in err and err.count("\n") == 1, err


def test_a_cache_that_is_a_file_is_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("CONTENTV_CACHE", str(tmp_path / "cache"))
    code, err = run_in_process(capsys, tmp_path / "x")
    assert code == 2 and err.startswith(f"error: CONTENTV_CACHE='{tmp_path / 'cache'}' is not valid: "), err
    assert "(it is a file)" in err and err.count("\n") == 1


def test_a_bad_use_ascend_npu_names_the_variable(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("USE_ASCEND_NPU", "maybe")
    code = demo.main(["model=tiny_contentv", "backend=auto", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: USE_ASCEND_NPU='maybe' is not valid: "), err
