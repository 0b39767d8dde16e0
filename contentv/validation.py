"""The checks: everything knowable before weights load, for every entry point.

`contentv.resolve.resolve_run` calls them once per run (the command line for every job of a sweep before Hydra
writes anything, the web page before a job is queued, `Runtime` for Python users): `check_settings` (every field
of every group, whatever the other choices) and `check_run_files` (output folder, checkpoint). Each failure is one
ConfigError line naming the option, the value and what is allowed. Device-specific parts (kernels, quantizations
the device can run) are asked of the backend.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from contentv import memory_policy
from contentv.config import (
    DTYPES,
    MODES,
    BackendConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SamplingConfig,
    ServeConfig,
    UIConfig,
    resolve_sampling,
)
from contentv.device import DeviceBackend
from contentv.errors import ConfigError
from contentv.hub import check_hub, hub_problem, is_hub_id  # noqa: F401 - part of this module's interface

if typing.TYPE_CHECKING:
    from contentv.registry import ModelSpec


# Hard limits, whatever the memory: libx264 refuses frames wider or taller than 16384 pixels; schedulers are
# trained on 1000 timesteps, so more steps than that repeat timesteps; MP4 players handle up to 240 fps.
MAX_SIDE = 16384
MAX_STEPS = 1000
MAX_FPS = 240
MAX_GUIDANCE = 100.0
# Far more frames than any model here was trained for; the memory check refuses long runs well before this.
MAX_FRAMES = 100_000
MAX_PROMPT_CHARS = 20_000
MAX_PROMPTS = 1_000_000
# A generator seed: torch.Generator.manual_seed takes -2**63 .. 2**64 - 1.
SEED_RANGE = (-(2**63), 2**64 - 1)
# File stems: bytes, leaving room for "-NNNN.json" within the 255-byte names of common file systems.
MAX_STEM_BYTES = 200


@dataclass
class CheckedRun:
    """What validation found out: the family, the resolved sampling settings and the prompts to generate."""

    spec: ModelSpec
    sampling: SamplingConfig  # null fields filled from the model's defaults
    prompts: list[str]  # the prompt, or every line of sampling.prompt_file
    path: str | None = None  # the checkpoint folder or hub id (None if not resolved: tiny models before building)


def validate_run(
    cfg: RunConfig,
    backend: DeviceBackend | None = None,
    *,
    world_size: int = 1,
    output_dir: str | os.PathLike | None = None,
    output_option: str = "output.dir",
    presets: Any = None,
) -> Any:
    """The pre-flight check and every decision about the run: `contentv.resolve.resolve_run` (which see); returns
    its `ResolvedRun`. `backend=None` skips the device-specific parts."""
    from contentv.resolve import resolve_run

    budget = backend.free_memory() if backend is not None else None
    return resolve_run(
        cfg,
        backend,
        presets=presets,
        world_size=world_size,
        budget_bytes=budget,
        output_dir=output_dir,
        output_option=output_option,
    )


def check_run_files(
    cfg: RunConfig,
    spec: ModelSpec,
    *,
    output_dir: str | os.PathLike | None = None,
    output_option: str = "output.dir",
) -> str | None:
    """The files a run needs: the output folder can be written (output.dir, else `output_dir`, reported as
    `output_option`), and a checkpoint that is not built in code exists and is one of this family's. Returns the
    checkpoint folder or hub id (None for a tiny model)."""
    if cfg.output.dir is not None:
        check_writable_dir("output.dir", cfg.output.dir)
    elif output_dir is not None:
        check_writable_dir(output_option, output_dir)
    if cfg.model.tiny:
        return None
    path = spec.resolve_path(cfg.model)
    if is_hub_id(path):
        check_hub(cfg.model.path, cfg.model.revision, cfg.model.local_files_only)
    spec.check_checkpoint(path)
    return path


def check_settings(
    cfg: RunConfig, caps: memory_policy.Capabilities | None = None, *, world_size: int = 1
) -> CheckedRun:
    """The settings alone: every field of every group (types, values, bounds, combinations), the model family's
    sampling rules and the launch layout. Touches no device and no file but sampling.prompt_file."""
    from contentv import parallel, speedup
    from contentv.registry import get_spec

    check_types(cfg)
    if cfg.mode not in MODES:
        raise ConfigError("mode", cfg.mode, MODES)
    check_backend_config(cfg.backend)
    check_model_config(cfg.model)
    spec = get_spec(cfg.model.family)
    sampling = resolve_sampling(cfg.sampling, cfg.model)
    check_bounds(sampling)
    prompts = (
        read_prompt_file(sampling.prompt_file, sampling.max_prompts) if sampling.prompt_file else [sampling.prompt]
    )
    check_text("sampling.negative_prompt", sampling.negative_prompt, allow_empty=True)
    for prompt in prompts:
        check_text("sampling.prompt", prompt)
        spec.validate(dataclasses.replace(sampling, prompt=prompt))
    if spec.validate_for_model is not None:
        spec.validate_for_model(cfg.model, sampling)
    # memory=auto: the preset the planner picks is checked again once chosen
    memory_policy.check(cfg.memory, caps if cfg.memory.name != "auto" else None)
    memory_policy.check_components(cfg.memory, spec.components)
    speedup.check(cfg.speedup, cfg.memory if cfg.memory.name != "auto" else None)
    if hasattr(caps, "check_attention"):  # the backend's kernel must take the model's dtype (dry runs: the planner)
        caps.check_attention(cfg.backend.attention, cfg.model.dtype)
    parallel.check(cfg.parallel, cfg.memory, cfg.speedup)
    lay = parallel.layout(cfg.parallel, world_size)
    if lay.context_parallel:
        check_parallel_split(cfg, lay, sampling)
    if world_size > 1 and cfg.mode != "generate":
        raise ConfigError("mode", cfg.mode, "generate under torchrun/SLURM (the web page is one process)")
    check_output(cfg.output)
    check_ui(cfg.ui)
    check_serve(cfg.serve, serving=cfg.mode == "serve")
    if cfg.sweep.baseline < 0:
        raise ConfigError("sweep.baseline", cfg.sweep.baseline, "a job number >= 0 (0 = the sweep's first job)")
    return CheckedRun(spec=spec, sampling=sampling, prompts=prompts)


def check_parallel_split(cfg: RunConfig, lay: Any, sampling: SamplingConfig) -> None:
    """Head and token counts of this model at this size against the context-parallel degrees, from the family's
    meta-device description (no weights read)."""
    from contentv import parallel
    from contentv.models.common import generic_components_on_meta, generic_workload
    from contentv.registry import get_spec

    spec = get_spec(cfg.model.family)
    path = spec.resolve_path(cfg.model)
    components = (spec.components_on_meta or generic_components_on_meta)(cfg.model, path)
    work = (spec.workload or generic_workload)(components, sampling)
    heads = int(components["transformer"][0].config.num_attention_heads)
    parallel.check_split(cfg.parallel, lay, heads, work.video_tokens, work.text_tokens)


# ------------------------------------------------------------------------------------------ types


def check_types(cfg: Any, prefix: str = "") -> None:
    """Each dataclass field holds a value of its annotated type (Python users can put anything there; Hydra's
    own type checks stop at the command line). bool is not an int; floats must be finite."""
    hints = typing.get_type_hints(type(cfg))  # once per class: it evaluates every annotation (slow)
    for f in fields(cfg):
        value, option, hint = getattr(cfg, f.name), f"{prefix}{f.name}", hints[f.name]
        if is_dataclass(value):
            check_types(value, f"{option}.")
            continue
        if not _matches(value, hint):
            raise ConfigError(option, value, f"a value of type {_type_name(hint)}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True  # Any


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "text"}
    if hint in names:
        return names[hint]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if len(args) < len(typing.get_args(hint)):
        return f"null or {' or '.join(_type_name(a) for a in args)}"
    return " or ".join(_type_name(a) for a in args) or str(hint)


# ------------------------------------------------------------------------------------------ groups


def check_backend_config(b: BackendConfig) -> None:
    """Backend fields, whichever backend is chosen (its name is checked by the backend registry)."""
    if b.device_index < 0:
        raise ConfigError("backend.device_index", b.device_index, "an integer >= 0")
    for key in b.options:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"backend.options.{key}", b.options[key], "options named by identifiers")
    if not b.attention or not b.attention.replace("_", "").isalnum():
        raise ConfigError("backend.attention", b.attention, "auto or the name of one of the backend's kernels")


def check_model_config(m: ModelConfig) -> None:
    for option, value in (("model.dtype", m.dtype), ("model.vae_dtype", m.vae_dtype)):
        if value not in DTYPES:
            raise ConfigError(option, value, DTYPES)
    if m.text_encoder_dtype is not None and m.text_encoder_dtype not in DTYPES:
        raise ConfigError("model.text_encoder_dtype", m.text_encoder_dtype, ["null (= model.dtype)", *DTYPES])
    if m.tiny and m.path is not None:
        raise ConfigError(
            "model.path",
            m.path,
            f"null with model.tiny=true ({m.name} is built in code; set model.tiny=false to load a folder)",
        )
    if not m.tiny and (m.path is None or not str(m.path).strip()):
        raise ConfigError("model.path", m.path, "a checkpoint folder or hub id like owner/name (or model.tiny=true)")
    if not 0 <= m.tiny_seed < 2**32:
        raise ConfigError("model.tiny_seed", m.tiny_seed, "an integer in 0..4294967295")


def check_text(option: str, text: str | None, allow_empty: bool = False) -> None:
    """Prompts: UTF-8 text without NUL or other control characters (newlines and tabs allowed), of a sane length."""
    if text is None and allow_empty:
        return
    if text is None or (not allow_empty and not str(text).strip()):
        raise ConfigError(option, text, "a non-empty text")
    if len(text) > MAX_PROMPT_CHARS:
        raise ConfigError(option, text, f"at most {MAX_PROMPT_CHARS} characters (got {len(text)})")
    try:  # a byte a Latin-1 terminal sent (0xE9 -> '\udce9' under surrogateescape), a lone surrogate from JSON
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            option,
            text,
            f"UTF-8 text (character {exc.start + 1} is {text[exc.start]!r}, an invalid byte or lone surrogate: "
            "is the terminal's encoding UTF-8?)",
        ) from None
    bad = next((c for c in text if ord(c) < 32 and c not in "\n\t\r"), None)
    if bad is not None:
        raise ConfigError(option, text, f"text without control characters (found {bad!r})")


def check_bounds(s: SamplingConfig) -> None:
    """Hard limits every family shares (the family's own validate() checks its multiples and lengths)."""
    for option, value, low, high in (
        ("sampling.height", s.height, 16, MAX_SIDE),
        ("sampling.width", s.width, 16, MAX_SIDE),
        ("sampling.num_frames", s.num_frames, 1, MAX_FRAMES),
        ("sampling.num_inference_steps", s.num_inference_steps, 1, MAX_STEPS),
        ("sampling.fps", s.fps, 1, MAX_FPS),
    ):
        if value is None or not low <= value <= high:
            why = {
                "sampling.height": "the H.264 encoder's limit",
                "sampling.width": "the H.264 encoder's limit",
                "sampling.num_inference_steps": "the scheduler's 1000 training timesteps",
            }.get(option, "")
            raise ConfigError(option, value, f"an integer in {low}..{high}" + (f" ({why})" if why else ""))
    g = s.guidance_scale
    if g is None or not math.isfinite(g) or not 0 <= g <= MAX_GUIDANCE:
        raise ConfigError("sampling.guidance_scale", g, f"a number in 0..{MAX_GUIDANCE:g} (<= 1 disables guidance)")
    if not SEED_RANGE[0] <= s.seed <= SEED_RANGE[1]:
        raise ConfigError("sampling.seed", s.seed, f"an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    if not 1 <= s.max_prompts <= MAX_PROMPTS:
        raise ConfigError("sampling.max_prompts", s.max_prompts, f"an integer in 1..{MAX_PROMPTS}")
    if s.max_sequence_length is not None and s.max_sequence_length < 1:
        raise ConfigError("sampling.max_sequence_length", s.max_sequence_length, "null or an integer >= 1")


def check_common_sampling(s: SamplingConfig) -> None:
    """Settings every family shares: a prompt, sizes, frames, steps, guidance, fps, seed within their limits."""
    check_text("sampling.prompt", s.prompt)
    check_bounds(s)


def check_frames(num_frames: int | None, temporal: int) -> None:
    if num_frames is None or num_frames < 1 or (num_frames - 1) % temporal:
        raise ConfigError("sampling.num_frames", num_frames, f"of the form {temporal}k+1, e.g. 49, 121, 125")


def check_size(height: int | None, width: int | None, multiple: int) -> None:
    for key, value in (("sampling.height", height), ("sampling.width", width)):
        if value is None or value <= 0 or value % multiple:
            raise ConfigError(key, value, f"a positive multiple of {multiple}")


def check_stem(option: str, stem: str) -> None:
    """A file stem is a file name: no folders, no '..', not hidden, no control characters, not too long."""
    if not stem or stem.strip() != stem or stem in (".", ".."):
        raise ConfigError(option, stem, "a file name (not empty, no leading/trailing spaces, not . or ..)")
    if any(c in stem for c in "/\\") or any(ord(c) < 32 for c in stem):
        raise ConfigError(option, stem, "a file name without folders (no / or \\) or control characters")
    if stem.startswith("."):
        raise ConfigError(
            option, stem, "a file name that doesn't start with '.' (hidden files are the writer's temporaries)"
        )
    if len(stem.encode()) > MAX_STEM_BYTES:
        raise ConfigError(option, stem, f"a file name of at most {MAX_STEM_BYTES} bytes (got {len(stem.encode())})")


def check_output(o: OutputConfig) -> None:
    if o.name is not None:
        check_stem("output.name", o.name)
    if not 0 <= o.crf <= 51:
        raise ConfigError("output.crf", o.crf, "an integer in 0..51 (0 = lossless)")
    if o.dir is not None and (not o.dir.strip() or "\0" in o.dir):
        raise ConfigError("output.dir", o.dir, "null (the run folder) or a folder path")


def check_ui(u: UIConfig) -> None:
    """ui.* settings (checked on every run: a bad value is a bad value whether or not the page is served)."""
    if not 0 <= u.port <= 65535:
        raise ConfigError("ui.port", u.port, "a TCP port in 0..65535 (0 = any free port)")
    if not 1 <= u.max_queue <= 1000:
        raise ConfigError("ui.max_queue", u.max_queue, "an integer in 1..1000")
    if not 1 <= u.max_queue_per_client <= u.max_queue:
        raise ConfigError(
            "ui.max_queue_per_client", u.max_queue_per_client, f"an integer in 1..ui.max_queue ({u.max_queue})"
        )
    if not _is_host(u.host):
        raise ConfigError("ui.host", u.host, "an interface address such as 127.0.0.1, 0.0.0.0, ::1 or a host name")
    for i, path in enumerate(u.allowed_paths):
        if not path.strip() or "\0" in path:
            raise ConfigError(f"ui.allowed_paths[{i}]", path, "a checkpoint folder path")


def check_serve(s: ServeConfig, serving: bool = False) -> None:  # serving: only loopback without serve.api_key
    for option, value, low, high in (
        ("serve.port", s.port, 0, 65535),
        ("serve.max_queue", s.max_queue, 1, 100_000),
        ("serve.max_queue_per_key", s.max_queue_per_key, 1, s.max_queue),
        ("serve.max_body_bytes", s.max_body_bytes, 1024, 1 << 30),
        ("serve.max_prompt_chars", s.max_prompt_chars, 1, MAX_PROMPT_CHARS),
        ("serve.job_ttl_hours", s.job_ttl_hours, 0, 10**6),
        ("serve.max_wait_s", s.max_wait_s, 0, 10**6),
    ):
        if not low <= value <= high:
            raise ConfigError(option, value, f"a value in {low}..{high}")
    if not _is_host(s.host):
        raise ConfigError("serve.host", s.host, "an interface address such as 127.0.0.1, 0.0.0.0, ::1 or a host name")
    if s.api_key is not None and not re.fullmatch(r"[!-~]{8,}", s.api_key):  # printable ASCII, no spaces
        raise ConfigError("serve.api_key", "<hidden>", "null or a key of at least 8 printable characters, no spaces")
    if serving and not s.api_key and s.host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError("serve.host", s.host, "127.0.0.1, ::1 or localhost unless serve.api_key is set")
    if s.workers not in ("local", "ray"):
        raise ConfigError("serve.workers", s.workers, ("local", "ray"))


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(
            re.fullmatch(
                r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
                host,
            )
        )


# ------------------------------------------------------------------------------------------ files


def check_local_checkpoint(option: str, path: str, required: dict[str, str]) -> Path:
    """A local folder holding `required` files ({relative file: what it is}); hub ids pass unchecked."""
    p = Path(path).expanduser()
    if is_hub_id(path):
        return p
    if not p.exists():
        raise ConfigError(option, path, "an existing checkpoint folder or a hub id like owner/name")
    if not p.is_dir():
        raise ConfigError(option, path, "a checkpoint folder (this is a file)")
    missing = [f for f in required if not (p / f).is_file()]
    if missing:
        raise ConfigError(option, path, f"a checkpoint folder with {', '.join(missing)} (not found)")
    return p


def check_writable_dir(option: str, path: str | os.PathLike) -> None:
    """The folder exists and is writable, or can be created: a folder is actually made (and removed) inside its
    nearest existing parent, since permissions alone don't tell (root, /proc, read-only or full file systems)."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if os.path.lexists(probe):  # a link to nowhere, or a loop: mkdir would fail there after the run
            raise ConfigError(option, str(path), f"a folder ({_broken_link(probe)})")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(option, str(path), f"a folder ({probe} is a file)")
    try:
        Path(tempfile.mkdtemp(prefix=".contentv-probe-", dir=probe)).rmdir()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(option, str(path), f"a folder that can be created and written ({probe}: {reason})") from exc


def _broken_link(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop"
    try:
        return f"{path} is a link to {os.readlink(path)}, which doesn't exist"
    except OSError:
        return f"{path} can't be reached"


def read_prompt_file(path: str, max_prompts: int | None = None) -> list[str]:
    """One prompt per non-empty line; lines starting with # are comments. UTF-8 text only (a BOM is dropped);
    lines end at a line feed (or CR LF) only (U+2028 and the like stay inside their line); each line is checked as a
    prompt and a bad one is named by its number; the file's size is capped before it is read and the prompts
    at `max_prompts` (sampling.max_prompts)."""
    from contentv import prompt_file

    return prompt_file.read(path, max_prompts, check_text)


def diffusers_call_kwargs(s: SamplingConfig) -> dict:
    """The diffusers call arguments every family shares, from resolved sampling settings."""
    kw = dict(
        prompt=s.prompt,
        negative_prompt=s.negative_prompt,
        height=s.height,
        width=s.width,
        num_frames=s.num_frames,
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
    )
    if s.max_sequence_length is not None:
        kw["max_sequence_length"] = s.max_sequence_length
    return kw
