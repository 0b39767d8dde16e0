"""Issue 18 §5: the GPU check, rehearsed in the GPU machine's environment, and its smoke run's results.

The GPU machine has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, accelerate 1.15, huggingface_hub 1.33,
tokenizers 0.23.2, safetensors 0.8, pytest(-timeout), imageio and the rest of benchmarks/make_wheels.sh's list,
and no diffusers, hydra, omegaconf or bitsandbytes. The rehearsal builds a fresh virtual environment with those
versions (this machine's Python 3.11 and CPU torch 2.13 stand in: a torch 2.11 wheel from the registry is a
multi-GB CUDA build), adds only the wheels make_wheels.sh carries, and runs `gpu_check.sh --smoke` with it: a
missing wheel or an API transformers 5.17 lacks fails here, not on the GPU machine.

torch is linked in from this environment with what it needs (its top-level folders and dist-info, no copy), and
so is pip: `pip install torch==2.13.0` unpacks ~1 GB and took ~2 minutes here, and installing torch's sympy and
networkx (and ensurepip's pip) took most of the rest; the GPU image's own libraries are installed (~30 s).

That one smoke run of the check also carries the smoke's own checks (one run of the whole check, not two): every
field of every benchmark row recorded, and failures reported while the rest still runs: a run killed by its 1 s
time box, and an unknown preset."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_tables

ROOT = Path(__file__).resolve().parents[1]
GPU_IMAGE = (
    "transformers==5.17.0",
    "accelerate==1.15.0",
    "huggingface_hub==1.33.0",
    "tokenizers==0.23.2",
    "safetensors==0.8.0",
    # the rest of the image (benchmarks/make_wheels.sh), unpinned
    *("sentencepiece", "protobuf", "numpy", "psutil", "tqdm", "PyYAML", "Pillow", "requests", "pytest"),
    *("pytest-timeout", "imageio"),
)
ABSENT = ("diffusers", "hydra", "omegaconf", "bitsandbytes")  # on the GPU machine only if carried
MODELS, PRESETS = ("tiny_contentv", "tiny_cogvideox_5b"), ("none", "low_vram_24g", "low_vram_8g")
# The check's benchmark runs: first one killed by its 1 s time box (a run's imports alone take longer), then both
# tiny models under three presets and one that does not exist, in one process.
RUNS = f"tiny_contentv none 1 decode; {','.join(MODELS)} {','.join(PRESETS)},no_such_preset 400 decode"
KILLED, BENCH = "bench tiny_contentv none", f"bench {','.join(MODELS)} {','.join(PRESETS)},no_such_preset"

# What every measured row carries (what a benchmark row must record, plus the planner beside each measurement).
ROW_FIELDS = (
    "run_id",
    "date",
    "device",
    "backend",
    "versions",
    "model",
    "size",
    "height",
    "width",
    "num_frames",
    "preset",
    "status",
    "guidance",
    "warmup_steps",
    "timed_steps",
    "step_seconds",
    "seconds_per_step",
    "text_encoding_s",
    "decoding_s",
    "load_s",
    "total_s",
    "projected_50_steps_s",
    "peak_device_bytes",
    "peak_device_reserved_bytes",
    "peak_host_rss_bytes",
    "load_peak_host_rss_bytes",
    "predicted",
    "predicted_peak_device_bytes",
    "device_ratio",
    "predicted_host_bytes",
    "host_ratio",
    "predicted_host_peak_bytes",
    "host_peak_ratio",
    "predicted_rel_time",
    "flops_per_step",
    "tflops",
    "spec_tflops",
    "fraction_of_spec",
    "ratio_vs_none",
    "ratio_50_steps_vs_none",
    "decode",
    "stages",
)


def requirements(name: str) -> list[str]:
    """A distribution's own requirements (no extras)."""
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in md.distribution(name).requires or []]
    return [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def link(site: Path, *names: str) -> list[str]:
    """These distributions of this environment and everything they require, linked into `site` (each one's
    top-level folders or modules and its dist-info, no copy: pip sees them installed); returns their names."""
    done: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        dist = md.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key not in done:
            done[key] = dist
            todo += requirements(key)
    for dist in done.values():
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            if not top.endswith(".pth") and not (site / top).exists():
                (site / top).symlink_to(Path(dist.locate_file(top)))
    return sorted(done)


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this one's virtual environment or import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return {**env, **extra}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, cache_dir) -> SimpleNamespace:
    """The rehearsal environment built, the wheels made, and `gpu_check.sh --smoke` run once with both (RUNS)."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    venv, wheels, out = tmp / "venv", tmp / "wheels", tmp / "out"
    # make_wheels.sh (pip download, one wheel built) needs nothing of the new environment: it runs meanwhile.
    make_wheels = subprocess.Popen(
        ["bash", str(ROOT / "benchmarks" / "make_wheels.sh"), str(wheels)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        cwd=ROOT,
    )
    try:
        run(Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", "--without-pip", venv, env=clean_env())
        py = venv / "bin" / "python"
        site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
        linked = link(site, "torch", "pip")
        run(py, "-m", "pip", "install", "-q", *GPU_IMAGE, env=clean_env(), timeout=900)
        wheel_log = make_wheels.communicate(timeout=900)[0]
    finally:
        if make_wheels.poll() is None:
            make_wheels.kill()
            make_wheels.wait()
    assert make_wheels.returncode == 0, wheel_log[-3000:]
    env = clean_env(
        OUT=str(out),
        PYTHON=str(py),
        GPU_CHECK_WHEELS=str(wheels),
        GPU_CHECK_SITE=str(tmp / "site"),
        GPU_CHECK_RUNS=RUNS,
        CONTENTV_CACHE=str(cache_dir),
        OMP_NUM_THREADS="1",  # the tiny runs gain nothing from more threads on a shared machine (conftest)
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    steps = {s["step"]: s for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    return SimpleNamespace(py=py, linked=linked, out=out, proc=proc, steps=steps)


@pytest.mark.slow
def test_the_gpu_check_runs_with_the_gpu_machines_libraries_and_the_carried_wheels(rehearsal):
    py, out, proc, steps = rehearsal.py, rehearsal.out, rehearsal.proc, rehearsal.steps
    found = run(
        py, "-c", "import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if u.find_spec(m)])", *ABSENT
    )
    assert found.stdout.split() == [], "the rehearsal environment must lack what the GPU machine lacks"
    assert not {"transformers", "accelerate", "numpy"} & set(rehearsal.linked)  # installed, not this environment's
    versions = (out / "env.txt").read_text().splitlines()  # what the check's own interpreter found
    assert f"torch {torch.__version__}" in versions and "transformers 5.17.0" in versions, versions

    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 1, log  # 1: the two failures RUNS asks for (test_gpu_check_smoke_... reads them)
    assert {name: s["status"] for name, s in steps.items() if s["status"] != "ok"} == {
        KILLED: "timeout",
        BENCH: "failed",
    }, log
    for step in ("wheels", "preflight", "env", "cuda_tests", "plan"):
        assert steps[step]["status"] == "ok", (step, steps)
    assert "bitsandbytes' tests deselected" in proc.stdout or "its tests deselected" in proc.stdout
    (results,) = out.glob("gpu_*.jsonl")
    rows = gpu_tables.latest(gpu_tables.read_rows([results]))
    ran = {(r["model"], r["preset"]): r["status"] for r in rows if r["preset"] != "no_such_preset"}
    assert ran == {(m, p): "ok" for m in MODELS for p in PRESETS}  # every real preset ran in this environment
    assert (out / "summary.md").is_file()


@pytest.mark.slow
def test_gpu_check_smoke_records_every_field_and_reports_failures(rehearsal):
    """The whole GPU check on the CPU with the tiny models (the rehearsal's run): a 1 s box times a run out and an
    unknown preset fails, and both are reported while everything else still runs."""
    out, proc, done = rehearsal.out, rehearsal.proc, rehearsal.steps
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: some step failed, and it said so
    assert done[KILLED]["status"] == "timeout" and "1 s time box" in done[KILLED]["note"]
    assert list(done).index(KILLED) < list(done).index(BENCH)  # the runs after it still ran
    assert done["plan"]["status"] == "ok"
    assert done[BENCH]["status"] == "failed"

    (results,) = out.glob("gpu_*.jsonl")
    rows = gpu_tables.latest(gpu_tables.read_rows([results]))
    by = {(r["model"], r["preset"]): r for r in rows}
    presets = (*PRESETS, "no_such_preset")
    assert set(by) == {(m, p) for m in MODELS for p in presets}
    for model in MODELS:
        bad = by[model, "no_such_preset"]
        assert bad["status"] == "failed" and "low_vram_8g" in bad["error"]  # names the valid presets
    for key in [(m, p) for m in MODELS for p in PRESETS]:
        row = by[key]
        assert row["status"] == "ok" and row["decode"] == "measured", row
        assert [f for f in ROW_FIELDS if f not in row] == [], key
        assert row["size"] == "32x48x9" and row["timed_steps"] == 1 and len(row["step_seconds"]) == 1
        assert not row["predicted"]["error"], row["predicted"]  # the planner's numbers are beside the measured
        assert row["predicted_host_bytes"] > 0 and row["host_ratio"] > 0
        assert row["predicted_peak_device_bytes"] > 0 and row["peak_device_bytes"] is None  # no counter on a CPU
        assert row["versions"]["torch"] == torch.__version__
        assert row["flops_per_step"] > 0 and row["projected_50_steps_s"] > 0
    assert by["tiny_contentv", "none"]["ratio_vs_none"] == 1.0
    assert by["tiny_cogvideox_5b", "low_vram_8g"]["ratio_vs_none"] > 0
    assert by["tiny_contentv", "low_vram_8g"]["guidance"] == "sequential"

    summary = (out / "summary.md").read_text()
    assert f"| {KILLED} | timeout |" in summary and "failed: KeyError" in summary
    assert "| low_vram_8g |" in summary
    assert {p.name for p in out.iterdir()} <= {
        "gpu_check.log",
        "steps.jsonl",
        "env.txt",
        "cuda_tests.xml",
        "predictions.json",
        results.name,
        "summary.md",
    }  # at most 8 files come back from the device machine
    assert not (ROOT / "benchmarks" / "results" / results.name).exists()  # a smoke run records nothing in the repo


@pytest.mark.slow
def test_the_pre_flight_stops_the_check_before_any_run(tmp_path):
    """A library the check needs fails to import: the check stops after the ~10 s pre-flight, says which, and
    starts nothing that would spend device time."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "diffusers.py").write_text("raise ImportError('diffusers is not installed here')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONPATH": str(broken)}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "preflight: diffusers: ImportError: diffusers is not installed here" in proc.stdout
    steps = [line for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s.split('"')[3] for s in steps] == ["wheels", "preflight"]  # nothing after it
    assert '"status": "failed"' in steps[1]


def min_run_s(models: str, presets: str) -> int:
    script = f'source <(sed -n "/^min_run_s()/,/^}}/p" "{ROOT}/benchmarks/gpu_check.sh"); min_run_s {models} {presets}'
    return int(subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout)


def test_each_run_needs_a_realistic_minimum_per_preset():
    """ContentV-8B takes 50-80 s per preset process with its load: a run starts only when that much is left
    (otherwise it is recorded out_of_time, not killed halfway by its box)."""
    assert min_run_s("contentv_8b", "none") == 60
    assert min_run_s("contentv_8b", "low_vram_16g,low_vram_8g") == 120
    assert min_run_s("cogvideox_5b", "none") == 45
    assert min_run_s("tiny_contentv,tiny_cogvideox_5b", "none,low_vram_8g") == 20
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    gpu_runs = re.findall(r'RUNS=\$\{GPU_CHECK_RUNS:-"([^"]*)"\}', script)[1]  # the GPU branch's default
    runs = [r.split() for r in gpu_runs.split(";") if r.strip()]
    assert len(runs) >= 5 and all(int(box) >= min_run_s(models, presets) for models, presets, box, *_ in runs)
