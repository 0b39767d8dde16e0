"""ContentV runtime: text-to-video with ContentV-8B and CogVideoX on CUDA, Ascend NPU and the CPU.

The public names (README "From Python"); the pipelines are imported on first use, so `import contentv` is cheap:

    import contentv
    pipe = contentv.ContentVPipeline.from_pretrained(contentv.tiny_checkpoint("tiny_contentv"))

A RunConfig from the command line's presets: `from demo import load_config` (demo.py is installed with the
package; this library never imports Hydra).
"""

from __future__ import annotations

import time
from typing import Any

from contentv._diffusers import quiet_library_imports
from contentv.tiny import tiny_checkpoint

# The Python API as quiet as the command line: no import-time lines from quantization libraries or image processors
# that no run here uses (cheap: nothing is imported; it only takes effect if diffusers' models load after this).
quiet_library_imports()

# When this library was first imported: where a run's "startup" begins (demo.py imports it before anything heavy).
# Not the process's own start: a process exec'd by a shell (`bash -c`, `exec`) inherits the shell's start time.
IMPORTED_AT = time.time()
# This distribution's name, which is also the installed command's (pyproject's [project.scripts]).
DISTRIBUTION = COMMAND = __name__

__all__ = ["CogVideoXRuntimePipeline", "ContentVPipeline", "RunConfig", "Runtime", "tiny_checkpoint"]

# Public name -> the module defining it, imported by __getattr__ when first asked for.
_LAZY = {
    "ContentVPipeline": "contentv.models.contentv.pipeline",
    "CogVideoXRuntimePipeline": "contentv.models.cogvideox.pipeline",
    "RunConfig": "contentv.config",
    "Runtime": "contentv.runtime",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'contentv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
