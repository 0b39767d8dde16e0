"""The web page's form as config fields: which fields the page edits, how a page value becomes the option's
value (the option's type in contentv/config.py decides), and the memory widgets' values for a preset."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from contentv.config import MemoryConfig
from contentv.errors import ConfigError

# Integers above this are not all representable as floats (JSON numbers in browsers are doubles).
FLOAT_EXACT = 2**53
# The page's offload radio: one mechanism at a time (diffusers can't stack them).
OFFLOAD_MODES = ("none", "model", "sequential", "group")
OFFLOAD_FLAGS = {"model": "model_cpu_offload", "sequential": "sequential_cpu_offload", "group": "group_offload"}
# The config fields the page edits directly, by group (their types decide widgets and conversions).
SAMPLING_FIELDS = (
    "prompt",
    "negative_prompt",
    "num_frames",
    "fps",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "seed",
)
MEMORY_FIELDS = ("vae_slicing", "vae_tiling", "attention_slicing", "quantization", "budget_gb")
# memory.vae_tiling on the page: null is a choice of its own (tile only where the budget needs it), not a blank.
VAE_TILING = {"auto": None, "on": True, "off": False}
# Sampling fields the page refills from a model's defaults when the model preset changes (not what the user wrote).
MODEL_DEFAULT_FIELDS = tuple(f for f in SAMPLING_FIELDS if f not in ("prompt", "seed"))


@dataclass
class Form:
    """What the page sends: the presets chosen, the edited fields, and the page's own switches.

    Sampling and memory fields carry the option's value (None = the preset's or the model's default).
    """

    model: str = "contentv_8b"
    # A checkpoint folder replacing the preset's model.path: one of ui.allowed_paths, or "" for the preset's.
    model_path: str = ""
    backend: str = "auto"
    memory: str = "none"
    offload: str = "none"
    random_seed: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)
    memory_fields: dict[str, Any] = field(default_factory=dict)


def field_kind(schema: type, name: str) -> type:
    """The value type of a config field: int, float, bool or str (Optional unwrapped)."""
    hint = typing.get_type_hints(schema)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def convert(option: str, value: Any, kind: type) -> Any:
    """A page value as the option's type. Empty -> None; gradio numbers arrive as float: a fractional value for
    an integer option is an error, not rounded."""
    if value is None or (value == "" and kind is not str):
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(option, value, "true or false")
        return value
    if kind is str:
        return str(value)
    if kind is int:
        return _integer(option, value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(option, value, "a number") from None
    return number


def _integer(option: str, value: Any) -> int:
    """An integer exactly as sent: ints and integer text as they are; a float only if it holds an integer that
    a float represents exactly (|x| <= 2**53): above that, JSON numbers have already lost digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(option, value, "an integer") from None
    if not number.is_integer():
        raise ConfigError(option, value, "an integer")
    if abs(number) > FLOAT_EXACT:
        raise ConfigError(
            option,
            value,
            f"an integer of at most 2**53 = {FLOAT_EXACT} as a number (larger ones lose digits as "
            "floats: send it as text)",
        )
    return int(number)


def page_memory_fields(memory: MemoryConfig) -> dict[str, Any]:
    """The memory widgets' values for a config (vae_tiling as the page's choice)."""
    fields = {k: getattr(memory, k) for k in MEMORY_FIELDS}
    fields["vae_tiling"] = next(k for k, v in VAE_TILING.items() if v is memory.vae_tiling)
    return fields


def offload_mode(memory: MemoryConfig) -> str:
    """The radio value for a memory config (the first mechanism set wins)."""
    for mode, flag in OFFLOAD_FLAGS.items():
        if getattr(memory, flag):
            return mode
    return "none"


def frames_label(family: str) -> str:
    """The frames widget's label for a model family: the frame counts it returns as asked ("Frames (8k+1)")."""
    from contentv.registry import get_spec

    try:
        multiple = get_spec(family).frames_multiple
    except ConfigError:  # a family this install doesn't know: no rule to show
        return "Frames"
    return f"Frames ({multiple}k+1)"
