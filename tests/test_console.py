"""A quiet, honest console: a run prints its summary once and nothing else by default (no library warnings, even
with the test extras' quantization libraries installed, which a run without quantization never imports); a
terminal gets one progress bar per long stage; verbose=true shows the details, which demo.log always keeps."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "model=tiny_contentv",
    "backend=cpu",
    "sampling.height=32",
    "sampling.width=48",
    "sampling.num_frames=5",
    "sampling.num_inference_steps=2",
]
SUMMARY = ("time:", "memory:", "sidecar:", "video:")
# demo.main in a process that then says whether the quantization libraries were imported.
PROBE = (
    "import sys; sys.path.insert(0, {root!r}); import demo; rc = demo.main(sys.argv[1:]); "
    "print('imported:', sorted(m for m in ('bitsandbytes', 'torchao') if m in sys.modules)); sys.exit(rc)"
)

pytestmark = pytest.mark.slow


def env_for(cache_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return {**env, "CONTENTV_CACHE": str(cache_dir)}


def run_logged(tmp_path: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """A run whose output goes to files (not a terminal), as in a log or CI."""
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(root=str(ROOT)), *RUN, *extra, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env_for(cache_dir),
        timeout=600,
    )


def test_a_logged_run_prints_its_summary_once_and_nothing_else(golden_run):
    """The shared command-line run (tests/conftest.py: output to files, a user's environment)."""
    assert golden_run.stderr.strip() == ""  # no warnings, no bars redrawn into a log
    lines = [ln for ln in golden_run.stdout.splitlines() if ln.strip()]
    assert [ln.split()[0] for ln in lines] == list(SUMMARY), golden_run.stdout
    assert "contentv" in golden_run.imported  # the probe saw the run's modules ...
    assert not {"bitsandbytes", "torchao"} & golden_run.imported  # ... and no quantization library (none chosen)
    log = (golden_run.folder / "demo.log").read_text()
    assert "[INFO]" in log and "loading tiny_contentv" in log  # the details are kept in the run folder


def test_verbose_shows_the_details(tmp_path, cache_dir):
    proc = run_logged(tmp_path, cache_dir, "verbose=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[INFO] - loading tiny_contentv" in proc.stdout
    assert all(sum(ln.startswith(s) for ln in proc.stdout.splitlines()) == 1 for s in SUMMARY)


def test_a_quantized_run_imports_its_library_only(tmp_path, cache_dir):
    pytest.importorskip("torchao")
    proc = run_logged(tmp_path, cache_dir, "memory.quantization=torchao_int8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "imported: ['torchao']"
    # the summary says the frames differ, and why
    assert "changes: quantization=torchao_int8 (weights rounded: every frame changes slightly)" in proc.stdout


def test_a_terminal_gets_one_bar_per_long_stage(tmp_path, cache_dir):
    """Under a pseudo-terminal: a bar for loading, text encoding, denoising and decoding, each one bar (its final
    state printed once), then the summary."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: demo.py on the terminal
        os.chdir(tmp_path)
        args = [sys.executable, str(ROOT / "demo.py"), *RUN, f"hydra.run.dir={tmp_path / 'run'}"]
        os.execve(sys.executable, args, env_for(cache_dir))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    # what stays on the screen: per line (the terminal writes \r\n), the last state a bar redrew it to
    screen = [[seg for seg in line.split("\r") if seg.strip()] for line in text.replace("\r\n", "\n").split("\n")]
    final = [segs[-1].strip() for segs in screen if segs]
    stages = ["loading tiny_contentv", "text encoding", "denoising", "decoding"]
    bars = [ln for ln in final if ln.startswith(tuple(stages))]
    assert [next(s for s in stages if ln.startswith(s)) for ln in bars] == stages, final
    assert [ln.split()[0] for ln in final if ln.split()[0] in SUMMARY] == list(SUMMARY)
    assert not [ln for ln in final if "warn" in ln.lower()], final
