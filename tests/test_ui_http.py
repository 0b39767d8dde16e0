"""The web page's promises over HTTP, against the running server (tiny model, CPU): what a browser or a hostile
client can reach through any route gradio exposes, not only the page's buttons.

One server for the module, its output folder seeded with a video and its sidecar, a Hydra config, a log and
symlinks to /etc/passwd. Clients: gradio_client (the API by name, one session per Client) and raw HTTP (httpx).
"""

from __future__ import annotations

import html
import json
import re
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

import demo
from backends import build_backend
from contentv import ui
from contentv.config import BackendConfig, OutputConfig, RunConfig, SamplingConfig, UIConfig
from contentv.errors import ConfigError
from contentv.validation import validate_run

gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
pytest.importorskip("gradio")

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"width": 48, "height": 32, "num_frames": 5, "num_inference_steps": 1}
SECRET = "root:"  # the first bytes of /etc/passwd
FAKE_MP4 = b"\x00\x00\x00\x18ftypmp42 an earlier video"
# gradio_client sends every parameter; budget_gb has no value on the page (None = no budget).
API = {"budget_gb": None}


@pytest.fixture(scope="module")
def site(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ui-http-out")
    run = out / "2024-01-01" / "10-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / "clip_seed1.mp4").write_bytes(FAKE_MP4)
    (run / "clip_seed1.json").write_text(json.dumps({"prompt": "an earlier clip", "seed": 1}))
    (run / ".hydra" / "config.yaml").write_text("secret: hydra config\n")
    (run / "demo.log").write_text("secret: log line\n")
    for name in ("passwd.mp4", "passwd.json", "passwd"):
        (run / name).symlink_to("/etc/passwd")
    (out / "etc").symlink_to("/etc")  # a folder symlink inside the output folder
    presets = demo.load_presets()
    cfg = RunConfig(
        model=presets.models["tiny_contentv"],
        backend=BackendConfig(name="cpu"),
        output=OutputConfig(dir=str(out)),
        sampling=SamplingConfig(prompt="a cat", **SMALL),
        ui=UIConfig(
            port=0,  # any free port
            max_queue=3,
            max_queue_per_client=2,
            allowed_paths=[str(out / "allowed-ckpt"), "someorg/allowed-model"],
        ),
    )
    server = ui.launch(cfg, presets, build_backend, block=False)
    http = httpx.Client(base_url=server.url.rstrip("/"), timeout=60)
    port = urllib.parse.urlsplit(server.url).port
    yield SimpleNamespace(server=server, studio=server.studio, out=out, run=run, cfg=cfg, http=http, port=port)
    http.close()
    server.close()


def client(site):
    """A new API client: a new browser session."""
    return gradio_client.Client(site.server.url, verbose=False, download_files=False)


def line(status: str) -> str:
    """The text of the page's status box."""
    return html.unescape(re.sub(r"<[^>]+>", "", status))


def check(site, **changes) -> str:
    """The page's check (what Generate shows before anything runs), called over the API."""
    status, _ = client(site).predict(api_name="/check", **{**API, **changes})
    return line(status)


def cli_line(site, **sampling) -> str:
    """What the command line says for the same sampling values."""
    cfg = RunConfig(**{**vars(site.cfg), "sampling": SamplingConfig(**{**vars(site.cfg.sampling), **sampling})})
    with pytest.raises(ConfigError) as exc:
        validate_run(cfg)
    return f"error: {exc.value}"


def served_urls(site) -> list[str]:
    """Every file URL the page's config hands out (the gallery)."""
    return re.findall(r'"url":\s*"([^"]*/file=[^"]*)"', site.http.get("/config").text)


def fetch(site, url: str):
    return site.http.get(urllib.parse.urlsplit(url).path if url.startswith("http") else url)


# ------------------------------------------------------------------------------------------ files


def test_the_gallery_serves_videos_and_nothing_else(site):
    urls = served_urls(site)
    bodies = [fetch(site, u) for u in urls]
    assert all(r.status_code == 200 for r in bodies)
    assert any(r.content == FAKE_MP4 for r in bodies)  # the earlier video, through the served links
    assert not any(SECRET.encode() in r.content for r in bodies)  # the symlink named passwd.mp4 is not a video
    assert all(u.endswith(".mp4") for u in urls)


def secrets(site) -> list[str]:
    run = site.run
    return [
        str(run / "demo.log"),
        str(run / ".hydra" / "config.yaml"),
        str(run / "passwd.mp4"),
        str(run / "passwd.json"),
        str(run / "passwd"),
        str(site.out / "etc" / "passwd"),
        "/etc/passwd",
        str(ROOT / "pyproject.toml"),  # the working directory
        f"{site.studio.serve_dir}/../../etc/passwd",
        f"{site.server.cache_dir}/../../etc/passwd",
        str(run / "clip_seed1.mp4"),  # a video is served only as its link, never from the output tree
    ]


@pytest.mark.parametrize("route", ["/gradio_api/file=", "/file=", "/gradio_api/file/", "/gradio_api/proxy="])
def test_no_file_route_serves_logs_configs_or_anything_outside(site, route):
    for path in secrets(site):
        for spelling in (path, urllib.parse.quote(path, safe=""), path.replace("/", "//"), path + "%00.mp4"):
            r = site.http.get(route + spelling)
            assert r.status_code in (403, 404), (route, spelling, r.status_code)  # refused, by us or by gradio
            assert SECRET.encode() not in r.content and b"secret:" not in r.content


def test_a_served_link_is_served_under_any_spelling(site):
    url = next(u for u in served_urls(site) if fetch(site, u).content == FAKE_MP4)
    path = urllib.parse.urlsplit(url).path.split("/file=", 1)[1]
    assert site.http.get("/gradio_api/file=" + urllib.parse.quote(path, safe="")).content == FAKE_MP4
    # the same file through a '..' that leaves the served folders is refused
    outside = f"{site.studio.serve_dir}/../{Path(site.server.cache_dir).name}/../../etc/passwd"
    assert site.http.get("/gradio_api/file=" + outside).status_code == 404


def test_uploads_and_the_routes_the_page_does_not_use_are_closed(site):
    r = site.http.post("/gradio_api/upload", files={"files": ("x.mp4", b"not a video")})
    assert r.status_code == 404
    for path in ("/gradio_api/upload_progress", "/gradio_api/deep_link?session_hash=x", "/monitoring", "/docs"):
        assert site.http.get(path).status_code == 404, path
    assert site.http.post("/gradio_api/process_recording").status_code == 404
    assert site.http.get("/").status_code == 200 and site.http.get("/gradio_api/info").status_code == 200


def test_a_huge_request_body_is_refused_unread(site):
    body = b'{"data": ["' + b"x" * (2 << 20) + b'"]}'
    r = site.http.post("/gradio_api/run/check", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413


# ------------------------------------------------------------------------------------------ presets and paths


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model": "no_such_model"}, "error: model='no_such_model' is not valid: one of: cogvideox_2b"),
        ({"model": ["tiny_contentv"]}, "error: model=['tiny_contentv'] is not valid: one of: "),
        ({"backend": "tpu"}, "error: backend='tpu' is not valid: one of: auto, cpu, cuda, npu"),
        ({"memory": "huge"}, "error: memory='huge' is not valid: one of: "),
        ({"quantization": "int3"}, "error: memory.quantization='int3' is not valid"),
        ({"random_seed": "yes"}, "error: random_seed='yes' is not valid: true or false"),
    ],
)
def test_only_the_composed_presets_whatever_the_client_sends(site, changes, expected):
    assert check(site, **changes).startswith(expected)


def test_an_offload_mode_outside_the_choices_is_refused(site):
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):
        client(site).predict(api_name="/check", offload="model+sequential", **API)


def test_model_paths_are_refused_alike_whether_they_exist_or_not(site, tiny_ckpt):
    allowed = ", ".join(site.studio.allowed_paths)
    for path in ("/etc", tiny_ckpt, "/no/such/folder", "../../..", "~root", "ByteDance/ContentV-8B", "org/model"):
        message = check(site, model="contentv_8b", model_path=path)
        assert message == f"error: model.path={path!r} is not valid: one of the folders in ui.allowed_paths ({allowed})"
    # an allowed folder is then checked like the command line's model.path (here: it doesn't exist)
    allowed_dir = str(site.out / "allowed-ckpt")
    assert check(site, model="contentv_8b", model_path=allowed_dir).startswith(
        f"error: model.path={allowed_dir!r} is not valid: an existing checkpoint"
    )


# ------------------------------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    "changes",
    [
        {"width": 10**9},
        {"height": -16},
        {"num_frames": 10**7 + 1},
        {"num_inference_steps": 10**6},
        {"fps": 0},
        {"seed": 2**70},
        {"prompt": "x" * 30_000},
        {"prompt": "a\x00b"},
    ],
    ids=lambda c: ",".join(f"{k}={str(v)[:12]}" for k, v in c.items()),
)
def test_absurd_values_get_the_command_lines_line_on_either_endpoint(site, changes):
    before = {p.name for p in site.studio.output_dir.iterdir()}
    expected = cli_line(site, **changes)
    assert check(site, **changes) == expected
    status = client(site).predict(api_name="/generate", **{**API, **changes})[0]  # skipping the page's check
    assert line(status) == expected
    assert {p.name for p in site.studio.output_dir.iterdir()} == before


def test_non_numbers_and_nan_sent_raw_are_one_line(site):
    assert check(site, num_frames="abc") == "error: sampling.num_frames='abc' is not valid: an integer"
    assert check(site, num_frames=5.5) == "error: sampling.num_frames=5.5 is not valid: an integer"
    # JSON's NaN (gradio_client won't send it): the raw request the page would make
    info = site.http.get("/gradio_api/info").json()["named_endpoints"]["/check"]["parameters"]
    values = {p["parameter_name"]: p.get("parameter_default") for p in info}
    values["guidance_scale"] = float("nan")
    body = json.dumps({"data": list(values.values()), "session_hash": "raw"}, allow_nan=True)
    r = site.http.post("/gradio_api/run/check", content=body, headers={"content-type": "application/json"})
    status = line(r.json()["data"][0])
    assert status.startswith("error: sampling.guidance_scale=nan is not valid"), status


@pytest.mark.slow
def test_a_client_gets_its_share_of_the_queue_and_no_more(site):
    """Held by a generation in progress: client A queues 2 (its share), B queues 1 (the queue's 3 are full), a
    fresh session is then refused; A cancels its two; the rest run, and B's video and sidecar are served."""
    studio = site.studio
    hold, held = threading.Event(), threading.Event()

    def progress(step, total, text):  # the first report comes as the blocker starts: keep the queue busy
        held.set()
        assert hold.wait(120)

    blocker, message = studio.prepare(studio.defaults(), session="blocker")
    assert blocker is not None, message
    runner = threading.Thread(target=studio.generate, args=(blocker, progress))
    runner.start()
    try:
        assert held.wait(60)
        a, b, c = client(site), client(site), client(site)
        a_jobs = []
        for n in (1, 2):
            a_jobs.append(a.submit(api_name="/generate", prompt=f"a {n}", **API))
            wait_for(lambda n=n: studio.pending(a.session_hash) == n)
        refused = a.submit(api_name="/generate", prompt="a 3", **API).result(timeout=30)
        assert line(refused[0]) == "error: this page already has 2 generations waiting or running" + (
            " (ui.max_queue_per_client)"
        )
        b_job = b.submit(api_name="/generate", prompt="a dog", **API)
        wait_for(lambda: studio.pending(b.session_hash) == 1)
        # a fresh session (a raw client can make one per call) finds the queue full
        full = "error: the queue is full (3 generations waiting, ui.max_queue); try again later"
        assert line(c.submit(api_name="/generate", **API).result(timeout=30)[0]) == full
        assert line(c.predict(api_name="/check", **API)[0]) == full
        # A's Cancel drops its waiting jobs at once; they never run
        a.predict(api_name="/cancel")
        for job in a_jobs:
            assert line(job.result(timeout=30)[0]) == "cancelled before it started: no video written"
        assert studio.pending(a.session_hash) == 0
    finally:
        hold.set()
        runner.join(120)
    outputs = b_job.result(timeout=300)
    assert line(outputs[0]).startswith("done in ") and "a-dog_seed42.mp4" in line(outputs[0])
    video, files = outputs[1], outputs[3]
    out = studio.output_dir
    assert fetch(site, video["url"]).content == (out / "a-dog_seed42.mp4").read_bytes()
    assert {f["orig_name"]: fetch(site, f["url"]).content for f in files} == {
        "a-dog_seed42.mp4": (out / "a-dog_seed42.mp4").read_bytes(),
        "a-dog_seed42.json": (out / "a-dog_seed42.json").read_bytes(),
    }
    assert not (out / "a-1_seed42.mp4").exists() and not (out / "a-2_seed42.mp4").exists()


def wait_for(condition, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ listening


def test_a_busy_port_or_a_foreign_host_is_one_line_naming_the_option(site):
    busy = site.port  # the page itself listens there
    cfg = RunConfig(**{**vars(site.cfg), "ui": UIConfig(port=busy)})
    with pytest.raises(ConfigError) as exc:
        ui.launch(cfg, demo.load_presets(), build_backend, block=False)
    assert str(exc.value) == f"ui.port={busy} is not valid: a free port (another program listens on it)"
    for host in ("203.0.113.7", "no-such-host.invalid"):  # not this machine's; not resolvable
        cfg = RunConfig(**{**vars(site.cfg), "ui": UIConfig(host=host, port=0)})
        with pytest.raises(ConfigError) as exc:
            ui.launch(cfg, demo.load_presets(), build_backend, block=False)
        assert str(exc.value).startswith(f"ui.host={host!r} is not valid: an address of this machine")


@pytest.mark.slow
def test_the_command_line_says_one_line_for_a_busy_port(site, capsys):
    # the line comes from ui.launch, after the backend is built (third-party import warnings may precede it)
    argv = ["mode=ui", "model=tiny_contentv", "backend=cpu", f"ui.port={site.port}"]
    with pytest.raises(SystemExit) as exc:
        demo.main([*argv, f"hydra.run.dir={site.out}/cli"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2 and "Traceback" not in err and sum(ln.startswith("error") for ln in lines) == 1
    assert lines[-1] == f"error: ui.port={site.port} is not valid: a free port (another program listens on it)"


# ------------------------------------------------------------------------------------------ restarts


class PageProcess:
    """`python demo.py mode=ui` with the tiny model on the CPU, on a free port, in its own process."""

    def __init__(self, folder: Path, *overrides: str, faults: dict[str, str] | None = None):
        import subprocess
        import sys

        from tests.helpers import SMALL, demo_env

        args = ["mode=ui", "model=tiny_contentv", "backend=cpu", *SMALL, "ui.port=0", f"output.dir={folder}"]
        args += [f"hydra.run.dir={folder / 'hydra'}", *overrides]
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "demo.py"), *args],
            cwd=ROOT,
            env={**demo_env(faults=faults), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        for text in self.proc.stderr:
            self.lines.append(text)
            m = re.search(r"ContentV page on (http://\S+)", text)
            if m:
                self.url = m.group(1)
                break
        else:
            raise RuntimeError("the page did not start:\n" + "".join(self.lines[-30:]))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)


@pytest.mark.slow
def test_a_page_killed_mid_job_and_started_again_finishes_every_job_once(cache_dir, tmp_path):
    """SIGKILL while one job runs and two wait; the page started again on the same folder re-queues the interrupted
    job (nothing of it was published) and runs all three, once each, with nobody's tab open."""
    import signal

    from contentv.jobqueue import JOBS_FILE
    from contentv.serve.store import Store

    # The first page's steps last a second each (tests/faults), so its job is surely running when it is killed; the
    # second page runs at full speed.
    first = PageProcess(tmp_path, "ui.max_queue_per_client=3", faults={"CONTENTV_FAULT_STEP_SECONDS": "1"})
    store = Store(tmp_path / JOBS_FILE)
    try:
        page = gradio_client.Client(first.url, verbose=False, download_files=False)
        page.submit(api_name="/generate", prompt="a long one", num_inference_steps=20, **API)
        wait_for(lambda: store.active(), timeout=60)  # admitted (it loads the model, then takes ~2 s here)
        for n in (1, 2):
            page.submit(api_name="/generate", prompt=f"waiting {n}", **API)
        wait_for(lambda: [r["progress"] > 0 for r in store.active()] == [True, False, False], timeout=120)
    finally:
        first.stop(signal.SIGKILL)
    rows = store.active()
    assert [r["status"] for r in rows] == ["in_progress", "queued", "queued"]
    second = PageProcess(tmp_path)
    try:
        wait_for(lambda: not store.active(), timeout=180)
        done = {r["prompt"]: r for r in store.page(None, 10, "asc")[0]}
        assert {p: (r["status"], r["attempts"]) for p, r in done.items()} == {
            "a long one": ("completed", 2),  # re-queued once, then ran from the start
            "waiting 1": ("completed", 1),
            "waiting 2": ("completed", 1),
        }
        sidecars = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
        assert sorted(s["invocation"]["ui_job"] for s in sidecars) == sorted(r["id"] for r in rows)  # once each
        assert len(list(tmp_path.glob("*.mp4"))) == 3
        gallery = gradio_client.Client(second.url, verbose=False, download_files=False).predict(api_name="/gallery")
        assert {"a long one (seed 42)", "waiting 1 (seed 42)", "waiting 2 (seed 42)"} <= {g["caption"] for g in gallery}
    finally:
        assert second.stop(signal.SIGTERM) == 143, "".join(second.lines[-20:])
