"""The import rule: demo.py -> contentv_cli (the entry layer) -> backends -> contentv, never the other way; no device
names in contentv/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, inside a function?) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name.split(".")[0], child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.append((child.module.split(".")[0], child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


CLI = ROOT / "contentv_cli"


def library_files() -> list[Path]:
    """The library: contentv/ (its command line, contentv_cli, is the entry layer beside it)."""
    return list((ROOT / "contentv").rglob("*.py"))


def test_contentv_never_imports_backends_hydra_or_torch_npu():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in library_files()
        for mod, line, _ in imported_modules(p)
        if mod in {"backends", "hydra", "torch_npu", "demo"}
    ]
    assert not bad, bad


def test_the_library_never_imports_its_command_line():
    bad = []
    for p in library_files():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad += [f"{p.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.startswith("contentv_cli")]
    assert not bad, bad


def test_the_command_line_never_imports_demo_or_torch_npu():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in CLI.rglob("*.py")
        for mod, line, _ in imported_modules(p)
        if mod in {"torch_npu", "demo"}
    ]
    assert not bad, bad


def test_backends_never_import_demo_or_hydra():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in (ROOT / "backends").rglob("*.py")
        for mod, line, _ in imported_modules(p)
        if mod in {"demo", "hydra"}
    ]
    assert not bad, bad


def test_torch_npu_only_in_npu_backend_and_only_inside_functions():
    for p in [*ROOT.glob("*.py"), *(ROOT / "backends").rglob("*.py"), *(ROOT / "contentv").rglob("*.py")]:
        for mod, line, in_function in imported_modules(p):
            if mod == "torch_npu":
                assert p.name == "npu.py" and p.parent.name == "backends", f"{p}:{line}"
                assert in_function, f"{p}:{line} imports torch_npu at module level"


def test_no_device_names_in_contentv():
    pattern = re.compile(r"""["'](cuda|npu)(:\d+)?["']|\.cuda\(\)|\.npu\(\)|torch\.(cuda|npu)\.""")
    bad = []
    for p in (ROOT / "contentv").rglob("*.py"):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, bad


def test_the_checker_finds_a_planted_violation(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text("import os\nfrom backends import build_backend\n\ndef f():\n    import torch_npu\n")
    found = imported_modules(planted)
    assert ("backends", 2, False) in found and ("torch_npu", 5, True) in found


def test_one_backend_interface_every_backend_has_and_the_library_keeps_to():
    """contentv.device.DeviceBackend is the one interface: each backend has every member, and the library (outside
    its command line) touches no other member of a backend object (`backend.X`, `self.backend.X`, `caps.X`)."""
    import backends
    from contentv.config import BackendConfig
    from contentv.device import MEMBERS
    from tests.virtual_backend import VirtualBackend

    classes = [backends.backend_class(name) for name in backends.BACKENDS] + [VirtualBackend]
    instance = ("device", "kernel_name")  # set by Backend.__init__ (a CPU backend is built below to check them)
    missing = [f"{c.__name__}.{m}" for c in classes for m in MEMBERS if not hasattr(c, m) and m not in instance]
    cpu = backends.build_backend(BackendConfig(name="cpu"))
    missing += [f"CPUBackend().{m}" for m in MEMBERS if not hasattr(cpu, m)]
    assert not missing, missing
    config_fields = {"name", "attention", "device_index", "options", "allow_tf32"}  # cfg.backend.<field>
    used = set()
    for p in library_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute):
                base = node.value
                owner = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
                if owner in ("backend", "caps") and not (isinstance(base, ast.Attribute) and base.value is None):
                    cfg_access = isinstance(base, ast.Attribute) and getattr(base.value, "id", "") in ("cfg", "c")
                    if not cfg_access:
                        used.add((p.relative_to(ROOT).as_posix(), node.attr))
    assert {"free_memory", "prepare", "is_out_of_memory", "attention_kernel"} <= {a for _, a in used}  # it sees them
    outside = sorted(f"{f}: .{a}" for f, a in used if a not in MEMBERS and a not in config_fields)
    assert not outside, outside
