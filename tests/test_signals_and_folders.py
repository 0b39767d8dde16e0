"""Signals and run folders, as processes: Ctrl-C at any moment is `interrupted`, exit 130, no traceback; runs started
in the same second each get their own run folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
TINY = [*helpers.TINY]


def env(cache_dir: Path) -> dict:
    return {**os.environ, "CONTENTV_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("after_s", [0.3, 1.5, 4.0], ids=["imports", "pre-flight", "later"])
def test_ctrl_c_at_any_moment_is_one_line_exit_130(tmp_path, cache_dir, after_s):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "demo.py"), *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C's default action, as a terminal gives it: a process started with SIGINT ignored (a background job
        # of a script, a pytest-xdist worker's children) rightly keeps ignoring it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0 and after_s > 1:  # a fast machine finished before the signal: nothing to check then
        pytest.skip(f"the run ended within {after_s} s")
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [ln for ln in err.splitlines() if ln.strip()][-1].startswith("interrupted")


def test_runs_started_in_the_same_second_each_get_their_own_folder(tmp_path, cache_dir, monkeypatch):
    """The default run folder (outputs/<date>/<time>) is the same for runs started in the same second: each run
    reserves its own (a -N suffix), so no .hydra/overrides.yaml or demo.log is shared. The clock Hydra's ${now}
    reads is stopped here, so three runs start "in the same second"."""
    import datetime as real
    import logging

    import hydra.core.utils

    import demo

    class Stopped(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(hydra.core.utils, "datetime", Stopped)
    monkeypatch.chdir(tmp_path)
    for seed in (1, 2, 3):
        assert demo.main([*TINY, f"sampling.seed={seed}"]) == 0
        logging.getLogger().handlers.clear()
    day = tmp_path / "outputs" / "2026-01-02"
    assert sorted(p.name for p in day.iterdir()) == ["03-04-05", "03-04-05-1", "03-04-05-2"]
    for n, folder in enumerate(sorted(day.iterdir()), 1):
        assert f"- sampling.seed={n}" in (folder / ".hydra" / "overrides.yaml").read_text()
        assert len(list(folder.glob("*.mp4"))) == 1
