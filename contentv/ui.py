"""The web page: `python demo.py mode=ui` (needs the optional extra: pip install '.[ui]').

The community app's page on this runtime: model preset, prompt, negative prompt, frames, fps, size, steps,
guidance, seed (or random), backend and the memory options (presets, one offload mode, VAE slicing/tiling,
attention slicing, INT8/NF4/FP8 weights; "Predict memory" shows the planner's table, and memory=auto shows it
before running the preset it picks). The logic is `contentv.studio.Studio` (no gradio); this module lays out
the widgets, wires the events and serves the page. gradio is imported only inside functions, so the runtime
works without it.

What the server exposes: only videos and their sidecars, linked into a private folder the page serves from
(never the output tree with its logs and Hydra configs); checkpoint folders only from `ui.allowed_paths`;
at most `ui.max_queue` generations waiting, `ui.max_queue_per_client` per browser session.
"""

# No `from __future__ import annotations` here: gradio finds its `gr.Request` argument through the
# handlers' evaluated type hints, and those hints name the lazily imported module.

import html
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contentv.config import BackendConfig, MemoryConfig, Presets, RunConfig, SamplingConfig
from contentv.errors import ConfigError, first_line
from contentv.memory_policy import QUANTIZATIONS
from contentv.studio import (
    MEMORY_FIELDS,
    MODEL_DEFAULT_FIELDS,
    OFFLOAD_MODES,
    SAMPLING_FIELDS,
    Form,
    Studio,
    field_kind,
)
from contentv.validation import check_ui

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# How long the Cancel button waits for the running step to end before it stops reporting.
CANCEL_WAIT_S = 600
# Widget labels and element ids (tests find widgets by id); the widget kind comes from the field's type.
LABELS = {
    "prompt": ("Prompt", "prompt"),
    "negative_prompt": ("Negative prompt", "negative"),
    "num_frames": ("Frames (4k+1)", "frames"),
    "fps": ("FPS", "fps"),
    "width": ("Width (×16)", "width"),
    "height": ("Height (×16)", "height"),
    "num_inference_steps": ("Steps", "steps"),
    "guidance_scale": ("Guidance", "guidance"),
    "seed": ("Seed", "seed"),
    "vae_slicing": ("VAE slicing", "vae_slicing"),
    "vae_tiling": ("VAE tiling (changes the frames slightly)", "vae_tiling"),
    "attention_slicing": ("Attention slicing (query chunk, 0 = off)", "attention_slicing"),
    "quantization": ("Weights (quantization changes the output)", "quantization"),
    "budget_gb": ("Budget GB (memory=auto)", "budget_gb"),
}
QUANTIZATION_LABELS = {
    "none": "none",
    "bnb_int8": "INT8 (bitsandbytes)",
    "torchao_int8": "INT8 (torchao, weight-only)",
    "bnb_nf4": "NF4 4-bit (bitsandbytes)",
    "fp8": "FP8 storage",
}
CSS = """
.cv-status { padding: 0.6em 0.9em; border-radius: 6px; font-family: ui-monospace, monospace; }
.cv-status.error { background: #fdecea; color: #8a1c12; border: 1px solid #f5c2bd; }
.cv-status.info { background: #eef4fb; color: #1d3f66; border: 1px solid #c9dbef; }
"""


def _gradio():
    """Import gradio, or fail with one line saying how to install it."""
    try:
        import gradio
    except ImportError as exc:
        raise ConfigError("mode", "ui", "needs gradio: pip install '.[ui]'") from exc
    return gradio


def check_available() -> None:
    """Raise ConfigError (one line) if the page can't be served here (gradio missing)."""
    _gradio()


def host_warning(host: str) -> str | None:
    """The warning printed when the page listens beyond this machine, else None."""
    if host in LOCAL_HOSTS:
        return None
    return (
        f"warning: ui.host={host} serves the page (and generation on this machine's accelerator) to every "
        "network that can reach this interface, without authentication; the default is ui.host=127.0.0.1"
    )


def check_listen(host: str, port: int) -> None:
    """The page can listen on host:port (ConfigError naming the option otherwise): the host is an address of
    this machine, and the port is free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError("ui.host", host, f"an address of this machine ({exc.strerror})") from exc
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE (Linux, macOS, Windows)
                raise ConfigError("ui.port", port, "a free port (another program listens on it)") from exc
            raise ConfigError("ui.host", host, f"an address of this machine ({exc.strerror})") from exc


def status_html(text: str) -> str:
    """A one-line status box (errors in red); empty text clears it."""
    if not text:
        return ""
    kind = "error" if text.startswith("error:") else "info"
    return f'<div class="cv-status {kind}" role="status">{html.escape(text)}</div>'


def plan_markdown(text: str | None, title: str = "Memory plan") -> str:
    return "" if not text else f"**{title}**\n\n```\n{text}\n```"


def _field_widget(gr, schema: type, name: str, value: Any):
    """A widget for a config field, by its type: text box, integer/number box or checkbox."""
    label, elem_id = LABELS[name]
    kind = field_kind(schema, name)
    if name == "quantization":
        choices = [(QUANTIZATION_LABELS.get(q, q), q) for q in QUANTIZATIONS]
        return gr.Dropdown(choices, value=value, label=label, elem_id=elem_id)
    if kind is str:
        lines = 3 if name == "prompt" else 2
        return gr.Textbox(value or "", label=label, lines=lines, elem_id=elem_id)
    if kind is bool:
        return gr.Checkbox(bool(value), label=label, elem_id=elem_id)
    return gr.Number(value, label=label, precision=0 if kind is int else None, minimum=0, elem_id=elem_id)


def build_blocks(studio: Studio):
    """Lay out the page and wire its events; returns the gradio Blocks (not yet served)."""
    gr = _gradio()
    d = studio.defaults()
    fields: dict[str, Any] = {}

    with gr.Blocks(title="ContentV", analytics_enabled=False) as blocks:
        gr.Markdown("# ContentV text-to-video")
        with gr.Row():
            with gr.Column(scale=2):
                for name in ("prompt", "negative_prompt"):
                    fields[name] = _field_widget(gr, SamplingConfig, name, d.sampling.get(name))
                with gr.Row():
                    model = gr.Dropdown(sorted(studio.models), value=d.model, label="Model preset", elem_id="model")
                    model_path = gr.Dropdown(
                        [("the preset's", ""), *((p, p) for p in studio.allowed_paths)],
                        value="",
                        label="Checkpoint folder (ui.allowed_paths)",
                        interactive=bool(studio.allowed_paths),
                        elem_id="model_path",
                    )
                    backend = gr.Dropdown(sorted(studio.backends), value=d.backend, label="Backend", elem_id="backend")
                with gr.Row():
                    for name in ("num_frames", "fps", "width", "height"):
                        fields[name] = _field_widget(gr, SamplingConfig, name, d.sampling.get(name))
                with gr.Row():
                    for name in ("num_inference_steps", "guidance_scale", "seed"):
                        fields[name] = _field_widget(gr, SamplingConfig, name, d.sampling.get(name))
                    random_seed = gr.Checkbox(d.random_seed, label="Random seed", elem_id="random_seed")
                with gr.Accordion("Memory", open=False):
                    memory = gr.Dropdown(sorted(studio.memories), value=d.memory, label="Preset", elem_id="memory")
                    offload = gr.Radio(
                        list(OFFLOAD_MODES),
                        value=d.offload,
                        label="CPU offload (one at a time; model is faster, sequential uses least memory)",
                        elem_id="offload",
                    )
                    with gr.Row():
                        for name in MEMORY_FIELDS:
                            fields[name] = _field_widget(gr, MemoryConfig, name, d.memory_fields.get(name))
                    predict_btn = gr.Button("Predict memory", size="sm", elem_id="predict")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=3):
                status = gr.HTML("", elem_id="status")
                video = gr.Video(label="Video", interactive=False, autoplay=True, loop=True, elem_id="video")
                info = gr.Markdown("", elem_id="info")
                files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="download")
                plan = gr.Markdown("", elem_id="plan")
        with gr.Row():
            gr.Markdown(f"### Earlier videos in `{studio.gallery_dir.name}`")
            refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="refresh")
        gallery = gr.Gallery(
            studio.served_gallery(), label="Outputs", columns=4, fit_columns=False, height=420, elem_id="gallery"
        )

        # A set of inputs: each handler gets one {component: value} dict (and gradio can still inject
        # request/progress, which it finds only among positional parameters).
        inputs = {model, model_path, backend, memory, offload, random_seed, *fields.values()}
        sampling_outputs = [fields[k] for k in MODEL_DEFAULT_FIELDS]
        memory_outputs = [offload, *(fields[k] for k in MEMORY_FIELDS)]

        def form_of(data: dict) -> Form:
            return Form(
                model=data[model],
                model_path=data[model_path] or "",
                backend=data[backend],
                memory=data[memory],
                offload=data[offload],
                random_seed=data[random_seed],
                sampling={k: data[fields[k]] for k in SAMPLING_FIELDS},
                memory_fields={k: data[fields[k]] for k in MEMORY_FIELDS},
            )

        def on_model(name):
            values = studio.sampling_defaults(name)
            return [gr.update(value=values[k]) if k in values else gr.update() for k in MODEL_DEFAULT_FIELDS]

        def on_memory(name):
            values = studio.memory_fields(name)
            return [gr.update(value=values[k]) if k in values else gr.update() for k in ("offload", *MEMORY_FIELDS)]

        def on_predict(data):
            try:
                return plan_markdown(studio.plan(form_of(data)))
            except ConfigError as exc:
                return plan_markdown(f"error: {exc}")
            except Exception as exc:  # noqa: BLE001 - one line in the page, traceback in the log
                log.exception("memory plan failed")
                return plan_markdown(f"error: {first_line(exc, with_type=True)}")

        def on_auto_plan(data):  # shown by itself only for memory=auto
            return on_predict(data) if data[memory] == "auto" else ""

        def on_check(data, request: gr.Request):
            # Runs at once (not queued): a bad form is answered here, before anything waits or loads.
            session = getattr(request, "session_hash", None)
            limit = studio.base.ui.max_queue_per_client
            if session is not None and studio.pending(session) >= limit:
                return status_html(f"error: {limit} generations of this page are already waiting or running"), gr.skip()
            try:
                cfg, plan_text = studio.resolve(form_of(data))
            except ConfigError as exc:
                return status_html(f"error: {exc}"), gr.skip()
            except Exception as exc:  # noqa: BLE001 - one line in the page, traceback in the log
                log.exception("checking the form failed")
                return status_html(f"error: {first_line(exc, with_type=True)}"), gr.skip()
            waiting = "queued: waiting for the generation in progress" if studio.busy() else "starting"
            if plan_text is None:
                return status_html(waiting), gr.skip()
            return status_html(f"{waiting} (memory=auto: {cfg.memory.name})"), plan_markdown(plan_text)

        def on_run(data, request: gr.Request, progress=gr.Progress()):  # noqa: B008 - found by its default
            job, _ = studio.prepare(form_of(data), session=getattr(request, "session_hash", None))
            if job is None:  # on_check has already shown the message
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            plan_md = plan_markdown(job.plan, f"Memory plan (memory=auto ran {job.cfg.memory.name})") or gr.skip()
            outcome = studio.generate(job, lambda i, n, text: progress((i, n), desc=text, unit="steps"))
            if not outcome.ok:
                return status_html(outcome.status), gr.skip(), gr.skip(), gr.skip(), gr.skip(), plan_md
            downloads = [studio.serve(p) for p in (outcome.video, outcome.sidecar) if p is not None]
            return (
                status_html(outcome.status),
                downloads[0],
                outcome.metadata,
                downloads,
                studio.served_gallery(),
                plan_md,
            )

        def on_cancel(request: gr.Request):
            # gradio drops this page's queued runs (cancels=) and stops showing its running one; the
            # Studio stops that one after its current step. Wait for it, to show how it ended.
            jobs = studio.cancel_jobs(getattr(request, "session_hash", None))
            if not jobs:
                yield status_html("cancelled: nothing of this page was running (a queued generation is dropped)")
                return
            yield status_html("cancelling: stops after the current step; no video is written")
            for job in jobs:
                job.finished.wait(CANCEL_WAIT_S)
            ended = [j.outcome.status for j in jobs if j.outcome is not None]
            if ended:
                yield status_html(ended[-1])

        model.change(on_model, [model], sampling_outputs, queue=False)
        memory.change(on_memory, [memory], memory_outputs, queue=False).then(on_auto_plan, inputs, [plan], queue=False)
        predict_btn.click(on_predict, inputs, [plan], queue=False)
        # Check at once, then queue the run (one at a time, at most ui.max_queue waiting). The run
        # re-validates: the form is read again when its turn comes.
        running = run_btn.click(on_check, inputs, [status, plan], queue=False).then(
            on_run,
            inputs,
            [status, video, info, files, gallery, plan],
            concurrency_limit=1,
            concurrency_id="generate",
            show_progress="full",
            show_progress_on=[video],
        )
        # Drops this page's queued runs (gradio) and stops its running one after the current step (Studio).
        cancel_btn.click(on_cancel, None, [status], cancels=[running], concurrency_limit=None, concurrency_id="cancel")
        refresh.click(studio.served_gallery, None, [gallery], queue=False)
        blocks.load(on_auto_plan, inputs, [plan], queue=False)
    return blocks


@dataclass
class Server:
    """A running page: its URL, the gradio Blocks and the Studio behind it; `close()` stops it."""

    blocks: Any
    studio: Studio
    url: str

    def close(self) -> None:
        self.blocks.close(verbose=False)
        self.studio.close()


def launch(
    cfg: RunConfig, presets: Presets, build_backend: Callable[[BackendConfig], Any], block: bool = True
) -> Server:
    """Serve the page on cfg.ui.host:cfg.ui.port; returns the running server (after Ctrl-C when block).

    `presets`: the model, memory and backend choices the page offers (the entry point composes them);
    `build_backend` makes a backend from a BackendConfig (demo.py passes backends.build_backend).
    """
    gr = _gradio()
    check_ui(cfg.ui)
    check_listen(cfg.ui.host, cfg.ui.port)
    warning = host_warning(cfg.ui.host)
    if warning:
        print(warning, file=sys.stderr)
    # gradio checks its own URL over HTTP at start; those request lines are noise in our log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    studio = Studio(cfg, presets, build_backend)
    studio.output_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(studio)
    blocks.queue(max_size=cfg.ui.max_queue, default_concurrency_limit=1)
    try:
        blocks.launch(
            server_name=cfg.ui.host,
            server_port=cfg.ui.port,
            prevent_thread_lock=True,
            share=False,
            inbrowser=False,
            show_error=True,
            quiet=True,
            ssr_mode=False,
            mcp_server=False,
            # Only the folder of links to videos and sidecars (Studio.serve), never the output tree.
            allowed_paths=[str(studio.serve_dir)],
            # System fonts: the page never reaches out to a font service (it works offline).
            theme=gr.themes.Default(
                font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
            ),
            css=CSS,
        )
    except OSError as exc:  # the port was taken between the check and the launch
        studio.close()
        raise ConfigError("ui.port", cfg.ui.port, f"a free port ({first_line(exc)})") from exc
    server = Server(blocks=blocks, studio=studio, url=blocks.local_url)
    print(f"ContentV page on {server.url} (Ctrl-C to stop)", file=sys.stderr)
    if block:
        try:
            blocks.block_thread()
        finally:
            server.close()
    return server
