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


def run_in_process(capsys, args: list[str], *, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """`demo.main(ARGS)` in this process, answered as `run_demo` answers for a real one: the exit status (a
    SystemExit's too), stdout and stderr (read through pytest's `capsys`). Saves a new Python process (~1.7 s of
    imports per call); keep a real process where only one shows the behaviour (the status as the shell sees it,
    the streams, argv's bytes, signals).

    What a run may change in the process is put back afterwards, pass or fail: sys.argv, os.environ, the working
    folder (`cwd`: where the command runs, as run_demo's), the root logger (Hydra's handlers closed), warnings
    capture, the SIGINT/SIGTERM handlers, torch's thread count, Hydra's globals (its instance and the job's config),
    and the runtime the job module keeps between jobs (released)."""
    import logging
    import signal

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import demo
    from contentv_cli import job

    capsys.readouterr()  # only this call's output
    root = logging.getLogger()
    saved_env, saved_argv, saved_cwd = dict(os.environ), list(sys.argv), os.getcwd()
    saved_log = (list(root.handlers), root.level, logging._warnings_showwarning is not None)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_state = dict(job._STATE)
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    hydra_was_initialized, hydra_cfg = GlobalHydra.instance().is_initialized(), HydraConfig.instance().cfg
    try:
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = demo.main(list(args))
        except SystemExit as exc:  # the job's own exits (sys.exit(2) for a setting found late, 1 for a failure)
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
    finally:
        os.chdir(saved_cwd)
        sys.argv[:] = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in root.handlers:
            if handler not in saved_log[0]:
                handler.close()
        root.handlers[:] = saved_log[0]
        root.setLevel(saved_log[1])
        logging.captureWarnings(saved_log[2])
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        if threads is not None:
            sys.modules["torch"].set_num_threads(threads)
        runtime = job._STATE["runtime"]
        if runtime is not None and runtime is not saved_state["runtime"]:
            runtime.release()
        job._STATE.update(saved_state)
        if not hydra_was_initialized:
            GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = hydra_cfg
    return subprocess.CompletedProcess([sys.executable, str(ROOT / "demo.py"), *args], code, out, err)
