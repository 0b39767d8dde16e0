"""The Ray worker pool (serve.workers=ray): the same queue, job states and behaviours on a local Ray instance on
the CPU with two tiny-model workers."""

from __future__ import annotations

import os
import signal

import pytest

from tests.serve_helpers import FAST, OPENAI_NOTICE, TINY, LiveServer, steps_lasting, wait_for

pytest.importorskip("ray")
openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(OPENAI_NOTICE)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt):
    live = LiveServer(
        tmp_path_factory.mktemp("serve-ray"),
        "sampling.num_inference_steps=1",
        "serve.workers=ray",
        "serve.devices=[cpu,cpu]",
        timeout=300,
    )
    yield live
    assert live.stop() == 0, "".join(live.lines[-30:])


def test_two_ray_workers_share_the_queue(server):
    client = server.client()
    ids = [client.videos.create(prompt=f"ray {i}", extra_body=FAST, **TINY).id for i in range(4)]
    for video_id in ids:
        video = client.videos.poll(video_id)
        assert video.status == "completed", video.error
        assert client.videos.download_content(video_id).read()[4:8] == b"ftyp"
    workers = server.health()["workers"]
    assert [w["device"] for w in workers] == ["ray:cpu", "ray:cpu"]
    assert sum(w["jobs_done"] for w in workers) == 4
    assert sorted(p.name for p in (server.folder / "videos").glob("*.mp4")) == sorted(f"{i}.mp4" for i in ids)


def test_a_killed_ray_worker_fails_only_its_job_and_is_replaced(server):
    client = server.client()
    slow = {"num_inference_steps": steps_lasting(server, 5.0)}  # after the first test's jobs
    victim = client.videos.create(prompt="victim", extra_body=slow, **TINY)

    def running():
        v = client.videos.retrieve(victim.id)
        return v.status == "in_progress" and v.progress > 0

    wait_for(running, what="the job to start")
    (worker,) = [w for w in server.health()["workers"] if w["job"] == victim.id]
    os.kill(worker["pid"], signal.SIGKILL)
    failed = client.videos.poll(victim.id)
    assert failed.status == "failed" and failed.error.code == "worker_died"
    after = client.videos.create_and_poll(prompt="after", extra_body=FAST, **TINY)
    assert after.status == "completed"
    replaced = next(w for w in server.health()["workers"] if w["name"] == worker["name"])
    assert replaced["pid"] != worker["pid"] and replaced["restarts"] == 1
