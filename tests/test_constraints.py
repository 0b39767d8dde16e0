"""Installs that reproduce: constraints.txt pins what CI installs, and CI and the README install with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_constraints_pin_every_package_the_test_install_pulls_at_its_version_here():
    """`.ci/constraints.py --diff` lists each installed package of the `.[test]` closure whose version differs from
    constraints.txt (or that it doesn't pin): nothing, in a venv installed with the constraints."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "constraints.py"), "--diff"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_constraints_pin_exact_versions_and_leave_the_project_out():
    lines = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][^+\s]*", ln) for ln in lines), lines
    names = {ln.split("==")[0] for ln in lines}
    assert "contentv" not in names
    assert {"torch", "diffusers", "transformers", "imageio", "gradio", "pytest"} <= names
    # Pinned now for the server work's extras, so adding them to pyproject.toml changes no version.
    assert {"openai", "ray", "prometheus-client", "fastapi", "uvicorn", "python-multipart"} <= names


def test_ci_and_the_readme_install_with_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    blocking = ci[: ci.index("unconstrained_check() {")]
    installs = re.findall(r"(?:pip install|\$PIP) [^\n]*", blocking.replace('PIP="python -m pip install', ""))
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -c constraints.txt -e ".[test]" && python -m pytest -n 2 --dist loadfile' in readme
    # The newest releases are checked too, without failing CI.
    assert 'echo "unconstrained check: FAILED' in ci and "if (set +e; unconstrained_check); then" in ci
