"""The Videos API as OpenAI's official Python client uses it, against one live server (tiny model, CPU)."""

from __future__ import annotations

import httpx
import pytest

from tests.serve_helpers import FAST, OPENAI_NOTICE, TINY, LiveServer

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(OPENAI_NOTICE)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt):
    live = LiveServer(tmp_path_factory.mktemp("serve-api"), "sampling.num_inference_steps=1")
    yield live
    assert live.stop() == 0, "".join(live.lines[-20:])


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def done(client):
    """One finished job, shared."""
    video = client.videos.create_and_poll(prompt="a red fox", extra_body=FAST, **TINY)
    assert video.status == "completed", video.error
    return video


def test_create_and_poll_makes_a_video_with_its_sidecar_and_thumbnail(server, client, done):
    assert (done.model, done.size, done.progress) == ("tiny_contentv", "48x32", 100)
    assert done.seconds == "0.625"  # 0.5 s at 8 fps -> 5 frames (4k+1) -> 5/8 s
    assert done.completed_at >= done.created_at and done.expires_at > done.completed_at
    video = client.videos.download_content(done.id).read()
    assert video[4:8] == b"ftyp"
    thumb = client.videos.download_content(done.id, variant="thumbnail").read()
    assert thumb[:8] == b"\x89PNG\r\n\x1a\n"
    folder = server.folder / "videos"
    assert (folder / f"{done.id}.mp4").read_bytes() == video
    import json

    sidecar = json.loads((folder / f"{done.id}.json").read_text())
    assert sidecar["config"]["sampling"]["num_frames"] == 5
    assert (sidecar["config"]["sampling"]["height"], sidecar["config"]["sampling"]["width"]) == (32, 48)


def test_create_answers_queued_at_once_and_retrieve_follows_it(client):
    video = client.videos.create(prompt="a cat on a roof", extra_body={**FAST, "seed": 7}, **TINY)
    assert video.status in ("queued", "in_progress") and video.object == "video" and video.error is None
    assert video.prompt == "a cat on a roof"
    final = client.videos.poll(video.id)
    assert final.status == "completed" and final.id == video.id
    assert client.videos.retrieve(video.id).status == "completed"


def test_a_json_body_is_accepted_too(server):
    r = httpx.post(server.api + "/videos", json={"prompt": "a dog", **TINY, **FAST}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("queued", "in_progress")


def test_list_pages_through_every_job_once(client, done):
    ids = [client.videos.create(prompt=f"list {i}", extra_body=FAST, **TINY).id for i in range(3)]
    first = client.videos.list(limit=2, order="asc")
    assert len(first.data) == 2 and first.has_more
    everything = [v.id for v in client.videos.list(limit=2, order="asc")]  # the client follows `after`
    assert len(everything) == len(set(everything))
    assert everything.index(done.id) < everything.index(ids[0]) < everything.index(ids[1]) < everything.index(ids[2])
    newest = client.videos.list(limit=1)  # desc by default
    assert newest.data[0].id == everything[-1]


def test_delete_removes_the_job_and_its_files(server, client):
    video = client.videos.create_and_poll(prompt="to delete", extra_body=FAST, **TINY)
    folder = server.folder / "videos"
    assert (folder / f"{video.id}.mp4").exists()
    gone = client.videos.delete(video.id)
    assert gone.deleted and gone.id == video.id
    assert not list(folder.glob(f"{video.id}*"))
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(video.id)


def test_an_invalid_request_gets_the_command_lines_line(client, capsys):
    import demo

    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(prompt="a cat", model="tiny_contentv", size="50x32")
    body = err.value.body
    assert body["message"] == "sampling.width=50 is not valid: a positive multiple of 16"
    assert body["param"] == "sampling.width" and body["type"] == "invalid_request_error"
    # the command line, given the same setting, says the same line
    assert demo.main(["model=tiny_contentv", "backend=cpu", "sampling.width=50", "sampling.height=32"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {body['message']}"


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"model": "gpt-video-9"}, "model"),  # not a model this server offers
        ({"seconds": "forever"}, "seconds"),
        ({"size": "big"}, "size"),
        ({"num_inference_steps": "2.5"}, "sampling.num_inference_steps"),
        ({"memory": "low_vram_8g"}, "memory"),  # not among serve.memory_presets
        ({"model_path": "/etc"}, "model_path"),  # clients never name server paths
    ],
)
def test_bad_fields_are_refused_naming_the_field(server, fields, param):
    r = httpx.post(server.api + "/videos", json={"prompt": "a cat", **TINY, **fields}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_ids_and_routes_are_404_error_objects(server, client):
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_doesnotexist")
    r = httpx.post(server.api + "/videos/video_x/remix", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_content_of_an_unfinished_job_is_404(server, client):
    video = client.videos.create(prompt="not yet", extra_body={"num_inference_steps": 40}, **TINY)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    client.videos.delete(video.id)
    r = httpx.get(server.api + "/videos/../jobs.sqlite3/content", timeout=10)
    assert r.status_code == 404


def test_health_and_metrics(server, done):
    health = server.health()
    assert health["status"] == "ok" and health["jobs"]["completed"] >= 1
    assert [w["device"] for w in health["workers"]] == ["cpu:0"]
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert "contentv_serve_queue_depth" in text
    assert 'contentv_serve_jobs{state="completed"}' in text
    assert 'contentv_serve_stage_seconds_count{stage="denoising"}' in text
    assert "contentv_serve_peak_host_rss_bytes" in text


def test_the_page_is_served_with_the_offered_models_and_no_inline_script(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert '<option value="tiny_contentv">tiny_contentv</option>' in r.text
    assert '<script src="/page.js"></script>' in r.text and r.text.count("<script") == 1
    js = httpx.get(server.url + "/page.js", timeout=10)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text  # received text is shown as text


def test_the_page_submits_into_the_same_queue(server, client):
    """The page's script, driven in Node with a minimal DOM stand-in (no browser on this machine): its form posts
    a job, its table follows it to completed, and "play" fetches the video; the job is the API's like any other."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    node = shutil.which("node")
    if node is None:
        pytest.skip("needs node to run the page's script")
    drive = Path(__file__).parent / "serve_page" / "drive.js"
    out = subprocess.run([node, str(drive), server.url, "from the page"], capture_output=True, text=True, timeout=180)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, seen
    assert seen["queued"] is not None  # in the table as soon as the form was sent
    assert seen["state"] == "completed" and seen["error"] == ""
    assert seen["video"].startswith("blob:") and seen["cells"][2] == "from the page"
    video = client.videos.retrieve(seen["id"])
    assert video.status == "completed" and video.prompt == "from the page"
