"""A component's config.json bounded by the weights present, before anything is built from it.

A config can lie: `num_layers=100000` beside three layers of weights makes even a meta-device build construct
100,000 blocks (minutes, gigabytes); `num_layers=-1` builds a transformer with no blocks that "works" and leaves
the real weights unused. So every count in a config is checked first: no negative counts, no absurd sizes, no
more layers (or list entries) than the longest numbered run of modules in the weights (`blocks.0..N-1`); and,
once the component is built on the meta device, every tensor in the weights must be one the model reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

# Words in a config key that make its integer a count or a size (ids such as pad_token_id are neither).
_COUNT_WORDS = re.compile(r"(^|_)(num|n|layers?|blocks?|heads?|size|dim|channels|frames|length|height|width|max)(_|$)")
_LAYER_KEY = re.compile(r"(^|_)(layers|blocks|layer)$|^num_.*layers$|^n_layers?$|layers_per_block")
# Larger than any size a real config holds (vocabularies ~256k, positions ~131k), small enough to build.
MAX_CONFIG_INT = 2**20
# Lists in a config (block types, channel widths, patch sizes) have a few entries; more than the weights' longest
# numbered run of modules (or this) is not a model.
MIN_LIST_CAP = 16
# Layers of a config read without its weights (memory planning from configs alone): real models have < 100.
MAX_LAYERS = 1000
_INDEX = re.compile(r"\.(\d+)(?=\.)")
# Buffers older libraries saved that newer ones rebuild instead of loading.
_ALWAYS_IGNORED = (r"(^|\.)position_ids$",)


def longest_run(names: Iterable[str]) -> int:
    """The longest numbered run of modules in tensor names: {"blocks.0.w", "blocks.2.w"} -> 3."""
    longest: dict[str, int] = {}
    for name in names:
        for m in _INDEX.finditer(name):
            prefix = name[: m.start()]
            longest[prefix] = max(longest.get(prefix, 0), int(m.group(1)) + 1)
    return max(longest.values(), default=0)


def _items(config: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every leaf in a config, nested dicts included (text_config, vision_config, ...)."""
    if isinstance(config, dict):
        for k, v in config.items():
            if isinstance(v, dict):
                yield from _items(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v


def check_counts(config: dict, tensors: dict[str, Any] | None, fail: Callable[[str], Exception], rel: str) -> None:
    """Raise `fail(...)` for a count in `config` (the file `rel`) that the weights `tensors` can't back
    (`tensors=None`: no weights at hand; layer counts are then bounded by MAX_LAYERS)."""
    run = MAX_LAYERS if tensors is None else max(longest_run(tensors), 1)
    for key, value in _items(config):
        leaf = key.rsplit(".", 1)[-1]
        if leaf.startswith("_") or leaf.endswith(("_id", "_ids", "_index", "_idx")):
            continue
        if isinstance(value, list) and len(value) > max(run, MIN_LIST_CAP):
            raise fail(f"{rel}: {key} has {len(value)} entries; the weights hold at most {run} numbered modules")
        if not isinstance(value, int) or isinstance(value, bool) or not _COUNT_WORDS.search(leaf):
            continue
        if value < 0:
            raise fail(f"{rel}: {key}={value} is negative (a count or size must be >= 0)")
        if value > MAX_CONFIG_INT:
            raise fail(f"{rel}: {key}={value} is larger than any real model's ({MAX_CONFIG_INT} at most)")
        if _LAYER_KEY.search(leaf) and value > run:
            raise fail(
                f"{rel}: {key}={value} but the weights hold {run} layers at most (the config describes another model)"
            )


def unused(tensors: Iterable[str], used: set[str], ignore: Iterable[str] = ()) -> list[str]:
    """Tensor names in the weights that the built model doesn't read (`used`: the names it loads, with aliases),
    except those matching the model's own ignore patterns (`_keys_to_ignore_on_load_unexpected`)."""
    patterns = [re.compile(p) for p in (*_ALWAYS_IGNORED, *(ignore or ()))]
    return sorted(n for n in tensors if n not in used and not any(p.search(n) for p in patterns))
