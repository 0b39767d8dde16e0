"""Write constraints.txt: the exact version of every package `pip install -e ".[test]"` pulls, as installed here.

    python .ci/constraints.py > constraints.txt
    python .ci/constraints.py --diff    # what this venv has that differs from constraints.txt (CI's unpinned check)

Walks the installed packages' own requirements (markers evaluated for this Python and platform) from the project's
dependencies with its `test` extra, plus EXTRA_ROOTS; the project itself is left out. Run it in the venv CI last
passed with, after `pip install -e ".[test]"` (and the EXTRA_ROOTS).
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Packages the server work adds to the extras (not yet in pyproject.toml): pinned now, so adding them changes nothing.
EXTRA_ROOTS = ("openai", "ray", "prometheus-client", "fastapi", "uvicorn", "python-multipart")


def closure(roots: list[tuple[Requirement, set[str]]], strict: bool = True) -> dict[str, str]:
    """{canonical name: installed version} of `roots` and everything they require, recursively (`strict`: a
    required package that is not installed is an error; else it is skipped)."""
    found: dict[str, str] = {}
    todo = list(roots)
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            if not strict:
                continue
            sys.exit(f"{req.name} is required but not installed: pip install -e '.[test]' first")
        found[name] = dist.version
        for line in dist.requires or []:
            todo.append((Requirement(line), set(req.extras) or {""}))
    return found


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = canonicalize_name(project["name"])
    extras = project["optional-dependencies"]
    roots = [Requirement(r) for r in project["dependencies"]]
    wanted, todo = set(), ["test"]
    while todo:  # the test extra names other extras of the project (contentv[quant,ui,sweep])
        extra = todo.pop()
        wanted.add(extra)
        for r in map(Requirement, extras[extra]):
            if canonicalize_name(r.name) == own:
                todo += [e for e in r.extras if e not in wanted]
            else:
                roots.append(r)
    roots += [Requirement(r) for r in EXTRA_ROOTS]
    diff = sys.argv[1:] == ["--diff"]
    pins = closure([(r, {""}) for r in roots], strict=not diff)
    pins.pop(own, None)
    if diff:
        print_diff({name: version.split("+")[0] for name, version in pins.items()})
        return
    print("# Exact versions CI passed with (python .ci/constraints.py > constraints.txt); pyproject.toml keeps the")
    print("# ranges users get. Reproducible install: pip install -c constraints.txt -e '.[test]'")
    print(f"# Python {sys.version.split()[0]}, {sys.platform}.")
    for name in sorted(pins):
        # A local label (torch's +cpu) names the index the build came from: `==2.13.0` matches it, and any index.
        print(f"{name}=={pins[name].split('+')[0]}")


def print_diff(installed: dict[str, str]) -> None:
    """One line per package whose installed version is not constraints.txt's (or that it doesn't pin)."""
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = version.strip()
    for name in sorted(installed):
        if pinned.get(name) != installed[name]:
            print(f"  {name} {installed[name]} (constraints.txt: {pinned.get(name, 'not pinned')})")


if __name__ == "__main__":
    main()
