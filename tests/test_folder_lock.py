"""One owner per queue folder (contentv/folder_lock.py): a second page or a second video API server on the same
output.dir is refused with one line before it opens the queue (so it re-queues and runs none of the first one's
jobs); the lock goes with the process or with a clean stop; a page and a server may share a folder. The sweep's lock
is the same class (its tests: tests/test_sweep_faults.py)."""

from __future__ import annotations

import copy
import re
import socket
import subprocess
import sys
import threading

import httpx
import pytest

import demo
from backends import build_backend
from contentv import serve
from contentv import studio as st
from contentv.config import BackendConfig, OutputConfig, RunConfig, SamplingConfig
from contentv.errors import ConfigError
from contentv.folder_lock import lock_queue
from contentv.jobqueue import JOBS_FILE, LOCK_FILE
from contentv.serve.store import Store
from tests.serve_helpers import ROOT, LiveServer

PRESETS = demo.load_presets()
HOLDER = rf"pid \d+ on {re.escape(socket.gethostname())}"


def page_cfg(out) -> RunConfig:
    cfg = RunConfig(model=copy.deepcopy(PRESETS.models["tiny_contentv"]), backend=BackendConfig(name="cpu"))
    cfg.output = OutputConfig(dir=str(out))
    cfg.sampling = SamplingConfig(prompt="a fox", width=48, height=32, num_frames=5, num_inference_steps=2)
    return cfg


def refused_line(folder, owner: str, queue: str) -> str:
    return (
        rf"output\.dir='{re.escape(str(folder))}' is not valid: a folder no other {owner} is using \({HOLDER} holds "
        rf"its queue, {re.escape(queue)}\): stop that {owner}, or give this one another output\.dir"
    )


def rows(studio: st.Studio) -> list[tuple]:
    return [(r["id"], r["status"], r["attempts"]) for r in studio.queue.rows()]


def test_a_held_lock_pickles_into_a_copy_that_holds_nothing(tmp_path):
    """Launchers (joblib, submitit) pickle the sweep's callback, lock included, into their workers: the copy pickles
    and holds nothing (releasing it leaves the original's lock held)."""
    import pickle

    from contentv.sweep.lock import lock_sweep

    held = lock_sweep(tmp_path)
    copy_ = pickle.loads(pickle.dumps(held))
    assert (copy_.fd, copy_.acquired) == (None, False) and held.acquired
    copy_.release()
    with pytest.raises(Exception, match="another copy of this sweep is running"):
        lock_sweep(tmp_path)
    held.release()
    lock_sweep(tmp_path).release()


def test_a_second_page_on_a_folder_is_refused_until_the_first_closes(tmp_path):
    first = st.Studio(page_cfg(tmp_path), PRESETS, build_backend)
    try:
        row = dict(id="video_0001", owner="", model="m", model_key="m", prompt="p", size="48x32", seconds="1", run="{}")
        first.queue.store.add({**row, "session": "tab"}, 10, 10)
        assert first.queue.store.take("video_0001", "page") is not None  # running, as far as its row says
        before = rows(first)
        with pytest.raises(ConfigError) as info:
            st.Studio(page_cfg(tmp_path), PRESETS, build_backend)
        assert re.fullmatch(refused_line(tmp_path, "page", JOBS_FILE), str(info.value))
        assert rows(first) == before  # not re-queued: the second never opened the queue
        with lock_queue(tmp_path, serve.LOCK_FILE, "video API server", "jobs.sqlite3"):
            pass  # a server's queue in the same folder is another lock
    finally:
        first.close()
    second = st.Studio(page_cfg(tmp_path), PRESETS, build_backend)  # the first closed: its lock went with it
    second.close()
    assert (tmp_path / LOCK_FILE).is_file()


@pytest.mark.slow
def test_a_closed_page_keeps_its_folder_until_its_running_job_ends(cache_dir, tmp_path):
    """close() leaves a running job to finish; another page in the meantime would re-queue it and run it again."""
    first = st.Studio(page_cfg(tmp_path), PRESETS, build_backend)
    job, _ = first.prepare(first.defaults(), session="tab")
    stepped, go_on = threading.Event(), threading.Event()

    def progress(step, total, text):
        if step:
            stepped.set()
            go_on.wait(60)

    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(first.generate(job, progress)))
    runner.start()
    try:
        assert stepped.wait(120)
        first.close()
        with pytest.raises(ConfigError, match="a folder no other page is using"):
            st.Studio(page_cfg(tmp_path), PRESETS, build_backend)
    finally:
        go_on.set()
        runner.join(120)
    assert outcome[0].ok
    second = st.Studio(page_cfg(tmp_path), PRESETS, build_backend)
    try:
        assert rows(second) == [(job.id, "completed", 1)]  # ran once
    finally:
        second.close()


def serve_cfg(out) -> RunConfig:
    return demo.load_config(["mode=serve", "model=tiny_contentv", "backend=cpu", "serve.port=0", f"output.dir={out}"])


@pytest.mark.slow
def test_a_second_server_on_a_folder_is_refused_until_the_first_stops(cache_dir, tmp_path, monkeypatch):
    first = serve.start(serve_cfg(tmp_path), PRESETS, build_backend)
    try:
        recovered = []
        monkeypatch.setattr(Store, "recover", lambda self, *a, **kw: recovered.append(self.path))
        with pytest.raises(ConfigError) as info:
            serve.start(serve_cfg(tmp_path), PRESETS, build_backend)
        assert recovered == []  # refused before it opened the queue: the first's running jobs stay as they are
        monkeypatch.undo()
        assert re.fullmatch(refused_line(tmp_path, "video API server", "jobs.sqlite3"), str(info.value))
        assert httpx.get(first.url + "/health", timeout=10).status_code == 200  # the first serves on
        page = st.Studio(page_cfg(tmp_path), PRESETS, build_backend)  # a page's queue there: its own lock
        page.close()
    finally:
        first.stop()
    again = serve.start(serve_cfg(tmp_path), PRESETS, build_backend)
    again.stop()


@pytest.mark.slow
def test_a_second_server_process_exits_2_with_one_line_and_the_first_serves_on(tmp_path, tiny_ckpt):
    first = LiveServer(tmp_path)
    try:
        cmd = [sys.executable, str(ROOT / "demo.py"), "mode=serve", "model=tiny_contentv", "backend=cpu"]
        cmd += ["serve.port=0", f"output.dir={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra2'}"]
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        line = "error: " + refused_line(tmp_path, "video API server", "jobs.sqlite3") + r"\n"
        assert re.fullmatch(line, second.stderr) and f"pid {first.proc.pid} on" in second.stderr
        assert not second.stdout
        assert first.health()["status"] == "ok" and first.proc.poll() is None  # the first serves on
    finally:
        assert first.stop() == 0
