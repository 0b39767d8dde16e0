"""What many test files share: the smallest tiny run's overrides and running the command line as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "faults"
# The smallest tiny video: 32x48, 5 frames, one step (seconds on a CPU).
SMALL = ["sampling.height=32", "sampling.width=48", "sampling.num_frames=5", "sampling.num_inference_steps=1"]
# A whole tiny run on the CPU, prompt included.
TINY = ["model=tiny_contentv", "backend=cpu", *SMALL, "sampling.prompt=a red fox"]


def demo_env(cache_dir: Path | str | None = None, faults: dict[str, str] | None = None, **extra: str) -> dict:
    """The environment of a demo.py process: this checkout first on the path, the test session's cache, and
    tests/faults' injection (sitecustomize) when `faults` names CONTENTV_FAULT_* variables."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    if cache_dir is not None:
        env["CONTENTV_CACHE"] = str(cache_dir)
    if faults is not None:
        env.update(faults, PYTHONPATH=f"{FAULTS}{os.pathsep}{ROOT}")
    return env


def run_demo(
    args: list[str],
    cache_dir: Path | str | None = None,
    *,
    env: dict | None = None,
    faults: dict[str, str] | None = None,
    timeout: int = 600,
    cwd: Path | str = ROOT,
) -> subprocess.CompletedProcess:
    """`python demo.py ARGS` as a user runs it (text output captured)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "demo.py"), *args],
        capture_output=True,
        text=True,
        env={**demo_env(cache_dir, faults), **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )
