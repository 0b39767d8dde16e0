"""demo.py end to end on the tiny model, and every bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import demo
from contentv.video import read_mp4_frames, read_mp4_metadata
from tests.helpers import run_demo

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_contentv", "backend=cpu"]


def test_tiny_run_writes_a_playable_mp4_and_sidecar(golden_run):
    out = golden_run.folder
    videos = list(out.glob("*.mp4"))
    assert len(videos) == 1
    video = videos[0]
    assert f"video:   {video}" in golden_run.stdout  # the summary says where the file is
    frames, fps = read_mp4_frames(video)
    assert frames.shape == (13, 64, 96, 3) and fps == 8.0  # tiny_contentv's defaults
    assert frames.std() > 1.0  # not a blank video
    tags = read_mp4_metadata(video)
    assert tags["title"] == "a red fox walks in snow" and tags["seed"] == "42"

    side = json.loads(video.with_suffix(".json").read_text())
    assert side["prompt"] == "a red fox walks in snow" and side["seed"] == 42
    assert side["negative_prompt"].startswith("overexposed")
    assert side["config"]["sampling"]["num_frames"] == 13  # the resolved config, defaults filled in
    assert side["config"]["model"]["name"] == "tiny_contentv"
    assert {"load", "text_encoding", "denoising", "decoding", "writing"} <= set(side["timings_s"])
    assert side["peak_memory"]["host_rss_bytes"] > 0
    assert {"torch", "diffusers", "transformers"} <= set(side["versions"])
    assert side["prepared"]["attention_kernel"] == "sdpa"
    assert not [p for p in out.iterdir() if "partial" in p.name]


@pytest.mark.slow
def test_same_seed_gives_the_same_video_and_never_overwrites(golden_run, tmp_path, cache_dir):
    out = tmp_path / "run"
    shutil.copytree(golden_run.folder, out)  # the shared run's folder stays as it was made
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    proc = run_demo(
        [*TINY, f"hydra.run.dir={out}", "sampling.prompt=a red fox walks in snow", "output.sidecar=false"], cache_dir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = sorted(out.glob("*.mp4"))
    assert len(after) == 2 and any(p.stem.endswith("-1") for p in after)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # the first file is untouched
    a, b = (read_mp4_frames(p)[0] for p in after)
    np.testing.assert_array_equal(a, b)  # same seed, same frames (after the same encoder)


def test_help_lists_groups_options_and_every_field_with_its_description():
    from contentv.config import field_docs

    args = [sys.executable, str(ROOT / "demo.py"), "--help", "model=tiny_contentv"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == ""
    for group in ("backend", "model", "memory", "sampling", "output", "parallel", "hydra/launcher"):
        assert re.search(rf"^  {re.escape(group)} +\S", proc.stdout, re.M), group
    for option in ("tiny_contentv*", "contentv_8b", "cuda", "npu", "none*"):  # * = this command line's choice
        assert option in proc.stdout
    docs = field_docs()
    assert len(docs) > 50 and all(docs.values())  # every field has a description (the comment above it)
    for key, doc in docs.items():  # each with this command line's value and the first words of its description
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(f"  {key}=")), None)
        assert line is not None, key
        assert " ".join(doc.split()[:3]) in proc.stdout, key
    assert "  sampling.height=null" in proc.stdout and "  model.name=tiny_contentv" in proc.stdout


BAD = [
    (["sampling.num_frames=50"], "sampling.num_frames=50"),
    (["sampling.height=100"], "sampling.height=100"),
    (["sampling.width=0"], "sampling.width=0"),
    (["sampling.height=-16"], "sampling.height=-16"),
    (["sampling.num_inference_steps=0"], "sampling.num_inference_steps=0"),
    (["sampling.prompt="], "sampling.prompt"),
    (["sampling.prompt=   "], "sampling.prompt"),
    (["sampling.num_frames=abc"], "sampling.num_frames"),
    (["backend=tpu"], "backend='tpu'"),
    (["model=contentv_80b"], "model='contentv_80b'"),
    (["memory=tiny_vram"], "memory='tiny_vram'"),
    (["model.family=sora"], "model.family='sora'"),
    (["backend.attention=magic"], "backend.attention='magic'"),
    (["model.dtype=float8"], "model.dtype='float8'"),
    (["sampling.nonsense=1"], "nonsense"),
    (["memory.model_cpu_offload=true", "memory.sequential_cpu_offload=true"], "memory.sequential_cpu_offload"),
    (["sampling.num_inference_steps=2,4"], "needs -m"),
]


def assert_one_line_error(code, err, expected, tmp_path):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(args, expected, tmp_path, capsys, cache_dir):
    code = demo.main([*TINY, f"hydra.run.dir={tmp_path / 'run'}", *args])
    assert_one_line_error(code, capsys.readouterr().err, expected, tmp_path)


def test_bad_model_paths(tmp_path, capsys):
    missing = tmp_path / "nope"
    code = demo.main(["backend=cpu", f"model.path={missing}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(code, capsys.readouterr().err, f"model.path='{missing}'", tmp_path)

    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    (not_ckpt / "model_index.json").write_text("{}")
    code = demo.main(["backend=cpu", f"model.path={not_ckpt}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(code, capsys.readouterr().err, "transformer/config.json", tmp_path)


def test_wrong_kind_of_checkpoint(tmp_path, capsys, tiny_ckpt):
    import shutil

    fake = tmp_path / "sd35"
    shutil.copytree(tiny_ckpt, fake)
    cfg = json.loads((fake / "vae" / "config.json").read_text())
    (fake / "vae" / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    code = demo.main(["backend=cpu", f"model.path={fake}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(code, capsys.readouterr().err, "not valid: a ContentV checkpoint", tmp_path)


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = demo.main([*TINY, f"output.dir={blocker}/videos", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(code, capsys.readouterr().err, "output.dir", tmp_path)


def test_invisible_device(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    code = demo.main(["model=tiny_contentv", "backend=cuda", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(code, capsys.readouterr().err, "backend.name='cuda'", tmp_path)


def test_bad_input_from_a_real_process_has_exit_status_2(tmp_path, cache_dir):
    proc = run_demo([*TINY, "sampling.num_frames=50", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir)
    assert_one_line_error(proc.returncode, proc.stderr, "4k+1", tmp_path)


def test_debug_shows_the_traceback(tmp_path, cache_dir):
    proc = run_demo([*TINY, "sampling.num_frames=50", "debug=true", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_hub_id_without_network_fails_with_one_clear_line(tmp_path, cache_dir):
    env_args = [*TINY, "model.tiny=false", "model.path=nobody/no-such-model", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "CONTENTV_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), *env_args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    # Found out before anything loads (no hub retries), with what to do: a folder, or the tiny model.
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.path='nobody/no-such-model' is not valid: a checkpoint this machine can load")
    assert "model.path=<folder>" in last and "model=tiny_contentv" in last and "offline" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["-m", "--cfg", "job"], ["--multirun", "--info"], ["-c", "job", "--run"]])
def test_two_hydra_modes_are_one_line_exit_2(flags, capsys):
    """Hydra takes one of -m, --run, --cfg, --info per command line; two are a usage error, not its traceback."""
    assert demo.main(["model=tiny_contentv", "backend=cpu", "sampling.seed=1,2", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "can't be combined" in err and "\n" not in err


@pytest.mark.slow
def test_startup_counts_from_python_not_from_the_shell_that_exec_d_it(tmp_path, cache_dir):
    """`bash -c '...; exec python demo.py'` runs Python in the shell's process, whose OS start time is the shell's:
    the recorded start-up must not include what the shell did first (here: sleeping 8 s)."""
    stamp = tmp_path / "exec_at"
    args = " ".join([*TINY, "sampling.height=32", "sampling.width=48", "sampling.num_frames=5"])
    script = (
        f"sleep 8; {sys.executable} -c 'import time; print(time.time())' > {stamp}; "
        f"exec {sys.executable} {ROOT / 'demo.py'} {args} sampling.num_inference_steps=1 hydra.run.dir={tmp_path / 'run'}"
    )
    env = {**os.environ, "CONTENTV_CACHE": str(cache_dir)}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    import time

    ended = time.time()
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sidecar,) = (tmp_path / "run").glob("*.json")
    timings = json.loads(sidecar.read_text())["timings_s"]
    assert 0 < timings["startup"] < ended - float(stamp.read_text())
