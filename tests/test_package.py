"""A real package: a wheel built from a fresh copy of the tree, installed non-editable, run from another folder.

The wheel goes into a new virtual environment that sees this environment's libraries through a .pth file (no
downloads); the checkout is not on its path, so what runs is the installed copy: configs read as package data,
the `contentv` console command, Hydra's launcher configs and the sweep callback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Printed as JSON by the installed copy: where each module lives, what its configs compose to.
PROBE = """
import json, sys
import backends, contentv, contentv_cli as cli
from contentv_cli.compose import config_dir
from hydra import compose
from hydra.utils import get_class

out = {m.__name__: m.__file__ for m in (backends, contentv, cli)}
out["configs"] = str(config_dir())
out["callback"] = sys.modules[get_class("contentv_cli.sweep.SweepSummary").__module__].__file__
with cli.hydra_context():
    out["launchers"] = {
        name: compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True).hydra.launcher._target_
        for name in sys.argv[1:]
    }
out["models"] = sorted(cli.load_presets(("model",)).models)
print(json.dumps(out))
"""


def user_project(folder: Path) -> Path:
    """A user's project with the usual names: its own demo.py and a `conf` package (Hydra's layout)."""
    (folder / "conf").mkdir(parents=True)
    (folder / "conf" / "__init__.py").write_text("MINE = True\n")
    (folder / "conf" / "config.yaml").write_text("mine: true\n")
    (folder / "demo.py").write_text("def load_config(*a):\n    raise SystemExit('the user demo.py was imported')\n")
    return folder


def fresh_copy(dest: Path) -> Path:
    """The working tree as a fresh clone would have it (tracked and new files; nothing git ignores)."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git and a git checkout")
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():  # listed but deleted in the working tree: not in a fresh clone either
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, wheel): the wheel built from a fresh copy, installed (non-editable, no dependencies) into a venv."""
    tmp = tmp_path_factory.mktemp("package")
    src = fresh_copy(tmp / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src]
    subprocess.run(build, check=True)
    (wheel,) = (tmp / "dist").glob("contentv-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    # Installed before the .pth below exists, so pip sees only the new venv (and never touches this one).
    subprocess.run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], check=True)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    here = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # After the venv's own site-packages on sys.path: the installed contentv wins over any copy in this env.
    (Path(purelib) / "_this_envs_libraries.pth").write_text("\n".join(here) + "\n")
    return venv, wheel, Path(purelib)


def run(venv: Path, args: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["TRANSFORMERS_VERBOSITY"] = "error"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_wheel_carries_configs_entry_point_and_floors(installed):
    _, wheel, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs
    assert {f"contentv/{c}" for c in configs} <= names  # every config, launchers included, inside the package
    assert {"contentv/conf/__init__.py", "contentv_cli/__init__.py", "backends/__init__.py"} <= names
    # nothing at the top level that a user's project is likely to have
    assert not any(n.startswith(("tests/", "conf/")) or n == "demo.py" for n in names), sorted(names)[:20]
    assert "contentv = contentv_cli:main" in entry
    assert "Requires-Dist: torch>=2.6" in meta
    assert 'Requires-Dist: contentv[quant,serve,sweep,ui]; extra == "test"' in meta  # the test extra reuses the others


@pytest.mark.slow
def test_installed_copy_runs_from_another_folder(installed, tmp_path, cache_dir):
    venv, _, purelib = installed
    launchers = sorted(p.stem for p in (ROOT / "conf" / "hydra" / "launcher").glob("*.yaml"))
    plugins = all(importlib.util.find_spec(f"hydra_plugins.hydra_{n}_launcher") for n in ("joblib", "submitit"))
    here = user_project(tmp_path)  # its own demo.py and conf/ shadow nothing of ours
    out = run(venv, [venv / "bin" / "python", "-c", PROBE, *(launchers if plugins else [])], here)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for module in ("backends", "contentv", "contentv_cli", "configs", "callback"):
        assert Path(found[module]).resolve().is_relative_to(purelib.resolve()), (module, found[module])
    assert found["models"] == sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
    for name, target in found["launchers"].items():
        assert "joblib" in target.lower() or "submitit" in target.lower(), (name, target)
    if not plugins:
        pytest.skip("launcher configs not composed: install the sweep extra")


@pytest.mark.slow
def test_console_command_help(installed, tmp_path, cache_dir):
    venv, _, _ = installed
    out = run(venv, ["contentv", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Config groups (GROUP=OPTION" in out.stdout and "tiny_contentv" in out.stdout


@pytest.mark.slow
def test_console_command_bad_input_is_one_line_exit_2(installed, tmp_path, cache_dir):
    venv, _, _ = installed
    out = run(venv, ["contentv", "model=tiny_contentv", "backend=cpu", "sampling.num_frames=50"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: sampling.num_frames=50 is not valid: of the form 4k+1, e.g. 49, 121, 125"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_console_command_makes_a_video(installed, tmp_path, cache_dir):
    venv, _, _ = installed
    args = ["contentv", "model=tiny_contentv", "backend=cpu", "sampling.num_inference_steps=1"]
    args += ["sampling.height=32", "sampling.width=48", "sampling.num_frames=5", f"hydra.run.dir={tmp_path / 'run'}"]
    out = run(venv, args, user_project(tmp_path / "project"))
    assert out.returncode == 0, out.stderr[-3000:]
    (video,) = (tmp_path / "run").glob("*.mp4")
    assert video.stat().st_size > 0 and video.with_suffix(".json").is_file()
    assert f"video:   {video}" in out.stdout


def test_every_package_folder_is_installed():
    """pyproject lists the packages (the configs are mapped into contentv/conf): a new package folder must be added."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("contentv", "contentv_cli", "backends")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found | {"contentv.conf"} == listed
