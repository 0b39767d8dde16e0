"""Safe to expose: a non-loopback bind needs a key, Bearer auth, and the limits (queue in total and per key, body
size, prompt length), each answered with OpenAI's error object and the status the official client maps. The same
server (one worker start for the module) then has its worker killed, and its finished jobs expire."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from contentv.config import RunConfig
from contentv.errors import ConfigError
from contentv.validation import check_serve
from tests.serve_helpers import FAST, OPENAI_NOTICE, TINY, LiveServer, steps_lasting, wait_for

openai = pytest.importorskip("openai")
KEY = "sk-test-0123456789"


def test_a_non_loopback_bind_without_a_key_refuses_to_start(capsys):
    import demo

    assert demo.main(["mode=serve", "model=tiny_contentv", "backend=cpu", "serve.host=0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: serve.host='0.0.0.0' is not valid: 127.0.0.1, ::1 or localhost unless serve.api_key is set"
    assert demo.main(["-m", "mode=serve", "model=tiny_contentv", "backend=cpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: mode=serve runs one server: drop -m"


@pytest.mark.parametrize(
    "field,value,option",
    [
        ("api_key", "short", "serve.api_key"),
        ("port", 70000, "serve.port"),
        ("max_queue_per_key", 100, "serve.max_queue_per_key"),  # more than serve.max_queue
        ("job_ttl_hours", -1.0, "serve.job_ttl_hours"),
        ("workers", "slurm", "serve.workers"),
    ],
)
def test_bad_serve_settings_are_one_line_naming_the_option(field, value, option):
    serve = RunConfig().serve
    setattr(serve, field, value)
    with pytest.raises(ConfigError) as err:
        check_serve(serve)
    assert err.value.option == option
    serve = RunConfig().serve
    serve.host, serve.api_key = "0.0.0.0", KEY
    check_serve(serve, serving=True)  # any interface with a key


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt):
    live = LiveServer(
        tmp_path_factory.mktemp("serve-limits"),
        f"serve.api_key={KEY}",
        "serve.max_queue=3",
        "serve.max_queue_per_key=2",
        "serve.max_body_bytes=4096",
        "serve.max_prompt_chars=200",
        "serve.job_ttl_hours=0.0015",  # jobs expire 5.4 s after they finish (the last test waits for it)
    )
    yield live
    assert live.stop() == 0


pytestmark = [pytest.mark.filterwarnings(OPENAI_NOTICE)]


@pytest.mark.slow
def test_a_missing_or_wrong_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-wrong-key-000").videos.list()
    r = httpx.get(server.api + "/videos", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
    assert "workers" not in httpx.get(server.url + "/health", timeout=10).json()  # open, but says little
    assert server.client(api_key=KEY).videos.list().data == []
    page = httpx.get(server.url + "/", timeout=10)  # the page opens without a key, and asks for one
    assert page.status_code == 200 and '<label id="keyrow">' in page.text


@pytest.mark.slow
def test_body_and_prompt_limits(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.api + "/videos", json={"prompt": "x" * 5000}, headers=headers, timeout=10)
    assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    headers["Content-Type"] = "application/json"
    r = httpx.post(server.api + "/videos", content=chunks(), headers=headers, timeout=10)
    assert r.status_code == 413
    with pytest.raises(openai.BadRequestError) as err:
        server.client(api_key=KEY).videos.create(prompt="y" * 201, **TINY)
    assert err.value.body["param"] == "prompt" and "serve.max_prompt_chars" in err.value.body["message"]


@pytest.mark.slow
def test_a_full_queue_is_429_and_deleting_frees_it(server):
    client = server.client(api_key=KEY, max_retries=0)
    client.videos.create_and_poll(prompt="a first job times a step", extra_body=FAST, **TINY)
    slow = {"num_inference_steps": steps_lasting(server, 5.0)}
    first = client.videos.create(prompt="one", extra_body=slow, **TINY)
    second = client.videos.create(prompt="two", extra_body=slow, **TINY)
    with pytest.raises(openai.RateLimitError) as err:
        client.videos.create(prompt="three", extra_body=FAST, **TINY)
    assert err.value.body["param"] == "serve.max_queue_per_key"
    wait_for(lambda: client.videos.retrieve(first.id).status == "in_progress", what="the first job to start")
    client.videos.delete(first.id)  # running: cancelled after its current step
    client.videos.delete(second.id)
    third = client.videos.create_and_poll(prompt="three", extra_body=FAST, **TINY)
    assert third.status == "completed"
    assert not list((server.folder / "videos").glob(f"{first.id}*"))


def running(client, video_id: str):
    v = client.videos.retrieve(video_id)
    return v if v.status == "in_progress" and v.progress > 0 else None


@pytest.mark.slow
def test_a_killed_worker_fails_only_its_job_and_is_restarted_and_old_jobs_expire(server):
    client = server.client(api_key=KEY)
    slow = {"num_inference_steps": steps_lasting(server, api_key=KEY)}
    victim = client.videos.create(prompt="victim", extra_body=slow, **TINY)
    after = client.videos.create(prompt="queued behind it", extra_body=FAST, **TINY)
    wait_for(lambda: running(client, victim.id), what="the job to start")
    (pid,) = server.worker_pids(KEY)
    os.kill(pid, signal.SIGKILL)
    failed = client.videos.poll(victim.id)
    assert failed.status == "failed" and failed.error.code == "worker_died"
    assert "SIGKILL" in failed.error.message and "restarted" in failed.error.message
    assert client.videos.poll(after.id).status == "completed"  # the next job runs on the new worker
    (worker,) = server.health(KEY)["workers"]
    assert worker["pid"] != pid and worker["restarts"] == 1
    # expiry: the finished job and its files go once its age passes serve.job_ttl_hours
    files = server.folder / "videos"
    assert (files / f"{after.id}.mp4").exists()

    def expired():
        try:
            client.videos.retrieve(after.id)
        except openai.NotFoundError:
            return True
        return False

    wait_for(expired, timeout=40, every=0.5, what="the job to expire")
    assert not list(files.glob(f"{after.id}*"))
