"""One home for each piece of knowledge: where device names, model families, private diffusers APIs and the memory
policy may appear, and how long a file may grow. (Imports' direction is tests/test_layering.py's.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    *(ROOT / "contentv").rglob("*.py"),
    *(ROOT / "contentv_cli").rglob("*.py"),
    *(ROOT / "backends").rglob("*.py"),
]
SOURCES.append(ROOT / "demo.py")
# The command line (the entry layer, what demo.py dispatches to) composes with Hydra and OmegaConf; the rest of the
# library never does.
CLI = ROOT / "contentv_cli"
DEVICES = ("cuda", "npu")
FAMILIES = ("contentv", "cogvideox")
# diffusers modules it does not export (the adapter contentv/_diffusers.py is their one user).
DIFFUSERS_INTERNALS = (
    "diffusers.hooks.context_parallel",
    "diffusers.hooks.first_block_cache",
    "diffusers.hooks.hooks",
    "diffusers.hooks.group_offloading",
    "diffusers.hooks.layerwise_casting",
)
POLICY_NAMES = ("GUIDANCE_MODES", "TEXT_ENCODER_MODES", "QUANTIZATIONS", "QUANT_SKIP", "PLACEMENTS")
MAX_LINES = 500


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def string_constants(path: Path) -> list[tuple[str, int]]:
    """(value, line) of every string constant in the code, docstrings excluded."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.value, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_device_names_only_in_their_backend_and_the_registry():
    """A new device = its file, its YAML, one registry line: no other module knows device names or their modules."""
    bad = []
    for path in SOURCES:
        own = {f"backends/{d}.py": d for d in DEVICES}.get(rel(path))
        if rel(path) == "backends/__init__.py":
            continue  # the registry: one "name": "module:Class" line per device
        for value, line in string_constants(path):
            name = value.split(":")[0]
            if name in DEVICES and name != own:
                bad.append(f"{rel(path)}:{line}: {value!r}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in DEVICES and getattr(node.value, "id", "") == "torch":
                if node.attr != own:
                    bad.append(f"{rel(path)}:{node.lineno}: torch.{node.attr}")
    assert not bad, bad


# The dataclasses' defaults are the product's default model, ContentV-8B (as conf/config.yaml's), for Python users.
DEFAULT_MODEL = {("contentv/config.py", "contentv")}


def test_model_families_only_in_their_folder_and_the_registry():
    """A new model family = its folder, its YAML, one registry line."""
    bad = []
    for path in SOURCES:
        if rel(path) == "contentv/registry.py":
            continue
        for value, line in string_constants(path):
            if value in FAMILIES and not rel(path).startswith(f"contentv/models/{value}/"):
                if (rel(path), value) in DEFAULT_MODEL:
                    continue
                bad.append(f"{rel(path)}:{line}: {value!r}")
    assert not bad, bad


def private_diffusers_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "diffusers":
            parts = node.module.split(".")
            if any(p.startswith("_") for p in parts) or node.module in DIFFUSERS_INTERNALS:
                found.append(f"{rel(path)}:{node.lineno}: from {node.module}")
            found += [f"{rel(path)}:{node.lineno}: {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "diffusers" and (any(p.startswith("_") for p in parts) or a.name in DIFFUSERS_INTERNALS):
                    found.append(f"{rel(path)}:{node.lineno}: import {a.name}")
    return found


def test_private_diffusers_apis_only_through_the_adapter():
    bad = [hit for path in SOURCES if rel(path) != "contentv/_diffusers.py" for hit in private_diffusers_imports(path)]
    assert not bad, bad
    assert private_diffusers_imports(ROOT / "contentv" / "_diffusers.py")  # the checker finds the adapter's own


def test_the_adapter_reaches_every_private_api_it_names():
    """The adapter is the list to re-check when diffusers is upgraded: each of its accessors still resolves."""
    from contentv import _diffusers

    assert _diffusers.group_offload_layer_types() and _diffusers.layerwise_casting_defaults()
    assert len(_diffusers.context_parallel_plan_types()) == 2 and len(_diffusers.context_parallel_configs()) == 2
    assert callable(_diffusers.equipartition_sharder().shard) and len(_diffusers.first_block_cache_parts()) == 4
    assert _diffusers.attention_backend_problem("native") is None  # PyTorch's SDPA: always usable


def test_memory_policy_names_are_defined_once():
    bad = []
    for path in SOURCES:
        if rel(path) == "contentv/memory_policy.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for target in targets:
                if isinstance(target, ast.Name) and target.id in POLICY_NAMES:
                    bad.append(f"{rel(path)}:{node.lineno}: {target.id}")
    assert not bad, bad


def test_the_library_neither_imports_omegaconf_nor_reads_conf():
    """Presets are composed once by the entry point (Hydra) and handed over."""
    bad = []
    for path in (ROOT / "contentv").rglob("*.py"):
        if path.is_relative_to(CLI):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{rel(path)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in ("omegaconf", "conf")]
        bad += [f"{rel(path)}:{line}: {v!r}" for v, line in string_constants(path) if v.strip("/").startswith("conf/")]
    assert not bad, bad


@pytest.mark.parametrize("path", SOURCES, ids=rel)
def test_no_file_over_500_lines(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"{rel(path)}: {len(lines)} lines; split it by concern"
