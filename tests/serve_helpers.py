"""A live video API server for the tests: `python demo.py mode=serve` with the tiny model on the CPU, on a free
port of 127.0.0.1, in its own process (the tests kill it with signals)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# The official client warns about OpenAI's own hosted service; this server is not it.
OPENAI_NOTICE = "ignore:The Sora API is scheduled:DeprecationWarning"
# A tiny job: 5 frames (4k+1 at the tiny model's 8 fps), 48x32, one step.
TINY = dict(model="tiny_contentv", size="48x32", seconds="0.5")
FAST = {"num_inference_steps": 1}


class LiveServer:
    """The server process; `url`, `folder`, `lines` (its output so far), `kill()`, `stop()`."""

    def __init__(self, folder: Path, *overrides: str, timeout: float = 180):
        self.folder = Path(folder)
        cmd = [
            sys.executable,
            str(ROOT / "demo.py"),
            "mode=serve",
            "model=tiny_contentv",
            "backend=cpu",
            "serve.port=0",
            f"output.dir={self.folder}",
            f"hydra.run.dir={self.folder / 'hydra'}",
            *overrides,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or not self.url:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))
        self.api = self.url + "/v1"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"serving the Videos API on (http://\S+)/v1", line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # exited

    def client(self, api_key: str = "unused", **kw):
        import openai

        return openai.OpenAI(base_url=self.api, api_key=api_key, **kw)

    def health(self, api_key: str | None = None) -> dict:
        """/health; with the server's key (where it has one) it lists the workers."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.get(self.url + "/health", headers=headers, timeout=10).json()

    def worker_pids(self, api_key: str | None = None) -> list[int]:
        return [w["pid"] for w in self.health(api_key)["workers"]]

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM: a clean shutdown; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def wait_for(predicate, timeout: float = 120, every: float = 0.2, what: str = "condition"):
    """Poll until `predicate()` is truthy; returns its value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def steps_lasting(server: LiveServer, seconds: float = 2.0, api_key: str = "unused") -> int:
    """Denoising steps that take about `seconds` on this machine (from the seconds per step the finished jobs'
    sidecars recorded), so a job is reliably still running when a test kills something, on slow and fast
    machines alike; 20..1000. Runs a one-step job first where none has finished yet."""
    import json
    import statistics

    def per_step() -> list[float]:
        return [json.loads(p.read_text())["seconds_per_step"] for p in (server.folder / "videos").glob("*.json")]

    if not per_step():
        server.client(api_key).videos.create_and_poll(prompt="a first job times a step", extra_body=FAST, **TINY)
    return max(20, min(1000, round(seconds / statistics.median(per_step()))))
