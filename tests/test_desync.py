"""Ranks that agree: under torchrun every rank holds the same decisions (rank 0 decides from the smallest free
memory of all ranks), and an out-of-memory error on one rank stops every rank with one line, never a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "desync_worker.py"
pytestmark = pytest.mark.slow
TINY = [*helpers.TINY, "parallel=cfg"]
LIMIT_S = 240


def launch(tmp_path: Path, scenario: str, *args: str) -> tuple[subprocess.CompletedProcess, float, Path]:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["--log-dir", str(logs), "--redirects", "3", str(WORKER), str(out), scenario, *TINY, *args]
    cmd += [f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the launch hung for {LIMIT_S} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), time.monotonic() - start, logs


def rank_errors(logs: Path) -> tuple[list[str], str]:
    """The `error:` lines every rank printed, and all the ranks' stderr."""
    text = "".join(p.read_text() for p in sorted(logs.rglob("stderr.log")))
    return [ln for ln in text.splitlines() if ln.startswith("error:")], text


def test_ranks_with_different_free_memory_make_one_decision(tmp_path, cache_dir):
    proc, _, logs = launch(tmp_path, "budget", "memory=auto")
    assert proc.returncode == 0, rank_errors(logs)[1][-3000:]
    decisions = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert decisions[0] == decisions[1]
    assert "of 2.00 GiB" in decisions[0]["memory_choice"]  # the smaller rank's budget
    assert decisions[0]["world_size"] == 2


def test_out_of_memory_on_one_rank_stops_every_rank_with_one_line(tmp_path, cache_dir):
    proc, seconds, logs = launch(tmp_path, "oom", "memory=none")
    errors, text = rank_errors(logs)
    assert proc.returncode != 0
    assert len(errors) == 1 and "out of memory" in errors[0] and "every rank stops" in errors[0], text[-3000:]
    assert "Traceback" not in text
    assert seconds < LIMIT_S
