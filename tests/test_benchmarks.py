"""The benchmark scripts run (tiny sizes on the CPU) and print their tables: they are not dead code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, cache_dir: Path) -> str:
    env = {**os.environ, "CONTENTV_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_presets_smoke_on_cpu(cache_dir):
    for model in ("tiny_contentv", "tiny_cogvideox_5b"):
        args = ["--model", model, "--backend", "cpu", "--steps", "1", "--no-record", "--presets", "none,low_vram_8g"]
        out = run("gpu_presets.py", *args, "--height", "32", "--width", "48", "--frames", "9", cache_dir=cache_dir)
        lines = [ln for ln in out.splitlines() if ln.startswith(("none", "low_vram_8g"))]
        assert len(lines) == 2 and not any("failed" in ln for ln in lines), out
        assert lines[0].split()[2] == "1.00"  # the baseline's ratio to itself


def test_cpu_reference_smoke(cache_dir):
    out = run(
        "cpu_reference.py",
        "--repeats",
        "1",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "48",
        "--frames",
        "5",
        "--no-record",
        cache_dir=cache_dir,
    )
    methods = [ln.split()[0] for ln in out.splitlines()[-3:]]
    assert methods == ["reference", "runtime", "batched"], out


def test_speedups_smoke(cache_dir):
    out = run(
        "speedups.py",
        "--repeats",
        "1",
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "48",
        "--frames",
        "5",
        "--thresholds",
        "0.1",
        "--no-record",
        cache_dir=cache_dir,
    )
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[-2:]}
    assert set(rows) == {"plain", "first_block"}, out
    assert rows["plain"][-1] == "inf"  # the plain run against itself
