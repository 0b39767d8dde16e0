"""contentv.sweep in-process: a job counts as done only when its files say so; fidelity against the baseline;
the summary files; comparing two sweeps."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from contentv import sweep
from contentv.config import BackendConfig, ModelConfig, RunConfig
from contentv.sweep import compare
from contentv.video import write_frames

OVERRIDES = ["model=tiny_contentv", "sampling.num_inference_steps=1"]


def tiny_cfg(folder: Path) -> RunConfig:
    cfg = RunConfig(backend=BackendConfig(name="cpu"))
    cfg.model = ModelConfig(name="tiny_contentv", tiny=True, path=None, dtype="float32")
    cfg.sampling.prompt, cfg.sampling.height, cfg.sampling.width = "a cat", 32, 48
    cfg.sampling.num_frames, cfg.sampling.num_inference_steps = 5, 1
    cfg.output.dir = str(folder)
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_ckpt, single_thread) -> tuple[Path, RunConfig]:
    """A job folder as a sweep job leaves it (demo.record_job's steps): a real tiny run's video, sidecar and
    frames, then the job's record."""
    from backends import build_backend
    from contentv.runtime import Runtime

    folder = tmp_path_factory.mktemp("finished")
    cfg = tiny_cfg(folder)
    results = Runtime(build_backend(cfg.backend)).run_all(cfg)
    for r in results:
        sweep.save_frames(r)
    sweep.write_job_record(folder, 0, OVERRIDES, sweep.job_items(cfg), sweep.job_rows(0, OVERRIDES, results))
    return folder, cfg


@pytest.fixture
def job(finished, tmp_path) -> tuple[Path, RunConfig]:
    """A private copy of the finished job folder (its record names the original paths: rewrite them)."""
    folder, cfg = finished
    copy = tmp_path / "0"
    shutil.copytree(folder, copy)
    record = json.loads((copy / sweep.ROW_FILE).read_text())
    for row in record["rows"]:
        row["video"] = str(copy / Path(row["video"]).name)
        row["sidecar"] = str(copy / Path(row["sidecar"]).name)
    (copy / sweep.ROW_FILE).write_text(json.dumps(record))
    return copy, dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(copy)))


def changed(cfg: RunConfig, group: str, **values) -> RunConfig:
    return dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **values)})


@pytest.mark.slow
def test_a_finished_job_is_done_whatever_the_fields_that_cannot_change_its_video(job):
    folder, cfg = job
    assert cfg.sampling.fps is None and sweep.job_state(folder, cfg).done
    recorded_fps = json.loads(next(folder.glob("*_seed42.json")).read_text())["config"]["sampling"]["fps"]
    for same in (
        changed(cfg, "output", dir="/elsewhere"),
        changed(cfg, "backend", device_index=3),
        changed(cfg, "sweep", baseline=2, fidelity=False),
        dataclasses.replace(cfg, debug=True),
        changed(cfg, "sampling", fps=recorded_fps),  # stating the model's default is the same request
    ):
        state = sweep.job_state(folder, same)
        assert state.done, state.reason


@pytest.mark.slow
@pytest.mark.parametrize(
    "group,values,named",
    [
        ("sampling", {"num_inference_steps": 2}, "sampling.num_inference_steps: 1 -> 2"),
        ("output", {"crf": 23}, "output.crf: 17 -> 23"),
        ("model", {"dtype": "bfloat16"}, "model.dtype: 'float32' -> 'bfloat16'"),
        ("speedup", {"cache": "first_block"}, "speedup.cache: 'none' -> 'first_block'"),
    ],
)
def test_a_changed_setting_redoes_the_job_and_says_which(job, group, values, named):
    folder, cfg = job
    state = sweep.job_state(folder, changed(cfg, group, **values))
    assert not state.done and named in state.reason


@pytest.mark.slow
def test_new_prompts_or_seeds_redo_the_job(job, tmp_path):
    folder, cfg = job
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    for other in (changed(cfg, "sampling", prompt_file=str(prompts)), changed(cfg, "parallel", seeds=[42, 43])):
        state = sweep.job_state(folder, other)
        assert not state.done and "prompts or seeds" in state.reason


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["video", "sidecar", "record", "failed"])
def test_missing_or_damaged_files_redo_the_job(job, damage):
    folder, cfg = job
    video = next(folder.glob("*.mp4"))
    if damage == "video":
        video.unlink()
    elif damage == "sidecar":
        video.with_suffix(".json").write_text("{")
    elif damage == "record":
        (folder / sweep.ROW_FILE).unlink()
    else:
        record = json.loads((folder / sweep.ROW_FILE).read_text())
        record["rows"][0]["status"] = "failed"
        (folder / sweep.ROW_FILE).write_text(json.dumps(record))
    state = sweep.job_state(folder, cfg)
    reason = {"video": "video missing", "sidecar": "sidecar missing or unreadable", "record": "interrupted"}
    assert not state.done and state.reason.startswith(reason.get(damage, "failed"))


@pytest.mark.slow
def test_set_aside_keeps_earlier_files_apart_and_drops_partial_ones(job):
    """A killed writer's partial goes; a live one (another copy of the sweep encoding) is never touched."""
    import subprocess
    import sys

    from contentv.video import _host

    folder, cfg = job
    (folder / ".hydra").mkdir(exist_ok=True)
    (folder / "demo.log").write_text("log\n")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / f".{_host()}.{gone.stdout.strip()}.ab12.partial.mp4").write_bytes(b"half")
    live = folder / f".{_host()}.{os.getpid()}.cd34.partial.mp4"
    live.write_bytes(b"being written")
    before = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    state = sweep.job_state(folder, changed(cfg, "sampling", num_inference_steps=2))
    note = sweep.set_aside(folder, state)
    assert note.startswith("redone (config changed: sampling.num_inference_steps") and "superseded-1/" in note
    assert sorted(p.name for p in (folder / "superseded-1").iterdir()) == [n for n in before if n != "demo.log"]
    assert sorted(p.name for p in folder.iterdir()) == [".hydra", live.name, "demo.log", "superseded-1"]
    live.unlink()
    assert sweep.job_state(folder, cfg).reason == "new"  # nothing counted from the earlier attempt


def test_count_line_says_done_and_remaining_and_why():
    states = [sweep.JobState(True), sweep.JobState(False, "new"), sweep.JobState(False, "config changed: x")]
    assert sweep.count_line(states) == "sweep: 3 jobs, 1 done, 2 to run (1 config changed)"


# ------------------------------------------------------------------------------------------ fidelity


def noise(seed: int = 0, shape=(5, 32, 48, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, size=shape, dtype=np.uint8)


def test_metrics_identical_frames_and_a_known_error():
    a = noise()
    assert sweep.metrics(a, a.copy()) == (math.inf, 1.0)
    psnr, ssim = sweep.metrics(a + 10, a)  # every value off by 10/255: PSNR = 20 log10(255/10)
    assert psnr == pytest.approx(20 * math.log10(25.5), abs=1e-4)  # torchmetrics accumulates in float32
    assert 0 < ssim < 1


def fake_rows(folder: Path, specs: list[tuple[int, int, np.ndarray | None]]) -> list[dict]:
    """One ok row per (job, seed, frames) with its frames kept as a sweep job keeps them (None: no frames file)."""
    rows = []
    for job, seed, frames in specs:
        video = folder / f"{job}" / "v.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        if frames is not None:
            write_frames(frames, sweep.frames_path(video))
        key = {"prompt": "a cat", "seed": seed, "height": 32, "width": 48, "num_frames": 5}
        rows.append({"job": job, "status": "ok", "video": str(video), **key})
    return rows


def test_fidelity_against_the_baseline_with_the_same_prompt_seed_and_size(tmp_path):
    a = noise()
    rows = fake_rows(tmp_path, [(0, 1, a), (1, 1, a + 5), (2, 2, a), (3, 1, None), (4, 1, a.copy())])
    rows.append({"job": 5, "status": "failed", "error": "boom"})
    sweep.fidelity.add_fidelity(rows, baseline=0)
    by = {r["job"]: r for r in rows}
    assert (by[0]["psnr_db"], by[0]["ssim"], by[0]["fidelity"]) == (math.inf, 1.0, "baseline")
    assert math.isfinite(by[1]["psnr_db"]) and 0 < by[1]["ssim"] < 1 and by[1]["fidelity"] == ""
    assert by[2]["psnr_db"] is None and "seed 2 vs 1" in by[2]["fidelity"]
    assert by[3]["psnr_db"] is None and by[3]["fidelity"].startswith("no frames file")
    assert (by[4]["psnr_db"], by[4]["ssim"], by[4]["fidelity"]) == (math.inf, 1.0, "identical")
    assert by[5]["psnr_db"] is None and by[5]["fidelity"] == ""

    sweep.fidelity.add_fidelity(rows, baseline=1)  # another baseline, named by sweep.baseline
    assert by[1]["fidelity"] == "baseline" and by[0]["psnr_db"] == by[4]["psnr_db"] < math.inf
    sweep.fidelity.add_fidelity(rows, baseline=9)
    assert all(r["fidelity"].startswith("no baseline") for r in rows if r["status"] == "ok")


def record_jobs(sweep_dir: Path, rows: list[dict]) -> None:
    for r in rows:
        r.setdefault("override_list", ["model=tiny_contentv", f"sampling.seed={r.get('seed')}", f"job={r['job']}"])
        r.setdefault("overrides", " ".join(r["override_list"]))
        r.update(generate_s=1.0 + r["job"], seconds_per_step=0.5, peak_host_rss_gib=1.0, peak_device_gib=None)
        sweep.write_job_record(sweep_dir / str(r["job"]), r["job"], r["override_list"], [], [r])


def test_summary_shows_identical_failed_and_reused_jobs(tmp_path):
    a = noise()
    rows = fake_rows(tmp_path, [(0, 1, a), (1, 1, a.copy()), (2, 1, a + 5)])
    rows.append({"job": 3, "status": "failed", "error": "RuntimeError: boom"})
    record_jobs(tmp_path, rows)
    result = sweep.write_summary(tmp_path, baseline=0, reused=(0, 1), jobs=5)
    assert result.failed == [3, 4]  # 4 left no record at all
    with result.paths["csv"].open() as f:
        table = {r["job"]: r for r in csv.DictReader(f)}
    assert (table["1"]["psnr_db"], table["1"]["ssim"], table["1"]["reused"]) == ("inf", "1.0", "yes")
    assert 0 < float(table["2"]["psnr_db"]) < math.inf and table["3"]["psnr_db"] == ""
    md = result.paths["md"].read_text()
    assert "| 1 | sampling.seed=1 job=1 | ok |" in md and "| identical | 1.0000 | reused |" in md
    assert "Every job: model=tiny_contentv." in md
    assert "5 jobs: 3 ok, 2 failed (job 3, 4); 2 done in an earlier run and reused." in md
    assert result.paths["png"].stat().st_size > 10_000


# ------------------------------------------------------------------------------------------ compare


def write_csv(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.summary.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return folder


def compare_row(job: int, **values) -> dict:
    row = {"job": job, "overrides": f"sampling.seed={job}", "status": "ok", "prompt": "a cat", "seed": job}
    return {**row, "generate_s": 10.0, "seconds_per_step": 1.0, "peak_host_rss_gib": 4.0, "psnr_db": 40.0, **values}


def failed_row(job: int) -> dict:
    return {"job": job, "overrides": f"sampling.seed={job}", "status": "failed", "error": "RuntimeError: boom"}


def test_compare_flags_what_got_worse_beyond_the_threshold(tmp_path, capsys):
    a = write_csv(tmp_path / "a", [compare_row(0, psnr_db=math.inf), compare_row(1), compare_row(2), compare_row(3)])
    b = write_csv(
        tmp_path / "b",
        [
            compare_row(0, psnr_db=35.0),  # was identical to the baseline, no longer
            compare_row(1, generate_s=11.5, peak_host_rss_gib=4.2),  # +15% time, +5% memory
            failed_row(2),  # a failure row has no prompt or seed: it still faces job 2's video
            compare_row(4),
        ],
    )
    changes = {c.row["overrides"]: c for c in compare.compare(compare.read_sweep(a), compare.read_sweep(b), 0.10)}
    assert changes["sampling.seed=0"].regressions == ["PSNR dB identical -> 35.00"]
    assert changes["sampling.seed=1"].regressions == ["generate s +15%"]
    assert changes["sampling.seed=2"].regressions == ["failed"]
    assert changes["sampling.seed=3"].b is None and changes["sampling.seed=4"].a is None
    assert compare.main([str(a), str(b), "--threshold", "0.2"]) == 1  # +15% time is within 20%
    assert "2 of 3 matching jobs regressed beyond 20%" in capsys.readouterr().out
    assert compare.main([str(a), str(a)]) == 0
    assert "no regression beyond 10% in 4 matching jobs" in capsys.readouterr().out
    assert compare.main([str(a), str(tmp_path / "missing")]) == 2


def test_compare_matches_the_videos_of_a_prompt_file_job_on_prompt_and_seed(tmp_path):
    rows = [compare_row(0, prompt=p, overrides="sampling.prompt_file=p.txt") for p in ("a cat", "a dog")]
    a = write_csv(tmp_path / "a", rows)
    b = write_csv(tmp_path / "b", [{**rows[1], "generate_s": 20.0}, rows[0]])  # another order, the dog slower
    changes = compare.compare(compare.read_sweep(a), compare.read_sweep(b))
    assert [(c.a["prompt"], c.b["prompt"], c.regressions) for c in changes] == [
        ("a cat", "a cat", []),
        ("a dog", "a dog", ["generate s +100%"]),
    ]
