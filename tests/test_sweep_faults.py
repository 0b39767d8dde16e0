"""Sweeps never report a false success: resume checks what it reuses, the summary lists exactly this sweep's jobs
and is written whole and never through a link, its failures reach the exit status, compare refuses what it
can't compare, and two copies of a sweep can't run at once.

Job folders are made here as a finished job leaves them (a real H.264 video, its sidecar, its frames file, its
record), without running a model: every check reads files, so files are what the tests damage.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from contentv import atomic, sweep
from contentv.config import BackendConfig, ModelConfig, RunConfig
from contentv.errors import SweepError
from contentv.sweep import compare
from contentv.sweep.resume import expected_config
from contentv.sweep.rows import row_from_record
from contentv.video import VideoWriteError, write_frames, write_video

FRAMES = 5


def make_cfg(folder: Path, model_path: Path | None = None, steps: int = 1) -> RunConfig:
    cfg = RunConfig(backend=BackendConfig(name="cpu"))
    cfg.model = ModelConfig(name="tiny_contentv", tiny=model_path is None, path=model_path and str(model_path))
    cfg.sampling.prompt, cfg.sampling.height, cfg.sampling.width = "a cat", 32, 48
    cfg.sampling.num_frames, cfg.sampling.num_inference_steps = FRAMES, steps
    cfg.output.dir = str(folder)
    return cfg


def make_job(folder: Path, job: int, cfg: RunConfig, seconds: float = 1.0, pixels: int = 0) -> Path:
    """A job folder as finish_job leaves it; `pixels` changes the frames (a fidelity difference)."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = np.zeros((FRAMES, 32, 48, 3), np.uint8)
    frames[:, :pixels] = 255
    side = {"prompt": "a cat", "seed": 42, "config": expected_config(cfg), "seconds_per_step": seconds}
    side |= {"timings_s": {"denoising": seconds}, "peak_memory": {"device_bytes": None, "host_rss_bytes": 2**30}}
    video, sidecar = write_video(frames, folder, "a-cat_seed42", fps=8, sidecar=side)
    write_frames(frames, sweep.frames_path(video))
    overrides = [f"sampling.num_inference_steps={cfg.sampling.num_inference_steps}"]
    row = row_from_record(job, overrides, {**side, "video": video.name}, video, sidecar)
    rows = [{**row, "frames": FRAMES, "note": ""}]
    sweep.write_job_record(folder, job, overrides, sweep.job_items(cfg), rows, sweep.checkpoint_identity(cfg))
    return folder


@pytest.fixture
def done(tmp_path) -> tuple[Path, RunConfig]:
    cfg = make_cfg(tmp_path / "0")
    folder = make_job(tmp_path / "0", 0, cfg)
    assert sweep.job_state(folder, cfg).done
    return folder, cfg


def video_of(folder: Path) -> Path:
    return next(folder.glob("*.mp4"))


# ------------------------------------------------------------------------------------------ resume


def test_a_truncated_video_is_not_done(done):
    folder, cfg = done
    video = video_of(folder)
    os.truncate(video, video.stat().st_size // 2)
    state = sweep.job_state(folder, cfg)
    assert not state.done and state.reason.startswith("video incomplete: a-cat_seed42.mp4 plays ")


def test_a_damaged_frames_file_redoes_the_job_and_never_breaks_the_summary(done):
    folder, cfg = done
    npz = sweep.frames_path(video_of(folder))
    os.truncate(npz, npz.stat().st_size - 40)
    state = sweep.job_state(folder, cfg)
    assert not state.done and state.reason == f"frames file damaged: {npz.name}"
    summary = sweep.write_summary(folder.parent, jobs=1)  # no exception: the row says what is wrong
    assert summary.failed == [] and "damaged" in summary.rows[0]["fidelity"]
    npz.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: opens, but holds no frames
    assert "damaged" in sweep.write_summary(folder.parent, jobs=1).rows[0]["fidelity"]


def test_a_job_run_without_a_frames_file_is_still_done(done):
    """sweep.fidelity=false when it ran: no frames file; the summary says so, the video is not made again."""
    folder, cfg = done
    sweep.frames_path(video_of(folder)).unlink()
    assert sweep.job_state(folder, cfg).done
    assert sweep.write_summary(folder.parent, jobs=1).rows[0]["fidelity"].startswith("no frames file")


@pytest.mark.parametrize(
    "damage",
    [
        lambda rec, side: rec.update(rows=[1]),
        lambda rec, side: rec.update(rows=[{**rec["rows"][0], "override_list": 5}]),
        lambda rec, side: rec.update(rows=[{**rec["rows"][0], "generate_s": "fast"}]),
        lambda rec, side: rec.update(rows=[{**rec["rows"][0], "job": 7}]),
        lambda rec, side: rec.update(items="x", job=True),
        lambda rec, side: side.update(config=[]),
        lambda rec, side: side.update(config={"sampling": 3}),
        lambda rec, side: rec.update(rows=[{**rec["rows"][0], "frames": None, "video": 5}]),
    ],
)
def test_records_of_the_wrong_shape_are_redone_never_a_traceback(done, damage):
    folder, cfg = done
    record_file, side_file = folder / sweep.ROW_FILE, next(folder.glob("*.json"))
    record, side = json.loads(record_file.read_text()), json.loads(side_file.read_text())
    damage(record, side)
    record_file.write_text(json.dumps(record))
    side_file.write_text(json.dumps(side))
    state = sweep.job_state(folder, cfg)
    assert not state.done and state.reason
    summary = sweep.write_summary(folder.parent, jobs=1)
    assert summary.jobs == 1 and summary.failed in ([], [0])


def test_a_deeply_nested_record_is_redone(done):
    folder, cfg = done
    (folder / sweep.ROW_FILE).write_text("[" * 100_000 + "]" * 100_000)
    state = sweep.job_state(folder, cfg)
    assert not state.done and "nested more than" in state.reason
    assert sweep.write_summary(folder.parent, jobs=1).failed == [0]


def test_weights_replaced_in_place_are_not_reused(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "transformer").mkdir(parents=True)
    (ckpt / "model_index.json").write_text("{}")
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"old weights")
    cfg = make_cfg(tmp_path / "0", model_path=ckpt)
    folder = make_job(tmp_path / "0", 0, cfg)
    assert sweep.job_state(folder, cfg).done
    (ckpt / "README.md").write_text("a model card edit changes no weights")
    assert sweep.job_state(folder, cfg).done
    weights.write_bytes(b"new weights, same path")
    state = sweep.job_state(folder, cfg)
    assert not state.done and state.reason.startswith("checkpoint changed")


def test_a_record_without_the_checkpoint_identity_is_redone(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model_index.json").write_text("{}")
    cfg = make_cfg(tmp_path / "0", model_path=ckpt)
    folder = make_job(tmp_path / "0", 0, cfg)
    record = json.loads((folder / sweep.ROW_FILE).read_text())
    del record["checkpoint"]  # written by an older version
    (folder / sweep.ROW_FILE).write_text(json.dumps(record))
    assert sweep.job_state(folder, cfg).reason.startswith("checkpoint changed")


# ------------------------------------------------------------------------------------------ the summary


def test_a_sweep_rerun_with_fewer_jobs_lists_only_its_own(tmp_path):
    for job in range(3):
        make_job(tmp_path / str(job), job, make_cfg(tmp_path / str(job), steps=job + 1), pixels=job)
    assert len(sweep.write_summary(tmp_path, jobs=3).rows) == 3
    summary = sweep.write_summary(tmp_path, jobs=2)
    assert [r["job"] for r in summary.rows] == [0, 1] and summary.jobs == 2
    assert "2 jobs: 2 ok, 0 failed" in (tmp_path / "summary.md").read_text()
    with (tmp_path / "summary.csv").open() as f:
        assert [line.split(",")[0] for line in f][1:] == ["0", "1"]


@pytest.mark.parametrize("name", ["summary.md", "summary.csv", "summary.png"])
def test_summary_files_replace_a_link_never_write_through_it(tmp_path, name):
    make_job(tmp_path / "sweep" / "0", 0, make_cfg(tmp_path / "sweep" / "0"))
    outside = tmp_path / "precious.txt"
    outside.write_text("not yours")
    (tmp_path / "sweep" / name).symlink_to(outside)
    sweep.write_summary(tmp_path / "sweep", jobs=1)
    assert outside.read_text() == "not yours"
    assert not (tmp_path / "sweep" / name).is_symlink() and (tmp_path / "sweep" / name).stat().st_size > 0


def test_the_job_record_replaces_a_link_never_writes_through_it(done, tmp_path):
    folder, cfg = done
    outside = tmp_path / "precious.json"
    outside.write_text("{}")
    (folder / sweep.ROW_FILE).unlink()
    (folder / sweep.ROW_FILE).symlink_to(outside)
    sweep.write_job_record(folder, 0, [], [], [])
    assert outside.read_text() == "{}" and not (folder / sweep.ROW_FILE).is_symlink()


def test_failed_jobs_still_reach_the_exit_status_when_the_summary_cannot_be_written(tmp_path):
    make_job(tmp_path / "0", 0, make_cfg(tmp_path / "0"))  # job 1 left no record: it failed
    (tmp_path / "summary.csv").mkdir()  # the summary can't be written there
    end = sweep.end_sweep(tmp_path, jobs=2)
    assert end.status == 1 and end.out == []
    assert end.err[0].startswith("error: sweep summary not written: ") and "\n" not in end.err[0]
    assert end.err[1] == "sweep: 1 of 2 jobs failed (the summary was not written)"


def test_end_sweep_statuses(tmp_path):
    make_job(tmp_path / "0", 0, make_cfg(tmp_path / "0"))
    end = sweep.end_sweep(tmp_path, jobs=1)
    assert (end.status, end.err) == (0, []) and end.out[0].startswith("sweep summary: ")
    end = sweep.end_sweep(tmp_path, jobs=2)
    assert end.status == 1 and end.err == [f"sweep: 1 of 2 jobs failed (see {tmp_path / 'summary.md'})"]


def full_disk(monkeypatch) -> None:
    """Every atomic write fails with ENOSPC from a real write call (its file object is /dev/full)."""
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        os.close(fd)
        return real(os.open("/dev/full", os.O_WRONLY), mode, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_a_full_disk_while_writing_the_summary_is_one_line(tmp_path, monkeypatch):
    make_job(tmp_path / "0", 0, make_cfg(tmp_path / "0"))
    full_disk(monkeypatch)
    with pytest.raises(SweepError) as info:
        sweep.write_summary(tmp_path, jobs=1)
    assert str(info.value) == f"sweep summary not written: no space left on device while writing {tmp_path}"
    end = sweep.end_sweep(tmp_path, jobs=1)
    assert end.status == 1 and end.err == [f"error: {info.value}"]
    assert not list(tmp_path.glob("summary.*")) and not list(tmp_path.glob(".*partial*"))
    with pytest.raises(VideoWriteError, match=f"^no space left on device while writing {tmp_path / '0'}$"):
        sweep.write_job_record(tmp_path / "0", 0, [], [], [])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_a_full_disk_while_writing_frames_is_one_line(tmp_path, monkeypatch):
    from contentv import video as V

    real = V._new_temp

    def new_temp(folder, suffix):
        tmp = real(folder, suffix)
        tmp.unlink()
        tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(V, "_new_temp", new_temp)
    with pytest.raises(VideoWriteError) as info:
        write_frames(np.zeros((5, 8, 8, 3), np.uint8), tmp_path / "x.frames.npz")
    assert str(info.value) == f"no space left on device while writing {tmp_path}"
    assert info.value.errno == errno.ENOSPC and not (tmp_path / "x.frames.npz").exists()


# ------------------------------------------------------------------------------------------ compare


def summary_csv(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cols = ["job", "overrides", "status", "generate_s", "seconds_per_step", "peak_host_rss_gib", "psnr_db", "prompt"]
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    (folder / "summary.csv").write_text("\n".join(lines) + "\n")
    return folder


ROW = {"job": 0, "overrides": "a=1", "status": "ok", "generate_s": 1.0, "seconds_per_step": 0.5, "psnr_db": 30.0}


def test_compare_survives_odd_bytes_huge_fields_and_zero_psnr(tmp_path, capsys):
    a = summary_csv(tmp_path / "a", [{**ROW, "psnr_db": 0.0}])
    b = summary_csv(tmp_path / "b", [{**ROW, "psnr_db": 0.0, "prompt": "x" * 300_000}])
    with (b / "summary.csv").open("ab") as f:
        f.write(b"1,a=2,ok,1,1,1,1,caf\xe9\n")
    assert compare.main([str(a), str(b)]) == 0
    assert "no regression" in capsys.readouterr().out
    summary_csv(b, [{**ROW, "psnr_db": -1.0}])
    assert compare.main([str(a), str(b)]) == 1
    assert "REGRESSION: PSNR dB 0.00 -> -1.00 dB" in capsys.readouterr().out


def test_compare_refuses_sweeps_with_no_job_in_common(tmp_path, capsys):
    a = summary_csv(tmp_path / "a", [ROW])
    b = summary_csv(tmp_path / "b", [{**ROW, "overrides": "a=2"}])
    assert compare.main([str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no job in common" in err and "\n" not in err


def test_compare_refuses_a_linked_or_foreign_summary(tmp_path, capsys):
    a = summary_csv(tmp_path / "a", [ROW])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.csv").symlink_to(a / "summary.csv")
    assert compare.main([str(a), str(tmp_path / "b")]) == 2
    assert "is a link" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "summary.csv").write_text("name,age\nbob,3\n")
    assert compare.main([str(a), str(tmp_path / "c")]) == 2
    assert "is not a sweep summary (no job, overrides, status column)" in capsys.readouterr().err
    (tmp_path / "c" / "summary.csv").write_text("job,overrides,status\n0," + "x" * (17 * 2**20) + ",ok\n")
    assert compare.main([str(a), str(tmp_path / "c")]) == 2
    assert "is not a readable summary" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ two copies at once


HOLD = "import sys, time; from contentv.sweep import lock_sweep; lock_sweep(sys.argv[1]); print('locked', flush=True); "
HOLD += "time.sleep(60)"


def test_a_second_copy_of_a_sweep_is_refused_while_the_first_runs(tmp_path):
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(SweepError) as info:
            sweep.lock_sweep(tmp_path)
        assert info.value.status == 2
        assert str(info.value).startswith(f"another copy of this sweep is running in {tmp_path} (pid {first.pid} on ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    deadline = time.monotonic() + 5
    while True:  # kill -9 leaves no stale lock: the kernel drops it with the process
        try:
            with sweep.lock_sweep(tmp_path):
                break
        except SweepError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with sweep.lock_sweep(tmp_path) as lock:
        assert lock.fd is not None
    assert lock.fd is None


def test_a_lock_file_that_is_a_link_is_refused(tmp_path):
    (tmp_path / ".sweep.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SweepError, match=r"can't lock the sweep folder .* \(.sweep.lock: it is a link\)"):
        sweep.lock_sweep(tmp_path)


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with sweep.lock_sweep(tmp_path) as lock:
        assert lock.fd is None
    assert "don't run two copies of this sweep" in caplog.text
