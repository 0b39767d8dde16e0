"""Sweeps (-m): weights load once per (model, memory) key, failures are recorded, summaries written."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["backend=cpu", "sampling.height=32", "sampling.width=48", "sampling.num_frames=5"]


def demo(args, cache_dir, timeout=900):
    env = {**os.environ, "CONTENTV_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def sidecars(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*_seed*.json"))]


@pytest.fixture(scope="module")
def corrupt_and_good(tmp_path_factory, tiny_ckpt):
    """Two checkpoint folders that pass the pre-flight checks; one fails to load (a damaged SentencePiece model:
    present, so the cheap checks pass; truncated weights would be caught before the sweep starts)."""
    root = tmp_path_factory.mktemp("ckpts")
    good, bad = root / "good", root / "bad"
    shutil.copytree(tiny_ckpt, good)
    shutil.copytree(tiny_ckpt, bad)
    (bad / "tokenizer_3" / "tokenizer.json").unlink()
    (bad / "tokenizer_3" / "spiece.model").write_bytes(b"\x00" * 100)
    return good, bad


def test_sweep_reuses_weights_records_failures_and_summarises(tmp_path, cache_dir, corrupt_and_good):
    good, bad = corrupt_and_good
    sweep_dir = tmp_path / "sweep"
    proc = demo(
        [
            "-m",
            *SMALL,
            "model=tiny_contentv",
            "model.tiny=false",
            "model.name=local",
            f"model.path={bad},{good}",
            "sampling.num_inference_steps=1,2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all(str(bad) in r["overrides"] for r in failed)
    assert all(r["error"] for r in failed)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 and all(Path(r["video"]).is_file() for r in ok)
    assert (sweep_dir / "summary.md").read_text().count("| ok |") == 2
    assert (sweep_dir / "summary.png").stat().st_size > 1000
    # the two good jobs share (model, memory): weights loaded once, then reused
    records = sidecars(sweep_dir)
    assert sorted(r["prepared"]["pipeline_reused"] for r in records) == [False, True]


def test_prompt_file_makes_one_video_per_line_loading_once(tmp_path, cache_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox walks in snow\n\n# a comment\na cat sits on a stool\na dog runs\n")
    out = tmp_path / "run"
    proc = demo(
        [
            "model=tiny_contentv",
            *SMALL,
            "sampling.num_inference_steps=1",
            f"sampling.prompt_file={prompts}",
            f"hydra.run.dir={out}",
        ],
        cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sidecars(out)
    assert sorted(r["prompt"] for r in records) == ["a cat sits on a stool", "a dog runs", "a red fox walks in snow"]
    assert [r["prepared"]["pipeline_reused"] for r in records].count(False) == 1
    assert len(list(out.glob("*.mp4"))) == 3


def test_missing_prompt_file_is_a_usage_error(tmp_path, cache_dir):
    proc = demo(
        [
            "model=tiny_contentv",
            *SMALL,
            f"sampling.prompt_file={tmp_path}/nope.txt",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cache_dir,
    )
    assert proc.returncode == 2 and "sampling.prompt_file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def sweep_with_launcher(launcher: str, plugin: str, tmp_path, cache_dir) -> tuple[Path, list[dict]]:
    """A two-job sweep through one of conf/hydra/launcher's configs; returns the sweep folder and CSV rows."""
    pytest.importorskip(plugin)
    sweep_dir = tmp_path / "sweep"
    args = ["-m", f"hydra/launcher={launcher}", "model=tiny_contentv", *SMALL, "sampling.num_inference_steps=1"]
    proc = demo([*args, "sampling.seed=1,2", f"hydra.sweep.dir={sweep_dir}"], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (sweep_dir / "summary.csv").open() as f:
        return sweep_dir, list(csv.DictReader(f))


def test_submitit_local_launcher(tmp_path, cache_dir):
    _, rows = sweep_with_launcher("local_processes", "hydra_plugins.hydra_submitit_launcher", tmp_path, cache_dir)
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, cache_dir):
    sweep_dir, rows = sweep_with_launcher("local_parallel", "hydra_plugins.hydra_joblib_launcher", tmp_path, cache_dir)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # two worker processes: each loaded its own pipeline
    assert [r["prepared"]["pipeline_reused"] for r in sidecars(sweep_dir)] == [False, False]
