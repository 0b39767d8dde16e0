"""Sweeps (-m): weights load once per key, failed jobs fail the sweep, sweeps resume, summaries carry fidelity."""

from __future__ import annotations

import collections
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SMALL, demo_env, run_demo

# Every process of these sweeps on one intra-op thread (see conftest.single_thread: on a shared 2-core machine
# OpenMP's spinning makes a tiny run several times slower); the launchers' worker processes inherit it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TINY_SWEEP = ["model=tiny_contentv", "backend=cpu", *SMALL]  # 32x48, 5 frames, 1 step


def demo(args: list[str], cache_dir, faults: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python demo.py ARGS` (tests/helpers.run_demo) on one thread; `faults` through tests/faults' sitecustomize."""
    return run_demo(args, cache_dir, env=ONE_THREAD, faults=faults)


def sidecars(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*_seed*.json"))]


def events(log: Path) -> list[dict]:
    """What the fault-injection sitecustomize logged: generations started and job records written."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def summary_rows(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_failed_jobs_are_recorded_the_others_finish_the_sweep_exits_1_and_a_rerun_retries_them(tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY_SWEEP, "sampling.seed=1,2,3", f"hydra.sweep.dir={sweep_dir}"]
    proc = demo(args, cache_dir, faults={"CONTENTV_FAULT_FAIL_SEED": "2"})  # job 1 fails as it generates
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"sweep: 1 of 3 jobs failed (see {sweep_dir / 'summary.md'})" in proc.stderr
    rows = summary_rows(sweep_dir)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]  # the job after the failure still ran
    assert "sampling.seed=2" in rows[1]["overrides"] and "injected failure" in rows[1]["error"]
    assert all(Path(r["video"]).is_file() for r in (rows[0], rows[2]))
    assert "3 jobs: 2 ok, 1 failed (job 1)." in (sweep_dir / "summary.md").read_text()
    assert (sweep_dir / "summary.png").stat().st_size > 1000
    # the two good jobs share (model, memory): weights loaded once, then reused past the failed job
    assert sorted(r["prepared"]["pipeline_reused"] for r in sidecars(sweep_dir)) == [False, True]

    again = demo(args, cache_dir)  # the same command, the fault gone: only the failed job runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep: 3 jobs, 2 done, 1 to run (1 failed)" in again.stderr
    assert [r["status"] for r in summary_rows(sweep_dir)] == ["ok"] * 3
    assert [r["reused"] for r in summary_rows(sweep_dir)] == ["yes", "", "yes"]


@pytest.mark.slow
def test_prompt_file_makes_one_video_per_line_loading_once(tmp_path, cache_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox walks in snow\n\n# a comment\na cat sits on a stool\na dog runs\n")
    out = tmp_path / "run"
    proc = demo([*TINY_SWEEP, f"sampling.prompt_file={prompts}", f"hydra.run.dir={out}"], cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sidecars(out)
    assert sorted(r["prompt"] for r in records) == ["a cat sits on a stool", "a dog runs", "a red fox walks in snow"]
    assert [r["prepared"]["pipeline_reused"] for r in records].count(False) == 1
    assert len(list(out.glob("*.mp4"))) == 3


@pytest.mark.slow
def test_missing_prompt_file_is_a_usage_error(tmp_path, cache_dir):
    proc = demo(
        [
            *TINY_SWEEP,
            f"sampling.prompt_file={tmp_path}/nope.txt",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cache_dir,
    )
    assert proc.returncode == 2 and "sampling.prompt_file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def sweep_with_launcher(
    launcher: str, plugin: str, seeds: str, tmp_path, cache_dir, faults: dict[str, str] | None = None
) -> tuple[Path, list[dict], subprocess.CompletedProcess]:
    """A sweep over `seeds` (one job each) through one of conf/hydra/launcher's configs; returns the folder, CSV rows
    and process."""
    pytest.importorskip(plugin)
    sweep_dir = tmp_path / "sweep"
    args = ["-m", f"hydra/launcher={launcher}", *TINY_SWEEP, f"sampling.seed={seeds}", f"hydra.sweep.dir={sweep_dir}"]
    proc = demo(args, cache_dir, faults=faults)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, summary_rows(sweep_dir), proc


@pytest.mark.slow
def test_submitit_local_launcher_requeues_a_preempted_job(tmp_path, cache_dir):
    """One job is enough: it is sent SIGUSR2 as it generates, requeued in a new process, and recorded once."""
    log = tmp_path / "events.jsonl"
    faults = {"CONTENTV_FAULT_LOG": str(log), "CONTENTV_FAULT_PREEMPT_JOB": "0"}  # SIGUSR2 as job 0 generates
    sweep_dir, rows, _ = sweep_with_launcher(
        "local_processes", "hydra_plugins.hydra_submitit_launcher", "1", tmp_path, cache_dir, faults
    )
    assert [r["status"] for r in rows] == ["ok"]
    started = [e["pid"] for e in events(log) if e["event"] == "generate" and e["job"] == "0"]
    assert len(started) == 2 and started[0] != started[1]  # preempted, then requeued in a new process
    assert collections.Counter(e["job"] for e in events(log) if e["event"] == "recorded") == {"0": 1}
    assert len(list((sweep_dir / "0").glob("*.mp4"))) == 1


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes_and_resumes(tmp_path, cache_dir):
    log = tmp_path / "events.jsonl"
    launcher = ("local_parallel", "hydra_plugins.hydra_joblib_launcher", "1,2", tmp_path, cache_dir)
    sweep_dir, rows, _ = sweep_with_launcher(*launcher, faults={"CONTENTV_FAULT_LOG": str(log)})
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # two worker processes: each loaded its own pipeline
    assert [r["prepared"]["pipeline_reused"] for r in sidecars(sweep_dir)] == [False, False]
    first = events(log)
    _, rows, proc = sweep_with_launcher(*launcher, faults={"CONTENTV_FAULT_LOG": str(log)})
    assert "sweep: 2 jobs, 2 done, 0 to run" in proc.stderr
    assert events(log) == first and [r["reused"] for r in rows] == ["yes", "yes"]  # the workers generated nothing


# ------------------------------------------------------------------------------------------ resume


def test_readme_shows_the_recorded_sweep_verbatim():
    """The README's resumed sweep, fidelity table and chart are what benchmarks/sweep_resume.py recorded."""
    readme = (ROOT / "README.md").read_text()
    results = ROOT / "benchmarks" / "results"
    assert "```text\n" + (results / "sweep_tiny.txt").read_text() + "```" in readme
    assert (results / "sweep_tiny.md").read_text() in readme
    assert "](benchmarks/results/sweep_tiny.png)" in readme and (results / "sweep_tiny.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cache_dir) -> tuple[Path, str, list[dict]]:
    """benchmarks/sweep_resume.py at test sizes: a 4-job sweep SIGKILLed once job 2 has started, the same command
    run again (resume), then once more. Returns the sweep folder, the script's transcript and the event log."""
    out = tmp_path_factory.mktemp("resume")
    log = out / "events.jsonl"
    args = ["--out", str(out / "demo"), "--no-record", "--no-compare", "--height", "32", "--width", "48"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep_resume.py"), *args, "--frames", "5", "--steps", "2"],
        capture_output=True,
        text=True,
        env=demo_env(cache_dir, {"CONTENTV_FAULT_LOG": str(log)}, **ONE_THREAD),
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "demo" / "sweep", proc.stdout, events(log)


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_every_job_is_done_exactly_once(resumed):
    sweep_dir, transcript, log = resumed
    done = int(re.search(r"jobs finished before the kill: (\d+)", transcript).group(1))
    resume, rerun = [ln for ln in transcript.splitlines() if ln.startswith("sweep: ")]
    assert done >= 2 and resume.startswith(f"sweep: 4 jobs, {done} done, {4 - done} to run")
    assert rerun == "sweep: 4 jobs, 4 done, 0 to run"
    assert collections.Counter(e["job"] for e in log if e["event"] == "recorded") == {str(n): 1 for n in range(4)}
    # generations came from the killed process and the resumed one; the third run generated nothing
    assert len({e["pid"] for e in log if e["event"] == "generate"}) == 2
    for n in range(4):
        assert len(list((sweep_dir / str(n)).glob("*.mp4"))) == 1
        assert len(list((sweep_dir / str(n)).glob("*.frames.npz"))) == 1


@pytest.mark.slow
def test_the_summary_gives_every_job_its_fidelity_against_the_baseline(resumed):
    from contentv.sweep import frames_path
    from contentv.video import read_frames

    sweep_dir, _, _ = resumed
    rows = summary_rows(sweep_dir)
    assert [r["status"] for r in rows] == ["ok"] * 4 and [r["reused"] for r in rows] == ["yes"] * 4
    assert (rows[0]["psnr_db"], rows[0]["ssim"], rows[0]["fidelity"]) == ("inf", "1.0", "baseline")
    reference = read_frames(frames_path(rows[0]["video"]))
    for r in rows[1:]:
        psnr, ssim = float(r["psnr_db"]), float(r["ssim"])
        same = bool((read_frames(frames_path(r["video"])) == reference).all())
        assert (psnr == float("inf")) == same == (r["fidelity"] == "identical") and 0 < ssim <= 1
    halved = [r for r in rows if "sampling.num_inference_steps=1" in r["overrides"]]
    assert len(halved) == 2 and all(float(r["psnr_db"]) < float("inf") for r in halved)
    assert "| identical | 1.0000 | baseline; reused |" in (sweep_dir / "summary.md").read_text()
    assert (sweep_dir / "summary.png").stat().st_size > 10_000


@pytest.mark.slow
def test_compare_command_flags_a_slower_job(resumed, tmp_path, cache_dir):
    sweep_dir, _, _ = resumed
    after = tmp_path / "after"
    shutil.copytree(sweep_dir, after)
    rows = summary_rows(after)
    rows[1]["generate_s"] = str(float(rows[1]["generate_s"]) * 1.5)
    with (after / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    proc = demo(["compare", str(sweep_dir), str(after)], cache_dir)
    assert proc.returncode == 1 and "REGRESSION: generate s +50%" in proc.stdout, proc.stdout + proc.stderr
    assert "1 of 4 matching jobs regressed beyond 10%" in proc.stdout
    same = demo(["compare", str(sweep_dir), str(sweep_dir), "--threshold", "0.05"], cache_dir)
    assert same.returncode == 0 and "no regression beyond 5% in 4 matching jobs" in same.stdout
