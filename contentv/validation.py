"""Checks that run before any weights are loaded; each failure is one ConfigError line."""

from __future__ import annotations

import os
import re
from pathlib import Path

from contentv.config import SamplingConfig
from contentv.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_common_sampling(s: SamplingConfig) -> None:
    """Settings every family shares: a prompt, positive sizes, at least one step."""
    if s.prompt is None or not str(s.prompt).strip():
        raise ConfigError("sampling.prompt", s.prompt, "a non-empty text")
    if s.num_inference_steps is None or s.num_inference_steps < 1:
        raise ConfigError("sampling.num_inference_steps", s.num_inference_steps, "an integer >= 1")
    if s.guidance_scale is None or s.guidance_scale < 0:
        raise ConfigError("sampling.guidance_scale", s.guidance_scale, "a number >= 0 (<= 1 disables guidance)")
    if s.fps is None or s.fps < 1:
        raise ConfigError("sampling.fps", s.fps, "an integer >= 1")


def check_frames(num_frames: int | None, temporal: int) -> None:
    if num_frames is None or num_frames < 1 or (num_frames - 1) % temporal:
        raise ConfigError("sampling.num_frames", num_frames, f"of the form {temporal}k+1, e.g. 49, 121, 125")


def check_size(height: int | None, width: int | None, multiple: int) -> None:
    for key, value in (("sampling.height", height), ("sampling.width", width)):
        if value is None or value <= 0 or value % multiple:
            raise ConfigError(key, value, f"a positive multiple of {multiple}")


def is_hub_id(path: str) -> bool:
    """'owner/name' that is not an existing local path."""
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


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
    """The folder exists and is writable, or can be created (its nearest existing parent is writable)."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(option, str(path), f"a folder ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(option, str(path), f"a writable folder ({probe} is not writable)")


def read_prompt_file(path: str) -> list[str]:
    """One prompt per non-empty line; lines starting with # are comments."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("sampling.prompt_file", path, "an existing text file with one prompt per line")
    prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise ConfigError("sampling.prompt_file", path, "a file with at least one non-empty, non-comment line")
    return prompts


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
