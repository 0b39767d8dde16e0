"""The web page: `python demo.py mode=ui` (needs the optional extra: pip install 'contentv[ui]').

The community app's page on this runtime: model preset, prompt, negative prompt, frames, fps, size, steps, guidance,
seed (or random), backend and the memory options (presets, one offload mode, VAE slicing/tiling, attention slicing,
INT8/NF4/FP8 weights; "Predict memory" shows the planner's table, as memory=auto does before running its pick). The
logic is `contentv.studio.Studio` (no gradio); this module lays out the widgets, wires the events and serves the
page; gradio is imported only inside functions, so the runtime works without it.

What the server exposes (to the page and API clients alike): the routes the page and gradio_client use
(contentv.served.RouteGuard); only videos and their sidecars, linked into a private folder (never the output tree
with its logs and Hydra configs); checkpoint folders and hub ids only from `ui.allowed_paths`; every value checked
by the Studio as the command line checks it; at most `ui.max_queue` generations waiting and `ui.max_queue_per_client`
per browser session or remote address (contentv.jobqueue). The queue is durable (`<output dir>/ui-jobs.sqlite3`): the
page shows it, and a restarted page runs the jobs a killed one left.
"""

# No `from __future__ import annotations`: gradio finds `gr.Request` through the handlers' evaluated type hints.

import asyncio
import html
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from contentv.config import BackendConfig, MemoryConfig, Presets, RunConfig, SamplingConfig
from contentv.errors import ConfigError, first_line
from contentv.extras import install_hint
from contentv.form import (
    MEMORY_FIELDS,
    MODEL_DEFAULT_FIELDS,
    OFFLOAD_MODES,
    SAMPLING_FIELDS,
    VAE_TILING,
    Form,
    field_kind,
)
from contentv.memory_policy import QUANTIZATIONS
from contentv.served import RouteGuard, private_gradio_cache, remove_private, restore_env, sigterm_exits
from contentv.studio import Studio
from contentv.validation import check_ui

if TYPE_CHECKING:
    import gradio

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# How long the Cancel button waits for the running step to end before it stops reporting.
CANCEL_WAIT_S = 600
# gradio's worker threads for its own handlers (its default), besides one per generation waiting or running.
HANDLER_THREADS = 40
# Widget labels and element ids (tests find widgets by id); the widget kind comes from the field's type.
LABELS = {
    "prompt": ("Prompt", "prompt"),
    "negative_prompt": ("Negative prompt", "negative"),
    "num_frames": ("Frames", "frames"),  # the family's rule is added per model (Studio.frames_label)
    "fps": ("FPS", "fps"),
    "width": ("Width (×16)", "width"),
    "height": ("Height (×16)", "height"),
    "num_inference_steps": ("Steps", "steps"),
    "guidance_scale": ("Guidance", "guidance"),
    "seed": ("Seed", "seed"),
    "vae_slicing": ("VAE slicing", "vae_slicing"),
    "vae_tiling": ("VAE tiling (changes the frames slightly; auto: only where the budget needs it)", "vae_tiling"),
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
        raise ConfigError("mode", "ui", f"needs gradio: {install_hint('ui')}") from exc
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


def check_listen(host: str, port: int) -> int:
    """The port the page can listen on at host:port (ConfigError naming the option otherwise): the host is an
    address of this machine, and the port is free; port 0 gives a free port (gradio itself can't take 0)."""
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
        return s.getsockname()[1]


def status_html(text: str) -> str:
    """A one-line status box (errors in red); empty text clears it."""
    if not text:
        return ""
    kind = "error" if text.startswith("error:") else "info"
    return f'<div class="cv-status {kind}" role="status">{html.escape(text)}</div>'


def plan_markdown(text: str | None, title: str = "Memory plan") -> str:
    return "" if not text else f"**{title}**\n\n```\n{text}\n```"


def _field_widget(gr: ModuleType, schema: type, name: str, value: Any):
    """A widget for a config field, by its type: text box, integer/number box or checkbox."""
    label, elem_id = LABELS[name]
    kind = field_kind(schema, name)
    if name == "quantization":
        choices = [(QUANTIZATION_LABELS.get(q, q), q) for q in QUANTIZATIONS]
        return _dropdown(gr, choices, value, label, elem_id)
    if name == "vae_tiling":
        return _dropdown(gr, list(VAE_TILING), value, label, elem_id)
    if kind is str:
        lines = 3 if name == "prompt" else 2
        return gr.Textbox(value or "", label=label, lines=lines, elem_id=elem_id)
    if name == "budget_gb":
        # Empty means null (the device's free memory): a gradio Number can't be empty once shown (it sends 0).
        text = "" if value is None else str(value)
        return gr.Textbox(text, label=label, elem_id=elem_id, placeholder="empty: the device's free memory")
    if kind is bool:
        return gr.Checkbox(bool(value), label=label, elem_id=elem_id)
    # No precision, no minimum: gradio would round 5.5 to 6 or refuse -1 in words of its own; the Studio converts
    # the value as the option's type and the command line's checks refuse it with their line.
    return gr.Number(value, label=label, precision=None, elem_id=elem_id)


def _dropdown(gr: ModuleType, choices: list, value: Any, label: str, elem_id: str, **kw):
    """A dropdown whose value the Studio checks (allow_custom_value): a raw API call with a value that is not
    offered gets the command line's line naming the option, like every other bad value."""
    return gr.Dropdown(choices, value=value, label=label, elem_id=elem_id, allow_custom_value=True, **kw)


def _who(request: Any) -> tuple[str | None, str | None]:
    """(browser session, network address) of a request; the session hash is whatever the client sent."""
    client = getattr(request, "client", None)
    return getattr(request, "session_hash", None), getattr(client, "host", None)


def build_blocks(studio: Studio) -> "gradio.Blocks":
    """Lay out the page and wire its events; returns the gradio Blocks (not yet served).

    Every handler takes the form as keyword inputs named after the options (`prompt`, `num_frames`, `model`,
    `model_path`, ...): API clients call /generate, /check, /predict_memory, /cancel, /gallery by those names.
    """
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
                    model = _dropdown(gr, sorted(studio.models), d.model, "Model preset", "model")
                    model_path = _dropdown(
                        gr,
                        [("the preset's", ""), *((p, p) for p in studio.allowed_paths)],
                        "",
                        "Checkpoint folder (ui.allowed_paths)",
                        "model_path",
                        interactive=bool(studio.allowed_paths),
                    )
                    backend = _dropdown(gr, sorted(studio.backends), d.backend, "Backend", "backend")
                with gr.Row():
                    for name in ("num_frames", "fps", "width", "height"):
                        fields[name] = _field_widget(gr, SamplingConfig, name, d.sampling.get(name))
                    fields["num_frames"].label = studio.frames_label(d.model)  # before the page is rendered
                with gr.Row():
                    for name in ("num_inference_steps", "guidance_scale", "seed"):
                        fields[name] = _field_widget(gr, SamplingConfig, name, d.sampling.get(name))
                    random_seed = gr.Checkbox(d.random_seed, label="Random seed", elem_id="random_seed")
                with gr.Accordion("Memory", open=False):
                    memory = _dropdown(gr, sorted(studio.memories), d.memory, "Preset", "memory")
                    offload = gr.Radio(
                        list(OFFLOAD_MODES),
                        value=d.offload,
                        label="CPU offload: model moves whole components (fastest), group moves blocks, sequential single layers (slowest)",
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
        # The queue of record (the output folder's ui-jobs.sqlite3): every page's jobs, refreshed while any is active.
        gr.Markdown("### Queue (kept across restarts)")
        jobs = gr.HTML(studio.queue_html(), elem_id="jobs")
        ticks = gr.Timer(2.0, active=studio.active())

        # The form as keyword inputs named after the options (also the API's parameter names).
        form_inputs = {
            "model": model,
            "model_path": model_path,
            "backend": backend,
            "memory": memory,
            "offload": offload,
            "random_seed": random_seed,
            **fields,
        }
        sampling_outputs = [fields[k] for k in MODEL_DEFAULT_FIELDS]
        memory_outputs = [offload, *(fields[k] for k in MEMORY_FIELDS)]

        on_model, on_memory, on_predict, on_auto_plan = _form_handlers(gr, studio)
        on_check, on_run, on_cancel = _run_handlers(gr, studio)

        model.change(on_model, [model], sampling_outputs, queue=False, api_name="model_defaults")
        memory.change(on_memory, [memory], memory_outputs, queue=False, api_name="memory_defaults").then(
            on_auto_plan, None, [plan], inputs_kwargs=form_inputs, queue=False, api_visibility="private"
        )
        predict_btn.click(on_predict, None, [plan], inputs_kwargs=form_inputs, queue=False, api_name="predict_memory")
        # Check at once, then run: every run starts at once in gradio and waits in the Studio's queue, which
        # admits it only within ui.max_queue and ui.max_queue_per_client (gradio's queue can't count per client).
        running = run_btn.click(
            on_check, None, [status, plan], inputs_kwargs=form_inputs, queue=False, api_name="check"
        ).then(
            on_run,
            None,
            [status, video, info, files, gallery, plan],
            inputs_kwargs=form_inputs,
            api_name="generate",
            concurrency_limit=None,
            show_progress="full",
            show_progress_on=[video],
        )
        cancel_btn.click(on_cancel, None, [status], cancels=[running], concurrency_limit=None, api_name="cancel")
        refresh.click(studio.served_gallery, None, [gallery], queue=False, api_name="gallery")
        # The queue table: at load, then every tick while jobs wait or run (Generate starts the ticks).
        page_only = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
        on_tick = lambda: (studio.queue_html(), gr.Timer(active=studio.active()))  # noqa: E731
        run_btn.click(lambda: gr.Timer(active=True), None, [ticks], **page_only)
        ticks.tick(on_tick, None, [jobs, ticks], **page_only)
        blocks.load(on_tick, None, [jobs, ticks], **page_only)
        blocks.load(on_auto_plan, None, [plan], inputs_kwargs=form_inputs, queue=False, api_visibility="private")
    return blocks


def _form_of(values: dict) -> Form:
    """The form from the handlers' keyword inputs (named after the options)."""
    return Form(
        model=values["model"],
        model_path=values["model_path"] or "",
        backend=values["backend"],
        memory=values["memory"],
        offload=values["offload"],
        random_seed=values["random_seed"],
        sampling={k: values[k] for k in SAMPLING_FIELDS},
        memory_fields={k: values[k] for k in MEMORY_FIELDS},
    )


def _form_handlers(gr: ModuleType, studio: Studio) -> tuple[Callable, Callable, Callable, Callable]:
    """(on_model, on_memory, on_predict, on_auto_plan): the widgets a preset fills, and the memory plan."""

    def on_model(name: str):
        updates = studio.model_widgets(name)  # the model's sampling defaults, and its frame rule in the frames label
        return [gr.update(**updates.get(k, {})) for k in MODEL_DEFAULT_FIELDS]

    def on_memory(name: str):
        values = studio.memory_fields(name)
        if values.get("budget_gb", 0) is None:
            values["budget_gb"] = ""  # the text box's empty
        return [gr.update(value=values[k]) if k in values else gr.update() for k in ("offload", *MEMORY_FIELDS)]

    def on_predict(**values):
        try:
            return plan_markdown(studio.plan(_form_of(values)))
        except ConfigError as exc:
            return plan_markdown(f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - one line in the page, traceback in the log
            log.exception("memory plan failed")
            return plan_markdown(f"error: {first_line(exc, with_type=True)}")

    def on_auto_plan(**values):  # shown by itself only for memory=auto
        return on_predict(**values) if values["memory"] == "auto" else ""

    return on_model, on_memory, on_predict, on_auto_plan


def _run_handlers(gr: ModuleType, studio: Studio) -> tuple[Callable, Callable, Callable]:
    """(on_check, on_run, on_cancel): check the form at once, run it in the Studio's queue, cancel."""

    def on_check(request: gr.Request, **values):
        # Runs at once (not queued): a bad form is answered here, before anything waits or loads.
        refused = studio.refusal(*_who(request))
        if refused:
            return status_html(refused), gr.skip()
        try:
            cfg, plan_text = studio.resolve(_form_of(values))
        except ConfigError as exc:
            return status_html(f"error: {exc}"), gr.skip()
        except Exception as exc:  # noqa: BLE001 - one line in the page, traceback in the log
            log.exception("checking the form failed")
            return status_html(f"error: {first_line(exc, with_type=True)}"), gr.skip()
        waiting = "queued: waiting for the generation in progress" if studio.busy() else "starting"
        if plan_text is None:
            return status_html(waiting), gr.skip()
        return status_html(f"{waiting} (memory=auto: {cfg.memory.name})"), plan_markdown(plan_text)

    def on_run(
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - found by its default
        **values,
    ):
        # The Studio admits or refuses the job here, whoever calls (the page after on_check, or an API client
        # directly), then it waits for its turn in the Studio's queue.
        job, message = studio.prepare(_form_of(values), *_who(request))
        if job is None:
            return status_html(message), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
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

    async def on_cancel(request: gr.Request):
        # gradio stops showing this page's run (cancels=); the Studio drops its waiting jobs and stops the
        # running one after its current step. Wait (without holding a thread) to show how it ended.
        async for line in _cancel(studio, _who(request)[0]):
            yield line

    return on_check, on_run, on_cancel


async def _cancel(studio: Studio, session: str | None) -> AsyncIterator[str]:
    """The status boxes of a Cancel for the browser session `session`: what it stopped, then how it ended."""
    jobs = studio.cancel_jobs(session)
    if not jobs:
        yield status_html("cancelled: nothing of this page was waiting or running")
        return
    yield status_html("cancelling: stops after the current step; no video is written")
    for _ in range(int(CANCEL_WAIT_S / 0.2)):
        if all(j.finished.is_set() for j in jobs):
            break
        await asyncio.sleep(0.2)
    ended = [j.outcome.status for j in jobs if j.outcome is not None]
    if ended:
        yield status_html(ended[-1])


@dataclass
class Server:
    """A running page: its URL, the gradio Blocks and the Studio behind it; `close()` stops it."""

    blocks: Any
    studio: Studio
    url: str
    # gradio's private cache folder (GRADIO_TEMP_DIR while the page runs) and the value it replaced.
    cache_dir: str = ""
    _restore: dict[str, str | None] = field(default_factory=dict)

    def close(self) -> None:
        """Stop serving; remove the served links and gradio's copies (the videos stay)."""
        self.blocks.close(verbose=False)
        self.studio.close()
        if self.cache_dir:
            remove_private(self.cache_dir)
        restore_env(self._restore)


def launch(
    cfg: RunConfig, presets: Presets, build_backend: Callable[[BackendConfig], Any], block: bool = True
) -> Server:
    """Serve the page on cfg.ui.host:cfg.ui.port; returns the running server (after Ctrl-C when block).

    `presets`: the model, memory and backend choices the page offers (the entry point composes them);
    `build_backend` makes a backend from a BackendConfig (demo.py passes backends.build_backend).
    """
    gr = _gradio()
    from starlette.middleware import Middleware

    check_ui(cfg.ui)
    port = check_listen(cfg.ui.host, cfg.ui.port)
    warning = host_warning(cfg.ui.host)
    if warning:
        print(warning, file=sys.stderr)
    # gradio checks its own URL over HTTP at start; those request lines are noise in our log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    studio = Studio(cfg, presets, build_backend)  # first: it refuses a folder whose queue another page holds
    cache, old_env = private_gradio_cache()
    try:
        studio.output_dir.mkdir(parents=True, exist_ok=True)
        blocks = build_blocks(studio)
        blocks.queue(max_size=cfg.ui.max_queue, default_concurrency_limit=1)
        # Only the served links and gradio's copies of them, through the routes the page uses (contentv.served).
        guard = Middleware(RouteGuard, roots=lambda: (str(studio.serve_dir), cache))
        blocks.launch(
            server_name=cfg.ui.host,
            server_port=port,
            prevent_thread_lock=True,
            share=False,
            inbrowser=False,
            show_error=True,
            quiet=True,
            ssr_mode=False,
            mcp_server=False,
            app_kwargs={"middleware": [guard], "docs_url": None, "redoc_url": None},
            # Each waiting generation holds a thread in the Studio's queue; gradio's handlers keep their own.
            max_threads=HANDLER_THREADS + cfg.ui.max_queue + 1,
            # Only the folder of links to videos and sidecars (Studio.serve), never the output tree.
            allowed_paths=[str(studio.serve_dir)],
            # System fonts: the page never reaches out to a font service (it works offline).
            theme=gr.themes.Default(
                font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
            ),
            css=CSS,
        )
    except OSError as exc:  # the port was taken between the check and the launch
        _abandon(studio, cache, old_env)
        raise ConfigError("ui.port", cfg.ui.port, f"a free port ({first_line(exc)})") from exc
    except BaseException:
        _abandon(studio, cache, old_env)
        raise
    server = Server(blocks=blocks, studio=studio, url=blocks.local_url, cache_dir=cache, _restore=old_env)
    line = f"ContentV page on {server.url} (Ctrl-C to stop)"
    if not block:
        return print(line, file=sys.stderr) or server
    try:
        with sigterm_exits():  # SIGTERM: exit 143 through server.close(); set before the line callers wait for
            print(line, file=sys.stderr)
            blocks.block_thread()
    finally:
        server.close()
    return server


def _abandon(studio: Studio, cache: str, old_env: dict[str, str | None]) -> None:
    studio.close()
    remove_private(cache)
    restore_env(old_env)
