"""The durable queue: a server killed with SIGKILL loses no job and runs none twice; a killed worker fails only
its job and is restarted (tests/test_serve_limits.py, on that module's server); old jobs expire with their files.
Store rules in-process, the rest on live servers."""

from __future__ import annotations

import json
import time

import pytest

from contentv.serve.store import MAX_ATTEMPTS, QueueFull, Store
from tests.serve_helpers import FAST, OPENAI_NOTICE, TINY, LiveServer, pid_alive, steps_lasting, wait_for

# ------------------------------------------------------------------------------------------ the store alone


def job(i: int, owner: str = "a", key: str = "m1") -> dict:
    return dict(
        id=f"video_{i:04d}", owner=owner, model=key, model_key=key, prompt="p", size="48x32", seconds="1", run="{}"
    )


def test_limits_count_waiting_and_running_jobs_in_total_and_per_client(tmp_path):
    store = Store(tmp_path / "jobs.sqlite3")
    store.add(job(1, "a"), max_total=3, max_owner=2)
    store.add(job(2, "a"), 3, 2)
    with pytest.raises(QueueFull, match="serve.max_queue_per_key=2"):
        store.add(job(3, "a"), 3, 2)
    store.add(job(4, "b"), 3, 2)
    with pytest.raises(QueueFull, match="serve.max_queue=3"):
        store.add(job(5, "c"), 3, 2)
    store.claim("w", None, 0)  # running still counts
    with pytest.raises(QueueFull):
        store.add(job(6, "c"), 3, 2)
    store.fail("video_0001", "x", "y", ttl_s=0)  # finished jobs don't
    store.add(job(7, "c"), 3, 2)


def test_a_worker_prefers_its_loaded_model_until_another_job_waited_too_long(tmp_path):
    store = Store(tmp_path / "jobs.sqlite3")
    store.add(job(1, key="m1"), 10, 10)
    store.add(job(2, key="m2"), 10, 10)
    assert store.claim("w", "m2", max_wait_s=60)["id"] == "video_0002"  # skips the older m1 job
    store.add(job(3, key="m2"), 10, 10)
    assert store.claim("w", "m2", max_wait_s=0)["id"] == "video_0001"  # m1 waited longer than the bound
    assert store.claim("w", None, 60)["id"] == "video_0003"
    assert store.claim("w", None, 60) is None


def test_each_job_is_claimed_once_by_concurrent_workers(tmp_path):
    import threading

    store = Store(tmp_path / "jobs.sqlite3")
    for i in range(40):
        store.add(job(i), 100, 100)
    taken: list[str] = []

    def worker(name):
        while (row := store.claim(name, None, 0)) is not None:
            taken.append(row["id"])

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(taken) == [f"video_{i:04d}" for i in range(40)]


def test_recover_settles_interrupted_jobs(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    store = Store(tmp_path / "jobs.sqlite3")
    for i in range(4):
        store.add(job(i), 10, 10)
        store.claim("w", None, 0)
    # 0: published before the kill; 1: video linked but no sidecar yet; 2: nothing written; 3: interrupted twice
    (videos / "video_0000.mp4").write_bytes(b"v")
    (videos / "video_0000.json").write_text("{}")
    (videos / "video_0001.mp4").write_bytes(b"partial")
    store._db().execute("UPDATE jobs SET attempts = ? WHERE id = 'video_0003'", (MAX_ATTEMPTS,))
    out = Store(tmp_path / "jobs.sqlite3").recover(videos)  # a new process's store
    assert out == {"completed": ["video_0000"], "requeued": ["video_0001", "video_0002"], "failed": ["video_0003"]}
    assert store.get("video_0000")["video"] == "video_0000.mp4"
    assert not (videos / "video_0001.mp4").exists()
    assert store.get("video_0003")["error_code"] == "interrupted"
    assert [store.claim("w", None, 0)["id"] for _ in range(2)] == ["video_0001", "video_0002"]


def test_expire_removes_only_finished_jobs_past_their_age(tmp_path):
    store = Store(tmp_path / "jobs.sqlite3")
    for i in range(3):
        store.add(job(i), 10, 10)
    store.claim("w", None, 0)
    store.finish("video_0000", {"video": "video_0000.mp4"}, {}, ttl_s=10)
    store.claim("w", None, 0)  # video_0001 runs
    now = time.time()
    assert store.expire(now) == []
    assert [r["id"] for r in store.expire(now + 11)] == ["video_0000"]
    assert store.get("video_0000") is None and store.get("video_0001")["status"] == "in_progress"


def test_a_database_made_before_the_session_column_opens_and_gains_it(tmp_path):
    import re
    import sqlite3

    from contentv.serve.store import SCHEMA

    old = re.sub(r"DEFAULT 0,(\s+-- deleted)", r"DEFAULT 0 \1", re.sub(r"\n\s*session TEXT[^\n]*", "", SCHEMA))
    assert "session" not in old
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript(old)
    db.execute(
        "INSERT INTO jobs (id, owner, status, model, model_key, prompt, size, seconds, run, created_at) "
        "VALUES ('video_old', 'a', 'queued', 'm', 'm', 'p', '48x32', '1', '{}', 0)"
    )
    db.commit()
    db.close()
    store = Store(tmp_path / "jobs.sqlite3")
    assert store.get("video_old")["session"] is None and store.claim("w", None, 0)["id"] == "video_old"
    store.add({**job(1), "session": "tab"}, 10, 10)
    assert Store(tmp_path / "jobs.sqlite3").get("video_0001")["session"] == "tab"


# ------------------------------------------------------------------------------------------ live servers


def running(client, video_id: str):
    v = client.videos.retrieve(video_id)
    return v if v.status == "in_progress" and v.progress > 0 else None


@pytest.mark.slow
@pytest.mark.filterwarnings(OPENAI_NOTICE)
def test_sigkill_and_restart_loses_nothing_and_runs_nothing_twice(tmp_path, tiny_ckpt):
    """The interrupted job is re-queued (nothing of it was published) and runs again from the start, once."""
    first = LiveServer(tmp_path, "sampling.num_inference_steps=1")
    try:
        client = first.client()
        finished = client.videos.create_and_poll(prompt="before the crash", extra_body=FAST, **TINY)
        before = client.videos.download_content(finished.id).read()
        slow = {"num_inference_steps": steps_lasting(first)}
        long = client.videos.create(prompt="interrupted", extra_body=slow, **TINY)
        waiting = [client.videos.create(prompt=f"waiting {i}", extra_body=FAST, **TINY).id for i in range(3)]
        wait_for(lambda: running(client, long.id), what="the long job to start")
        workers = first.worker_pids()
    finally:
        first.kill()
    wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=10, what="the workers to die with the server")

    second = LiveServer(tmp_path, "sampling.num_inference_steps=1")
    try:
        client = second.client()
        accepted = {finished.id, long.id, *waiting}
        assert {v.id for v in client.videos.list(limit=100)} == accepted  # none lost
        for video_id in [long.id, *waiting]:
            assert client.videos.poll(video_id).status == "completed"
        assert client.videos.retrieve(long.id).attempts == 2  # re-queued once, then ran to the end
        assert client.videos.download_content(finished.id).read() == before  # still served
        videos = tmp_path / "videos"
        assert sorted(p.name for p in videos.glob("*.mp4")) == sorted(f"{i}.mp4" for i in accepted)  # once each
        for video_id in accepted:
            assert json.loads((videos / f"{video_id}.json").read_text())["video"] == f"{video_id}.mp4"
    finally:
        assert second.stop() == 0
