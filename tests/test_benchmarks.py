"""The benchmark scripts run (tiny sizes on the CPU) and print their tables: they are not dead code. The GPU check
runs its whole sequence on the CPU (`--smoke`: its full run, every field of every row and the failures it reports,
is checked in tests/test_gpu_rehearsal.py, in the GPU machine's library versions; here its budget and arguments),
and the README's GPU tables are the ones its results generate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import gpu_tables
from benchmarks.random_weights import materialize

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def run(script: str, *args: str, cache_dir: Path) -> str:
    # one intra-op thread: the tiny runs gain nothing from more on a shared machine (conftest.single_thread)
    env = {**os.environ, "CONTENTV_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
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


def gpu_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"],
        capture_output=True,
        text=True,
        env=full,
        cwd=ROOT,
        timeout=900,
    )


def steps(out: Path) -> dict[str, dict]:
    return {s["step"]: s for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}


# ------------------------------------------------------------------------------------------ the GPU check


def test_gpu_check_reports_steps_out_of_time(tmp_path):
    out = tmp_path / "out"
    proc = gpu_check(out, GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 1, proc.stderr
    done = steps(out)
    assert done["wheels"]["status"] == "skipped"
    for name, step in done.items():
        if name != "wheels":
            assert step["status"] == "out_of_time", step
    assert "out_of_time" in (out / "summary.md").read_text()


def test_gpu_check_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert proc.returncode == 2 and "usage" in proc.stderr


# ------------------------------------------------------------------------------------------ tables and README


def row(preset: str, **kw) -> dict:
    base = {
        "device": "NVIDIA H200",
        "run_id": "20260101T000000Z",
        "model": "contentv_8b",
        "size": "432x768x125",
        "preset": preset,
        "status": "ok",
        "text_encoding_s": 1.0,
        "decoding_s": None,
        "decode_from": None,
        "seconds_per_step": 3.0,
        "tflops": 580.0,
        "fraction_of_spec": 0.59,
        "peak_device_bytes": 30 * GiB,
        "peak_device_reserved_bytes": 31 * GiB,
        "device_ratio": 1.02,
        "versions": {"torch": "2.11.0+cu130", "diffusers": "0.42.1"},
        "dtype": "bfloat16",
        "warmup_steps": 1,
        "timed_steps": 2,
    }
    return {**base, **kw}


def test_tables_reuse_a_shared_decode_and_compare_with_none():
    rows = gpu_tables.latest(
        [
            row("none", decoding_s=20.0, step_seconds=[4.0, 3.0, 3.0]),
            row("low_vram_24g", seconds_per_step=3.2, decoding_s=30.0, peak_device_reserved_bytes=21 * GiB),
            row("low_vram_16g", status="started"),
            row("low_vram_16g", seconds_per_step=3.6, decode_from="low_vram_24g", peak_device_reserved_bytes=16 * GiB),
            row("low_vram_8g", status="failed", error="OutOfMemoryError: CUDA out of memory"),
        ]
    )
    by = {r["preset"]: r for r in rows}
    assert by["none"]["projected_50_steps_s"] == 1 + 4 + 49 * 3 + 20 and by["none"]["ratio_vs_none"] == 1.0
    assert by["low_vram_16g"]["projected_50_steps_s"] == 1 + 180 + 30  # the tiled decode of low_vram_24g
    assert by["low_vram_16g"]["decode"] == "from low_vram_24g"
    assert by["low_vram_16g"]["ratio_vs_none"] == 1.2
    assert by["low_vram_16g"]["ratio_50_steps_vs_none"] == round(211 / 172, 4)
    assert gpu_tables.target_text(by["none"]).startswith("met: planner 1.02x; 59% of spec")
    assert gpu_tables.target_text(by["low_vram_24g"]).startswith("MISSED: time 1.111x <= 1.10x")
    assert "MISSED: peak 16.0 <= 15.0 GiB" in gpu_tables.target_text(by["low_vram_16g"])
    table = gpu_tables.markdown(rows)
    assert "| low_vram_8g | failed: OutOfMemoryError" in table and "NVIDIA H200" in table
    assert "| none | 3.00 | 1.00 | 172 (1.00) | 580 (59%) | 30.00 / 31.00 |" in table
    assert "low_vram_8g" in gpu_tables.format_terminal(rows)


def test_tables_take_the_latest_run_per_model_and_say_when_a_preset_did_not_finish():
    cog = {"model": "cogvideox_5b", "size": "720x480x49"}
    rows = gpu_tables.latest(
        [row("none", run_id="A"), row("none", run_id="A", **cog), row("none", run_id="B", status="started")]
    )
    assert sorted((r["model"], r["run_id"]) for r in rows) == [("cogvideox_5b", "A"), ("contentv_8b", "B")]
    assert "did not finish" in gpu_tables.markdown(rows)


def test_device_names_and_specs():
    assert gpu_tables.device_slug("NVIDIA H200") == "nvidia_h200"
    assert gpu_tables.spec_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_tables.spec_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_tables.spec_tflops("cpu x86_64", "cpu") is None


def test_junit_summary(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_memory" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_memory" name="test_b"/>'
        '<testcase classname="tests.test_memory" name="test_c"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    assert gpu_tables.junit_summary(path) == "1 passed, 1 failed, 0 errors, 1 skipped (failing: test_memory::test_a)"
    assert gpu_tables.junit_summary(tmp_path / "none.xml") == "no junit file"


def test_readme_gpu_tables_are_generated_from_the_results():
    """The README's GPU block is exactly what benchmarks/gpu_tables.py makes of benchmarks/results/gpu_*.jsonl
    ('not measured yet' while there are none): regenerate with `python benchmarks/gpu_tables.py --write-readme`."""
    assert gpu_tables.current_readme_block() == gpu_tables.readme_block()
    if not list(gpu_tables.RESULTS.glob("gpu_*.jsonl")):
        assert "not measured yet" in gpu_tables.current_readme_block()


# ------------------------------------------------------------------------------------------ random weights


def test_materialize_fills_in_the_load_dtype_and_counts_like_the_planner():
    from contentv.planner import weight_bytes

    def build() -> nn.Module:
        with torch.device("meta"):
            return nn.Sequential(nn.Linear(700, 3000), nn.LayerNorm(3000), nn.Linear(3000, 5))

    module = build()
    total = materialize(module, torch.bfloat16, "cpu")
    assert total == weight_bytes(build(), torch.bfloat16)
    big = module[0].weight
    assert big.dtype == torch.bfloat16 and big.device.type == "cpu"
    assert torch.isfinite(big).all() and big.float().std() > 0.01  # random, not zeros
    assert module[2].weight.abs().sum() > 0


# ------------------------------------------------------------------------------------------ CPU benchmarks


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_startup_smoke(cache_dir, tiny_ckpt):
    """Each command in a fresh process: help and a finished tiny run exit 0, a bad setting exits 2, and the tiny
    run's start-up share is a fraction. The session's tiny checkpoint is cached (tiny_ckpt): no untimed run first."""
    out = run("startup.py", "--repeats", "1", "--no-build", "--no-record", cache_dir=cache_dir)
    rows = {ln.split()[1]: ln for ln in out.splitlines() if ln.split()[1:2] and " fastest " in ln}
    assert set(rows) == {"help", "preflight_error", "tiny_run"}, out
    assert "exit [0]" in rows["help"] and "exit [2]" in rows["preflight_error"] and "exit [0]" in rows["tiny_run"]
    share = float(rows["tiny_run"].rsplit("start-up share ", 1)[1].rstrip("%")) / 100
    assert 0 < share < 1
    (split,) = [ln for ln in out.splitlines() if ln.startswith("imports of a tiny run: ")]
    total, ours = (float(x) for x in re.findall(r"([\d.]+) s", split)[:2])
    assert 0 < ours < total and "torch" in split  # the runtime's own modules are a part of what torch and co. take


@pytest.mark.slow
def test_serve_load_smoke(cache_dir, tmp_path):
    """The service load benchmark in a tiny configuration (one worker, three jobs), recorded to a temporary file:
    every accepted job finished exactly once, only the killed worker's job failed, and every figure is there."""
    results = ROOT / "benchmarks" / "results" / "serve_load.jsonl"
    before = results.read_bytes()
    out = tmp_path / "serve_load.jsonl"
    args = ("--clients", "2", "--jobs", "3", "--workers", "1", "--repeats", "1", "--out", str(out))
    run("serve_load.py", *args, cache_dir=cache_dir)
    steady, killed, warm = (json.loads(line) for line in out.read_text().splitlines())
    for row in (steady, killed):
        assert row["exactly_once"] is True and row["accepted"] == row["jobs"] == 3, row
        assert row["lost"] == row["unfinished"] == row["missing_videos"] == row["duplicate_videos"] == 0, row
        assert row["claimed_twice"] == 0 and row["admission_p99_ms"] >= row["admission_p50_ms"] > 0
        assert row["jobs_per_min"] > 0 and row["workers"] == 1 and row["commit"] and row["cpu_count"]
    assert (steady["scenario"], steady["completed"], steady["failed"]) == ("steady", 3, 0)
    assert (killed["scenario"], killed["completed"], killed["failed"]) == ("worker_killed", 2, 1)
    assert killed["failed_codes"] == ["worker_died"]
    assert warm["scenario"] == "warm_vs_fresh" and warm["fresh_s"] > warm["warm_s"] > 0 and warm["ratio"] > 1
    assert results.read_bytes() == before  # the recorded results are not touched


def test_a_low_vram_preset_is_measured_capped_at_its_card_size(monkeypatch):
    """Issue 18 §3: on an 80 GB GPU, low_vram_16g runs with the caching allocator capped at 16 GiB (what the card
    has), the others uncapped; the cap is lifted after each preset."""
    from types import SimpleNamespace

    from benchmarks import gpu_presets

    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * GiB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: fractions.append(f))
    cuda = SimpleNamespace(name="cuda", device=torch.device("cuda", 0))
    assert gpu_presets.cap_memory(cuda, "low_vram_16g") == 16 * GiB and fractions[-1] == pytest.approx(0.2)
    assert gpu_presets.cap_memory(cuda, "low_vram_8g") == 8 * GiB and fractions[-1] == pytest.approx(0.1)
    assert gpu_presets.cap_memory(cuda, "none") is None and fractions[-1] == 1.0
    assert gpu_presets.cap_memory(cuda, None) is None and fractions[-1] == 1.0
    assert gpu_presets.cap_memory(SimpleNamespace(name="cpu"), "low_vram_8g") is None and len(fractions) == 4
