"""Model-family registry: `model.family` -> a small spec saying how to load, validate, describe and split it.

Families are imported lazily, so naming one never imports another's code. Adding a family = a folder under
contentv/models/ with a `SPEC`, a line in FAMILIES, and a conf/model/*.yaml (see README "Extending").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contentv.config import ModelConfig, SamplingConfig
from contentv.errors import ConfigError

if TYPE_CHECKING:
    from contentv.attention import AttentionKernel

# family -> module defining SPEC.
FAMILIES = {
    "contentv": "contentv.models.contentv",
    "cogvideox": "contentv.models.cogvideox",
}


@dataclass(frozen=True)
class ModelSpec:
    family: str
    # Resolve the checkpoint folder or hub id (building the tiny checkpoint if asked); no weights loaded.
    resolve_path: Callable[[ModelConfig], str]
    # Raise ConfigError if a local path is not a checkpoint of this family (cheap: reads configs only).
    check_checkpoint: Callable[[str], None]
    # Load the pipeline on the CPU in the configured dtypes.
    load: Callable[[ModelConfig, str], Any]
    # Route every attention layer through `kernel`.
    install_attention: Callable[[Any, AttentionKernel], None]
    # Raise ConfigError for sampling settings this family cannot run (before any weights are loaded).
    validate: Callable[[SamplingConfig], None]
    # Pipeline call arguments from resolved sampling settings.
    call_kwargs: Callable[[SamplingConfig], dict]
    # Planner: the components on the meta device (no weights read), and the token counts of one video.
    # None = the generic description of a diffusers-layout checkpoint (contentv.models.common).
    components_on_meta: Callable[[ModelConfig, str | None], dict] | None = None
    workload: Callable[[dict, SamplingConfig], Any] | None = None
    # Optional: checks that need the model config too (e.g. a length fixed by the architecture).
    validate_for_model: Callable[[ModelConfig, SamplingConfig], None] | None = None
    # The tiny presets this family builds offline with model.tiny=true (each a conf/model/<name>.yaml).
    tiny_names: tuple[str, ...] = ()
    # Frames of the form frames_multiple*k + 1 (the server rounds a duration in seconds to this form).
    frames_multiple: int = 1
    # The model's published sampling settings (sampling fields); a preset's model.sampling_defaults override them.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    # The pipeline's weight-bearing components, and those memory.quantize=null quantizes.
    components: tuple[str, ...] = ("transformer", "vae", "text_encoder")
    quantize_default: tuple[str, ...] = ("transformer",)
    # Context parallelism: diffusers-style plan {module path: ContextParallelInput/Output} for the transformer
    # (None = this family can't split one video across ranks), and the transformer keyword arguments that
    # carry the guidance batch (B = 2: uncond, cond) for guidance parallelism.
    cp_plan: Callable[[], dict] | None = None
    guidance_inputs: tuple[str, ...] = ("hidden_states", "encoder_hidden_states", "timestep")


def get_spec(family: str) -> ModelSpec:
    if family not in FAMILIES:
        raise ConfigError("model.family", family, FAMILIES)
    return importlib.import_module(FAMILIES[family]).SPEC
