"""ContentV runtime: text to video from the command line (Hydra). Installed as the `contentv` command too.

    python demo.py model=tiny_contentv backend=cpu        # tiny offline model on the CPU, seconds
    python demo.py                                        # ContentV-8B, reference defaults, backend=auto
    python demo.py backend=cuda sampling.prompt="a red fox, walking in snow" sampling.num_frames=49
    python demo.py model.path=/ckpt/ContentV-8B memory=low_vram_24g
    python demo.py model=cogvideox_5b backend=cuda         # CogVideoX-5B (model=cogvideox_2b, tiny_cogvideox)
    USE_ASCEND_NPU=1 python demo.py                       # Ascend NPU (the reference's switch)
    python demo.py -m sampling.num_inference_steps=25,50 sampling.seed=1,2   # sweep; weights load once
    python demo.py -m 'sampling.prompt=choice("a cat","a dog")'              # sweep over prompts
    python demo.py compare multirun/before multirun/after                    # two sweeps' time, memory, PSNR
    python demo.py mode=ui model=tiny_contentv backend=cpu   # web page on http://127.0.0.1:7860 ('.[ui]')
    python demo.py dry_run=true backend=cuda memory.budget_gb=16   # the memory plan for a 16 GB GPU, no weights
    torchrun --nproc_per_node=4 demo.py backend=cuda parallel=cfg parallel.ulysses_degree=2   # one video, 4 GPUs
    python demo.py --help                                 # groups, options and every field

Every setting is checked before anything is loaded or written: a bad one prints one line naming the
option, the value and what is allowed, and exits with status 2 (debug=true shows a traceback).

The command line itself lives in the package (`contentv_cli`: composition, --help, pre-flight, the job function,
the sweep callback); this file is the command users type. From Python, the same presets:
`from contentv_cli import load_config, load_presets`.
"""

from __future__ import annotations

import sys

import contentv  # noqa: F401 - first, and light (no torch): a run's start-up is measured from here (IMPORTED_AT)
import contentv_cli
from contentv_cli import *  # noqa: F403 - the command line's names (contentv_cli.__all__): demo.main, demo.load_config, ...
from contentv_cli import main
from contentv_cli.compose import GROUPS

__all__ = ["GROUPS", *contentv_cli.__all__]

if __name__ == "__main__":
    sys.exit(main())
