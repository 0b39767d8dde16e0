"""Rewrite tests/npu_schema/ops.yaml from a torch-npu wheel: the op-schema entries the NPU backend calls, verbatim.

    python tests/npu_schema/refresh.py 2.14.0 2.13.0     # excerpt from the first, the others checked identical
    python tests/npu_schema/refresh.py --wheel torch_npu-2.14.0-....whl

The wheel is fetched with `pip download --no-deps` and only read as a zip: never install torch-npu on a machine
without CANN (it breaks `import torch`). The schema is the codegen YAML torch_npu builds its bindings from.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

OPS = ("npu_fusion_attention", "npu_fused_infer_attention_score")  # what backends/npu.py calls
YAML_IN_WHEEL = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
EXCERPT = Path(__file__).resolve().parent / "ops.yaml"
# pip resolves the local platform first; elsewhere (macOS, another Python) ask for the Linux x86_64 cp311 wheel.
PLATFORM_ARGS = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp"]


def download(version: str, into: Path) -> Path:
    """pip download torch-npu==version (the wheel only, no dependencies, nothing installed)."""
    base = [sys.executable, "-m", "pip", "download", f"torch-npu=={version}", "--no-deps", "--only-binary=:all:"]
    for extra in ([], PLATFORM_ARGS):
        done = subprocess.run([*base, *extra, "-d", str(into)], capture_output=True, text=True)
        wheels = sorted(into.glob(f"torch_npu-{version}-*.whl"))
        if done.returncode == 0 and wheels:
            return wheels[0]
    raise SystemExit(f"pip download torch-npu=={version} failed:\n{done.stderr[-2000:]}")


def entries(text: str) -> list[tuple[str, list[str]]]:
    """(section, verbatim lines) of each top-level list item whose `func:` is one of OPS (no .out overloads)."""
    found, section, block = [], "", []

    def flush():
        func = next((m.group(1) for line in block if (m := re.match(r"^(?:- |  )func: ([\w.]+)\(", line))), None)
        if func in OPS:
            found.append((section, list(block)))
        block.clear()

    for line in text.splitlines():
        if re.match(r"^[A-Za-z_]\w*:", line):  # a section key such as `custom:`
            flush()
            section = line.split(":")[0]
        elif line.startswith("- "):
            flush()
            block.append(line)
        elif line.startswith("  ") and block:
            block.append(line)
        else:
            flush()
    flush()
    return found


def read_wheel(wheel: Path) -> tuple[str, list[tuple[str, list[str]]], str]:
    """(version, entries, sha256) of a torch-npu wheel."""
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as z:
        text = z.read(YAML_IN_WHEEL).decode()
    found = entries(text)
    # The verbatim slice must say exactly what the full file says about these ops.
    full = yaml.safe_load(text)
    wanted = [e["func"] for s in full.values() if isinstance(s, list) for e in s if _name(e) in OPS]
    sliced = [e["func"] for _, lines in found for e in yaml.safe_load("\n".join(lines))]
    if sorted(wanted) != sorted(sliced) or {_name(f) for f in sliced} != set(OPS):
        raise SystemExit(f"{wheel.name}: could not cut the entries of {OPS} out of {YAML_IN_WHEEL}")
    return version, found, hashlib.sha256(wheel.read_bytes()).hexdigest()


def _name(entry) -> str:
    func = entry["func"] if isinstance(entry, dict) else entry
    return func.split("(")[0]


def render(wheel: Path, version: str, found, sha: str, same_in: list[tuple[str, str, str]]) -> str:
    lines = [
        "# Excerpt of torch_npu's op schema: the entries of the ops backends/npu.py calls, copied verbatim.",
        f"# wheel:  {wheel.name} (torch-npu {version}, from PyPI via pip download --no-deps)",
        f"# path:   {YAML_IN_WHEEL}",
        f"# sha256: {sha}",
        f"# date:   {datetime.date.today().isoformat()}",
    ]
    lines += [f"# identical in {name} (torch-npu {v}), sha256 {s}" for name, v, s in same_in]
    lines += [
        "# Regenerate: python tests/npu_schema/refresh.py <version> [<other versions to compare>]",
        "# tests/npu_standin.py derives the ops' signatures from the `func:` strings (ATen schema syntax).",
    ]
    section = None
    for sec, block in found:
        if sec != section:
            lines.append(f"{sec}:")
            section = sec
        lines += block
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="*", default=["2.14.0", "2.13.0"], help="torch-npu versions; first wins")
    parser.add_argument("--wheel", type=Path, action="append", default=[], help="use these wheels instead")
    parser.add_argument("--out", type=Path, default=EXCERPT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = args.wheel or [download(v, Path(tmp)) for v in args.versions]
        (version, found, sha), *others = [read_wheel(w) for w in wheels]
        same_in = []
        for wheel, (v, other, s) in zip(wheels[1:], others, strict=True):
            if other != found:
                raise SystemExit(f"{wheel.name} differs from {wheels[0].name} for {OPS}: refresh from one of them")
            same_in.append((wheel.name, v, s))
        args.out.write_text(render(wheels[0], version, found, sha, same_in))
    print(f"wrote {args.out} from {wheels[0].name}")


if __name__ == "__main__":
    main()
