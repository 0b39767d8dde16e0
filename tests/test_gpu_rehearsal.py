"""Issue 18 §5: the GPU check, rehearsed in the GPU machine's environment.

The GPU machine has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, accelerate 1.15, huggingface_hub 1.33,
tokenizers 0.23.2, safetensors 0.8, pytest(-timeout), imageio and the rest of benchmarks/make_wheels.sh's list,
and no diffusers, hydra, omegaconf or bitsandbytes. The rehearsal builds a fresh virtual environment with those
versions (this machine's Python 3.11 and CPU torch 2.13 stand in: a torch 2.11 wheel from the registry is a
multi-GB CUDA build), adds only the wheels make_wheels.sh carries, and runs `gpu_check.sh --smoke` with it: a
missing wheel or an API transformers 5.17 lacks fails here, not on the GPU machine.

torch is linked in from this environment (its three top-level folders and its dist-info, no copy) and its own
requirements installed beside it: `pip install torch==2.13.0` unpacks ~1 GB and took ~2 minutes here, the rest of
the environment ~30 s."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def link_torch(site: Path) -> list[str]:
    """This environment's torch, linked into `site`; returns torch's own requirements (no extras)."""
    from packaging.requirements import Requirement

    here = Path(torch.__file__).resolve().parents[1]
    (info,) = here.glob(f"torch-{torch.__version__}.dist-info")
    for name in ("torch", "torchgen", "functorch", info.name):
        (site / name).symlink_to(here / name)
    reqs = [Requirement(r) for r in md.distribution("torch").requires or []]
    return [str(r).split(";")[0] for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


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


@pytest.mark.slow
def test_the_gpu_check_runs_with_the_gpu_machines_libraries_and_the_carried_wheels(tmp_path, cache_dir):
    venv, wheels, out = tmp_path / "venv", tmp_path / "wheels", tmp_path / "out"
    run(Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", venv, env=clean_env())
    py = venv / "bin" / "python"
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    needs = link_torch(site)
    run(py, "-m", "pip", "install", "-q", *needs, *GPU_IMAGE, env=clean_env(), timeout=900)
    found = run(
        py, "-c", "import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if u.find_spec(m)])", *ABSENT
    )
    assert found.stdout.split() == [], "the rehearsal environment must lack what the GPU machine lacks"
    versions = run(py, "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)").stdout
    assert versions.split() == [torch.__version__, "5.17.0"]

    run("bash", ROOT / "benchmarks" / "make_wheels.sh", wheels, env={**os.environ, "PYTHON": sys.executable}, cwd=ROOT)
    env = clean_env(
        OUT=str(out),
        PYTHON=str(py),
        GPU_CHECK_WHEELS=str(wheels),
        GPU_CHECK_SITE=str(tmp_path / "site"),
        CONTENTV_CACHE=str(cache_dir),
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    steps = (out / "steps.jsonl").read_text()
    for step in ("wheels", "preflight", "env", "cuda_tests", "plan"):
        assert f'"step": "{step}", "status": "ok"' in steps, (step, steps)
    assert "bitsandbytes' tests deselected" in proc.stdout or "its tests deselected" in proc.stdout
    assert (out / "summary.md").is_file() and list(out.glob("gpu_*.jsonl"))


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
