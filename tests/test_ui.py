"""The web page's logic (contentv/studio.py) and its serving (contentv/ui.py) on the tiny model on the CPU."""

from __future__ import annotations

import ast
import copy
import dataclasses
import html
import json
import os
import re
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import demo
from backends import build_backend
from contentv import form as fm
from contentv import studio as st
from contentv import ui
from contentv.config import BackendConfig, OutputConfig, RunConfig, SamplingConfig
from contentv.errors import ConfigError
from contentv.jobqueue import JOBS_FILE, Job, JobQueue
from contentv.serve.store import Store
from contentv.served import ServedFiles
from contentv.validation import validate_run

ROOT = Path(__file__).resolve().parents[1]
# A tiny request: 32x48, 5 frames (2 latent frames), 2 steps.
SMALL = {"width": 48, "height": 32, "num_frames": 5, "num_inference_steps": 2}
PRESETS = demo.load_presets()


def tiny_cfg(out: Path, **ui_fields) -> RunConfig:
    model = copy.deepcopy(PRESETS.models["tiny_contentv"])
    cfg = RunConfig(model=model, backend=BackendConfig(name="cpu"), output=OutputConfig(dir=str(out)))
    cfg.sampling = SamplingConfig(prompt="a red fox walks in snow", **SMALL)
    cfg.ui = dataclasses.replace(cfg.ui, **ui_fields)
    return cfg


@pytest.fixture(scope="module")
def studio(cache_dir, tmp_path_factory) -> st.Studio:
    return st.Studio(tiny_cfg(tmp_path_factory.mktemp("ui-out")), PRESETS, build_backend)


def form(studio: st.Studio, **changes) -> fm.Form:
    """The page's form with some inputs changed: sampling and memory fields by their option names."""
    f = studio.defaults()
    for key, value in changes.items():
        if key in fm.SAMPLING_FIELDS:
            f.sampling[key] = value
        elif key in fm.MEMORY_FIELDS:
            f.memory_fields[key] = value
        else:
            setattr(f, key, value)
    return f


def videos(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def run(studio: st.Studio, f: fm.Form, progress=None) -> st.Outcome:
    job, message = studio.prepare(f)
    assert job is not None, message
    return studio.generate(job, progress)


# ------------------------------------------------------------------------------------------ generation


def test_page_opens_with_the_command_lines_config(studio):
    d = studio.defaults()
    assert (d.model, d.backend, d.memory, d.offload) == ("tiny_contentv", "cpu", "none", "none")
    s = d.sampling
    assert (s["width"], s["height"], s["num_frames"], s["num_inference_steps"]) == (48, 32, 5, 2)
    assert s["fps"] == 8 and s["negative_prompt"].startswith("overexposed")  # the model's defaults fill the rest


def test_generate_returns_an_existing_video_with_metadata(studio):
    steps = []
    outcome = run(studio, form(studio, seed=7), progress=lambda i, n, text: steps.append((i, n, text)))
    assert outcome.ok, outcome.status
    assert outcome.video.is_file() and outcome.video.suffix == ".mp4" and outcome.video.parent == studio.output_dir
    assert outcome.sidecar.is_file()
    assert outcome.status.startswith("done in ") and outcome.video.name in outcome.status
    rec = outcome.record
    assert rec["seed"] == 7 and rec["config"]["sampling"]["num_frames"] == 5
    assert {"load", "text_encoding", "denoising", "decoding", "writing"} <= set(rec["timings_s"])
    assert rec["peak_memory"]["host_rss_bytes"] > 0
    for text in ("time:", "peak memory:", "host RSS", "placement", outcome.video.name):
        assert text in outcome.metadata
    # progress: a "preparing" note, then one report per step with the count and the time left
    assert [(i, n) for i, n, _ in steps] == [(0, 2), (1, 2), (2, 2)]
    assert "step 2/2" in steps[-1][2] and "left" in steps[-1][2]
    assert (str(outcome.video), "a red fox walks in snow (seed 7)") in studio.gallery()


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "changes",
    [
        {"num_frames": 10},
        {"width": 50},
        {"height": 40},
        {"prompt": ""},
        {"prompt": "   "},
        {"num_inference_steps": 0},
        {"fps": 0},
    ],
    ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_bad_input_gives_the_command_lines_message_and_starts_nothing(studio, changes):
    before_files, before_loads = videos(studio.output_dir), studio.runtime(BackendConfig(name="cpu")).loads
    job, message = studio.prepare(form(studio, **changes))
    assert job is None
    # The same line the command line prints: "error: " + validate_run's ConfigError.
    cfg = tiny_cfg(studio.output_dir)
    cfg.sampling = dataclasses.replace(cfg.sampling, **changes)
    with pytest.raises(ConfigError) as exc:
        validate_run(cfg)
    assert message == f"error: {exc.value}" and "\n" not in message
    assert videos(studio.output_dir) == before_files
    assert studio.runtime(BackendConfig(name="cpu")).loads == before_loads


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model": "no_such_model"}, "model='no_such_model' is not valid: one of: "),
        ({"backend": "tpu"}, "backend='tpu' is not valid: one of: auto, cpu, cuda, npu"),
        # the page never loads a server path it wasn't given at launch (and says nothing of what exists there)
        (
            {"model_path": "/ckpt/ContentV-8B"},
            "model.path='/ckpt/ContentV-8B' is not valid: one of the folders in ui.allowed_paths",
        ),
        ({"num_frames": 5.5}, "sampling.num_frames=5.5 is not valid: an integer"),
        ({"seed": None}, "sampling.seed=None is not valid: an integer"),
        # the backend's own memory checks run before any weights load
        ({"attention_slicing": -1}, "memory.attention_slicing=-1 is not valid"),
        ({"quantization": "int3"}, "memory.quantization='int3' is not valid"),
    ],
)
def test_other_bad_choices_are_one_line_before_loading(studio, changes, expected):
    before_loads = studio.runtime(BackendConfig(name="cpu")).loads
    job, message = studio.prepare(form(studio, **changes))
    assert job is None and message.startswith(f"error: {expected}"), message
    assert "\n" not in message and studio.runtime(BackendConfig(name="cpu")).loads == before_loads


def test_a_model_path_not_allowed_is_refused_without_touching_the_file_system(studio, monkeypatch):
    def no_file_system(*args, **kwargs):
        raise AssertionError("the file system was asked about a path the page was not allowed")

    for name in ("stat", "lstat", "access", "listdir", "scandir"):
        monkeypatch.setattr(os, name, no_file_system)
    for path in ("/etc", "ByteDance/ContentV-8B", "~root/x", "../.."):
        with pytest.raises(ConfigError, match="one of the folders in ui.allowed_paths"):
            studio.config(form(studio, model="contentv_8b", model_path=path))


def test_allowed_paths_take_folders_and_hub_ids_as_configured(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    allowed = ["someorg/some-model", "~/ckpt", str(tmp_path / "other")]
    studio = st.Studio(tiny_cfg(tmp_path, allowed_paths=allowed), PRESETS, build_backend)
    assert studio.allowed_paths == ("someorg/some-model", str(tmp_path / "ckpt"), str(tmp_path / "other"))
    for sent, loaded in [
        ("someorg/some-model", "someorg/some-model"),  # a hub id stays a hub id
        ("~/ckpt", str(tmp_path / "ckpt")),  # as configured
        (str(tmp_path / "ckpt"), str(tmp_path / "ckpt")),  # as the page offers it
    ]:
        assert studio.config(form(studio, model="contentv_8b", model_path=sent)).model.path == loaded
    with pytest.raises(ConfigError, match="model.path='someorg/other' is not valid"):
        studio.config(form(studio, model="contentv_8b", model_path="someorg/other"))


def test_an_allowed_model_path_is_checked_before_loading(cache_dir, tmp_path):
    missing = str(tmp_path / "missing")
    studio = st.Studio(tiny_cfg(tmp_path, allowed_paths=[missing]), PRESETS, build_backend)
    job, message = studio.prepare(form(studio, model="contentv_8b", model_path=missing))
    assert job is None
    assert message.startswith(f"error: model.path='{missing}' is not valid: an existing checkpoint")


def test_an_unexpected_failure_is_one_line_too(cache_dir, tmp_path):
    def broken_factory(cfg):
        raise RuntimeError("no such device\nsecond line")

    studio = st.Studio(tiny_cfg(tmp_path), PRESETS, broken_factory)
    job, message = studio.prepare(form(studio))
    assert job is None and message == "error: RuntimeError: no such device"


# ------------------------------------------------------------------------------------------ cancel


def test_cancel_stops_at_the_next_step_and_writes_nothing(studio):
    before = videos(studio.output_dir)
    seen = []

    def progress(i, n, text):
        seen.append(i)
        if i == 1:
            assert studio.cancel(session="page") == 1  # the Cancel button, while step 1 has just finished

    job, _ = studio.prepare(form(studio, num_inference_steps=3), session="page")
    outcome = studio.generate(job, progress)
    assert not outcome.ok and outcome.video is None
    assert outcome.status == "cancelled after step 1 of 3: no video written"
    assert job.finished.is_set() and job.outcome is outcome  # what the Cancel button then shows
    assert seen == [0, 1]  # no further steps ran
    assert videos(studio.output_dir) == before  # no video, no sidecar, no .partial file


def test_cancel_is_per_page_and_drops_a_queued_job(studio):
    job, _ = studio.prepare(form(studio), session="page-a")
    assert studio.cancel(session="page-b") == 0  # another page's Cancel leaves it alone
    assert studio.cancel(session="page-a") == 1
    before = videos(studio.output_dir)
    outcome = studio.generate(job)
    assert not outcome.ok and outcome.status == "cancelled before it started: no video written"
    assert videos(studio.output_dir) == before
    assert studio.cancel(session="page-a") == 0  # finished jobs are forgotten


def test_same_model_backend_and_memory_reuse_the_loaded_pipeline(studio):
    runtime = studio.runtime(BackendConfig(name="cpu"))
    runtime.pipeline(studio.config(form(studio)))  # loaded by the tests above; a no-op then
    loads = runtime.loads
    # new prompt, sampling settings and a random seed: no reload (also: works after a cancel)
    outcome = run(studio, form(studio, prompt="another prompt", num_inference_steps=1, random_seed=True, seed=None))
    assert outcome.ok and outcome.reused and runtime.loads == loads
    assert "reused (no weights loaded)" in outcome.metadata
    assert isinstance(outcome.record["seed"], int) and f"seed **{outcome.record['seed']}**" in outcome.metadata
    assert len(studio.runtimes) == 1  # one Runtime per backend
    # a memory change reloads (here: model CPU offload, which also runs on the CPU backend)
    outcome = run(studio, form(studio, offload="model", num_inference_steps=1))
    assert outcome.ok and not outcome.reused and runtime.loads == loads + 1
    assert outcome.record["prepared"]["placement"] != "device"


# ------------------------------------------------------------------------------------------ memory options


def test_offload_is_one_choice_so_model_and_sequential_cannot_combine(studio):
    for mode in fm.OFFLOAD_MODES:
        m = studio.memory_config(form(studio, offload=mode))
        flags = [m.model_cpu_offload, m.sequential_cpu_offload, m.group_offload]
        assert sum(flags) == (mode != "none")
        assert fm.offload_mode(m) == mode
    with pytest.raises(ConfigError, match="offload='model\\+sequential' is not valid: one of: none, model"):
        studio.memory_config(form(studio, offload="model+sequential"))


def test_offload_choice_picks_matching_text_encoder_placement(studio):
    m = studio.memory_config(form(studio, offload="model"))
    assert m.text_encoders == "auto"  # the preset's "device" placement can't go with offload hooks
    studio.runtime(BackendConfig(name="cpu")).backend.check_memory(m)
    assert studio.memory_config(form(studio)).text_encoders == studio.memories["none"].text_encoders


# ------------------------------------------------------------------------------------------ presets


def test_presets_are_exactly_the_command_lines(studio):
    assert set(studio.models) == set(demo.group_options("model"))
    assert set(studio.memories) == set(demo.group_options("memory"))
    assert set(studio.backends) == set(demo.group_options("backend"))
    assert studio.sampling_defaults("cogvideox_2b")["num_frames"] == 49  # the model change refills the form


def test_every_memory_preset_goes_through_the_page_unchanged(studio):
    for name, preset in studio.memories.items():
        f = form(studio, memory=name, **studio.memory_fields(name))  # what choosing the preset fills in
        assert studio.memory_config(f) == preset, name


def test_memory_preset_fills_the_memory_widgets(studio):
    fields = studio.memory_fields("none")
    assert fields == {
        "offload": "none",
        "vae_slicing": False,
        "vae_tiling": "off",
        "attention_slicing": 0,
        "quantization": "none",
        "budget_gb": None,
    }
    # low_vram_24g leaves VAE tiling to the budget (null): the page shows that as a choice of its own
    assert studio.memory_fields("low_vram_24g")["offload"] == "model"
    assert studio.memory_fields("low_vram_24g")["vae_tiling"] == "auto"


@pytest.mark.parametrize("value,expected", [("auto", None), ("on", True), ("off", False), (True, True), (False, False)])
def test_vae_tiling_choice_goes_into_the_config(studio, value, expected):
    memory = studio.memory_config(form(studio, memory="low_vram_24g", vae_tiling=value))
    assert memory.vae_tiling is expected


def test_a_vae_tiling_choice_the_page_does_not_offer_is_refused(studio):
    with pytest.raises(ConfigError, match=r"memory\.vae_tiling=.maybe. is not valid: one of auto, on, off"):
        studio.memory_config(form(studio, vae_tiling="maybe"))
    assert studio.memory_fields("nope") == {}


def test_memory_plan_and_auto(studio):
    table = studio.plan(form(studio))  # the "Predict memory" button: every preset, no weights loaded
    assert table.startswith("memory plan: tiny_contentv, 32x48, 5 frames")
    assert all(name in table for name in studio.memories if name != "auto")
    runtime = studio.runtime(BackendConfig(name="cpu"))
    loads = runtime.loads
    # memory=auto with a budget: the table is shown before the run, which uses the chosen preset
    run, plan = studio.resolve(form(studio, memory="auto", budget_gb=16))
    assert run.memory.name == "none" and "chosen" in plan  # tiny: the fastest preset fits
    job, message = studio.prepare(form(studio, memory="auto", budget_gb=16), session="plan")
    assert job.plan == plan and job.cfg.memory.name == "none"
    studio.cancel(session="plan")
    studio.generate(job)
    # no budget known (the CPU backend): the table, and the run resolved as for the command line (everything resident)
    run, plan = studio.resolve(form(studio, memory="auto"))
    assert run.memory.name == "none" and run.requested_memory == "auto" and plan.startswith("memory plan:")
    assert "no device budget" in run.memory_choice
    # a budget nothing fits is one line, before anything loads
    job, message = studio.prepare(form(studio, memory="auto", budget_gb=0.001))
    assert job is None and message.startswith("error: memory.budget_gb=") and "at least" in message
    assert runtime.loads == loads


# ------------------------------------------------------------------------------------------ serving


def test_host_warning():
    assert ui.host_warning("127.0.0.1") is None and ui.host_warning("localhost") is None
    warning = ui.host_warning("0.0.0.0")
    assert warning.startswith("warning: ui.host=0.0.0.0") and "127.0.0.1" in warning


def test_launch_warns_for_another_interface_and_checks_ui_settings(cache_dir, tmp_path, monkeypatch, capsys):
    gr = pytest.importorskip("gradio")
    calls = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.update(kw))  # bind nothing
    server = ui.launch(tiny_cfg(tmp_path, host="0.0.0.0", port=0), PRESETS, build_backend, block=False)
    # port 0: a free port, chosen here (gradio can't take 0)
    assert calls["server_name"] == "0.0.0.0" and calls["server_port"] > 0 and calls["share"] is False
    assert "warning: ui.host=0.0.0.0" in capsys.readouterr().err
    assert server.blocks._queue.max_size == 8  # ui.max_queue
    assert calls["allowed_paths"] == [str(server.studio.serve_dir)]  # only the served links
    assert os.environ["GRADIO_TEMP_DIR"] == server.cache_dir  # gradio's copies in a private folder
    before = os.environ.get("GRADIO_TEMP_DIR")
    server.close()
    assert os.environ.get("GRADIO_TEMP_DIR") != server.cache_dir and not Path(server.cache_dir).exists()
    ui.launch(tiny_cfg(tmp_path, port=0), PRESETS, build_backend, block=False).close()
    assert calls["server_name"] == "127.0.0.1" and "warning" not in capsys.readouterr().err
    assert os.environ.get("GRADIO_TEMP_DIR") == (None if before == server.cache_dir else before)
    with pytest.raises(ConfigError, match="ui.max_queue=0 is not valid"):
        ui.launch(tiny_cfg(tmp_path, max_queue=0), PRESETS, build_backend, block=False)


def test_gradio_is_optional(monkeypatch):
    # contentv/ui.py imports gradio only inside functions, so importing it never needs gradio ...
    tree = ast.parse((ROOT / "contentv" / "ui.py").read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top_level for a in n.names} | {
        n.module.split(".")[0] for n in top_level if isinstance(n, ast.ImportFrom) and n.module
    }
    assert "gradio" not in names
    # ... and serving without it is one clear line.
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(ConfigError) as exc:
        ui.check_available()
    assert str(exc.value).startswith("mode='ui' is not valid: needs gradio: pip install 'gradio")
    assert str(exc.value).endswith("(the ui extra)")


# ------------------------------------------------------------------------------------------ served files


def test_only_regular_videos_and_their_sidecars_are_served(tmp_path):
    out = tmp_path / "out"
    run = out / "2024-01-01" / "10-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / "clip.mp4").write_bytes(b"video")
    (run / "clip.json").write_text('{"prompt": "a clip", "seed": 3}')
    (run / "orphan.json").write_text("{}")  # no video beside it
    (run / "demo.log").write_text("log")
    (run / ".hydra" / "hidden.mp4").write_bytes(b"not a gallery video")
    (tmp_path / "elsewhere.mp4").write_bytes(b"outside")
    (run / "passwd.mp4").symlink_to("/etc/passwd")
    (run / "inside.mp4").symlink_to(run / "clip.mp4")  # a symlink, even to a video, is not linked
    (out / "etc").symlink_to("/etc")
    (out / "outside").symlink_to(tmp_path)
    files = ServedFiles(out)
    try:
        assert files.gallery() == [(str(run / "clip.mp4"), "a clip (seed 3)")]
        served = Path(files.serve(run / "clip.mp4"))
        assert served.parent.parent == files.dir and served.read_bytes() == b"video"
        assert Path(files.serve(run / "clip.json")).read_text().startswith('{"prompt"')
        for path in (
            run / "passwd.mp4",
            run / "inside.mp4",
            run / "demo.log",
            run / "orphan.json",
            run / ".hydra" / "hidden.mp4",
            out / "outside" / "elsewhere.mp4",
            out / "etc" / "passwd",
            tmp_path / "elsewhere.mp4",
            run / ".." / ".." / ".." / "elsewhere.mp4",
        ):
            with pytest.raises(ValueError, match="not a video or sidecar"):
                files.serve(path)
        assert sorted(p.name for p in files.dir.rglob("*")) == sorted([served.parent.name, "clip.mp4", "clip.json"])
    finally:
        files.close()
    assert not files.dir.exists() and (run / "clip.mp4").exists()


# ------------------------------------------------------------------------------------------ queue


def queued_cfg() -> RunConfig:
    """What a page job carries into the store: a resolved config (sampling filled in)."""
    sampling = SamplingConfig(prompt="a red fox", width=48, height=32, num_frames=5, fps=8, num_inference_steps=1)
    return RunConfig(sampling=sampling)


def test_each_session_and_each_remote_address_gets_its_share_and_the_queue_its_size(tmp_path):
    q = JobQueue(Store(tmp_path / JOBS_FILE), max_queue=4, max_per_client=2)

    def admit(session, client):
        return q.admit(Job(cfg=queued_cfg(), session=session, client=client))

    remote = "203.0.113.5"
    assert admit("a", remote) is None and admit("b", remote) is None
    # a third session from the same remote address is refused: a raw client can't mint its way past its share
    assert (
        admit("c", remote) == f"error: {remote} already has 2 generations waiting or running (ui.max_queue_per_client)"
    )
    assert admit("a", "198.51.100.1") is None
    assert admit("a", "198.51.100.2") == "error: this page already has 2 generations waiting or running" + (
        " (ui.max_queue_per_client)"
    )
    # loopback: every local tab shares one address, so only sessions and the total count
    assert admit("x", "127.0.0.1") is None
    full = "error: the queue is full (4 generations waiting, ui.max_queue); try again later"
    assert admit("y", "127.0.0.1") == full and q.refusal(session="z", client="::1") == full
    # an admitted job holds its place until it ends (its caller going away doesn't end it: it is in the store)
    assert len(q.cancel(session="a")) == 2 and q.refusal(session="z", client="::1") is None


def test_jobs_run_one_at_a_time_in_arrival_order_and_a_cancelled_one_leaves_at_once(tmp_path):
    q = JobQueue(Store(tmp_path / JOBS_FILE), max_queue=8, max_per_client=8)
    first, second, third = (Job(cfg=queued_cfg(), session=s) for s in ("1", "2", "3"))
    for job in (first, second, third):
        assert q.admit(job) is None
    assert q.wait_turn(first)  # runs
    order, ahead = [], {}

    def wait(job):
        if q.wait_turn(job, lambda n: ahead.setdefault(job.session, []).append(n)):
            order.append(job.session)
            q.done(job)
        else:
            order.append(f"cancelled {job.session}")
            q.done(job)

    threads = [threading.Thread(target=wait, args=(j,)) for j in (second, third)]
    threads[0].start()
    until(lambda: ahead.get("2"))
    threads[1].start()
    until(lambda: ahead.get("3"))
    assert ahead == {"2": [1], "3": [2]} and q.busy()
    assert q.cancel(session="2") == [second]
    threads[0].join(5)
    assert order == ["cancelled 2"] and second.finished.is_set()  # left while the first still runs
    until(lambda: ahead["3"] == [2, 1])  # the third moves up
    q.done(first)
    threads[1].join(5)
    assert order == ["cancelled 2", "3"] and not q.busy() and q.pending("3") == 0
    states = {r["session"]: (r["status"], r["error_code"]) for r in q.rows()}
    assert states["2"] == ("failed", "cancelled") and states["1"][0] == states["3"][0] == "failed"  # no outcome given


# ------------------------------------------------------------------------------------------ the durable queue


def test_an_admitted_job_is_in_the_store_with_its_resolved_config(studio):
    job, message = studio.prepare(form(studio, memory="auto", budget_gb=16, seed=5), session="stored")
    assert job is not None, message
    row = studio.queue.store.get(job.id)
    assert (row["status"], row["session"], row["prompt"], row["size"]) == ("queued", "stored", job.cfg.sampling.prompt,
                                                                            "48x32")  # fmt: skip
    stored = json.loads(row["run"])
    assert stored == dataclasses.asdict(job.cfg)  # what runs: memory=auto's choice, the model's defaults filled in
    assert stored["memory"]["name"] == "none" and stored["sampling"]["fps"] == 8 and stored["sampling"]["seed"] == 5
    assert studio.cancel(session="stored") == 1
    assert studio.queue.store.get(job.id)["error_code"] == "cancelled"


def test_a_restarted_page_finishes_every_job_once(cache_dir, tmp_path):
    """The page was killed with job 0 just published (its row not yet updated), job 1 running and job 2 waiting; a
    page started again on the same folder settles job 0 as completed, re-queues job 1 and runs 1 and 2, once each."""
    cfg = tiny_cfg(tmp_path, max_queue_per_client=4)
    first = st.Studio(cfg, PRESETS, build_backend)
    jobs = [first.prepare(form(first, prompt=f"job {i}", num_inference_steps=1), session="tab")[0] for i in range(3)]
    assert first.generate(jobs[0]).ok
    first.close()  # runs nothing more; what follows is the state a SIGKILL leaves
    store = first.queue.store
    store._db().execute("UPDATE jobs SET status = 'in_progress' WHERE id = ?", (jobs[0].id,))
    assert store.take(jobs[1].id, "page") is not None

    second = st.Studio(cfg, PRESETS, build_backend)  # no page waits for these: its runner runs them
    try:
        until(lambda: not second.active(), timeout=120)
        rows = {r["id"]: r for r in second.queue.rows()}
        assert [rows[j.id]["status"] for j in jobs] == ["completed"] * 3
        assert [rows[j.id]["attempts"] for j in jobs] == [1, 2, 1]  # job 1 ran again from the start, once
        assert rows[jobs[1].id]["started_at"] < rows[jobs[2].id]["started_at"]  # in arrival order
        sidecars = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
        assert sorted(s["invocation"]["ui_job"] for s in sidecars) == sorted(j.id for j in jobs)
        assert len(list(tmp_path.glob("*.mp4"))) == 3 and all((tmp_path / rows[j.id]["video"]).is_file() for j in jobs)
        assert {f"job {i} (seed 42)" for i in range(3)} <= {caption for _, caption in second.gallery()}
    finally:
        second.close()


def test_the_queue_table_shows_prompts_as_text_and_links_finished_videos(cache_dir, tmp_path):
    studio = st.Studio(tiny_cfg(tmp_path), PRESETS, build_backend)
    try:
        hostile = '<img src=x onerror="alert(1)"><script>alert(2)</script> & a fox'
        job, _ = studio.prepare(form(studio, prompt="a fox", num_inference_steps=1))
        assert studio.generate(job).ok
        waiting, _ = studio.prepare(form(studio, prompt=hostile), session="t")
        table = studio.queue_html()
        assert "<img" not in table and "<script" not in table and "onerror" not in table.replace("onerror=&quot;", "")
        assert html.escape(hostile) in table and "waiting" in table
        link = re.search(r'href="gradio_api/file=([^"]+)"', table).group(1)
        served = Path(urllib.parse.unquote(html.unescape(link)))
        assert served.parent.parent == studio.serve_dir and served.read_bytes() == job.outcome.video.read_bytes()
        studio.cancel(session="t")
        assert "failed: cancelled before it started" in studio.queue_html()
    finally:
        studio.close()


def until(condition, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)
