"""What `torchrun` runs in tests/test_desync.py: the command line on each rank, with one rank made different.

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node=2 tests/desync_worker.py OUT SCENARIO ARGS...

SCENARIO:
  budget  rank 1 reports far less free device memory than rank 0 (the CPU backend reports none of its own)
  oom     rank 1 runs out of device memory in its first transformer forward (torch.OutOfMemoryError)
Each rank writes OUT/rank<r>.json with the resolved run it generated from (what it decided, as its sidecar would).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

RANK = int(os.environ.get("RANK", "0"))


def report_budgets() -> None:
    from backends.cpu import CPUBackend

    budget = (64 if RANK == 0 else 2) * 2**30
    CPUBackend.free_memory = lambda self: budget


def fail_first_forward() -> None:
    from contentv.models.contentv.transformer import SD3Transformer3DModel

    forward = SD3Transformer3DModel.forward

    def out_of_memory(self, *args, **kwargs):
        if RANK == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(self, *args, **kwargs)

    SD3Transformer3DModel.forward = out_of_memory


def record_decisions(out: Path) -> None:
    from contentv.runtime import Runtime

    run_all = Runtime.run_all

    def recording(self, run, *args, **kwargs):
        (out / f"rank{RANK}.json").write_text(json.dumps(run.record()))
        return run_all(self, run, *args, **kwargs)

    Runtime.run_all = recording


if __name__ == "__main__":
    out, scenario, *argv = sys.argv[1:]
    {"budget": report_budgets, "oom": fail_first_forward}[scenario]()
    record_decisions(Path(out))
    import demo

    sys.exit(demo.main(argv))
