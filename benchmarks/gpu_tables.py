"""Tables from the GPU benchmark's results (benchmarks/gpu_presets.py rows), and the README's GPU figures.

The README's GPU tables are generated from `benchmarks/results/gpu_*.jsonl`, never written by hand:

    python benchmarks/gpu_tables.py                     # terminal table of the latest run per device
    python benchmarks/gpu_tables.py --readme            # the README block (Markdown), printed
    python benchmarks/gpu_tables.py --write-readme      # ... written between the README's markers
    python benchmarks/gpu_tables.py --summary OUT       # gpu_check.sh's summary: steps, tests, results, targets

Only the standard library: it runs before and after the heavy steps in a second.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import readme_blocks  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = readme_blocks.markers("gpu-tables", "python benchmarks/gpu_tables.py --write-readme")
GiB = 2**30

# Dense bf16 tensor-core TFLOP/s by the vendors' datasheets (SXM unless named); first match wins.
SPEC_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# The project's performance targets, stated for full-size ContentV-8B at 432x768, 125 frames, bf16.
TARGET_RUN = ("contentv_8b", "432x768x125")
TARGETS = {"low_vram_24g": (22.0, 1.10), "low_vram_16g": (15.0, 1.30), "low_vram_8g": (7.5, 1.60)}
MIN_FRACTION_OF_SPEC = 0.50
PLANNER_TOLERANCE = 0.10
NAMES = {"contentv_8b": "ContentV-8B", "cogvideox_5b": "CogVideoX-5B"}


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200' (the results file's name)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def spec_tflops(device: str, backend: str = "cuda") -> float | None:
    """The device's dense bf16 spec in TFLOP/s, where known (None on the CPU and unknown GPUs)."""
    if backend != "cuda":
        return None
    return next((v for key, v in SPEC_TFLOPS if key.lower() in device.lower()), None)


# ------------------------------------------------------------------------------------------ reading


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a killed process
                continue
    return rows


def video_seconds(r: dict, decode_s: float | None) -> float | None:
    """A 50-step video: text encoding, the first step (with its one-time costs, e.g. the transformer's move
    under model offload), 49 steps at s/step, and the decode."""
    if decode_s is None:
        return None
    first = (r.get("step_seconds") or [r["seconds_per_step"]])[0]
    return round(r["text_encoding_s"] + first + 49 * r["seconds_per_step"] + decode_s, 2)


def latest(rows: list[dict]) -> list[dict]:
    """Per device, model and size, the latest run (ratios never mix runs); one row per preset: its last, most
    complete one."""
    runs: dict[tuple, str] = {}
    for r in rows:
        key = (r["device"], r["model"], r["size"])
        runs[key] = max(runs.get(key, ""), r["run_id"])
    last: dict[tuple, dict] = {}
    for r in rows:
        if r["run_id"] == runs[(r["device"], r["model"], r["size"])]:
            last[(r["device"], r["model"], r["size"], r["preset"])] = r
    return derive(list(last.values()))


def derive(rows: list[dict]) -> list[dict]:
    """Within each (device, run, model, size): ratios against `none`, and the 50-step projection of presets whose
    decode was not run, with the decode time of the preset named in `decode_from`."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["run_id"], r["model"], r["size"]), {})[r["preset"]] = r
    for group in groups.values():
        for r in group.values():
            if r.get("status") != "ok":
                continue
            src = group.get(r.get("decode_from") or "")
            decode_s = r.get("decoding_s")
            if decode_s is None and src is not None and src.get("decoding_s") is not None:
                decode_s = src["decoding_s"]
                r["decode"] = f"from {src['preset']}"
            r["projected_50_steps_s"] = video_seconds(r, decode_s)
        base = group.get("none") if group.get("none", {}).get("status") == "ok" else None
        for r in group.values():
            if r.get("status") == "ok" and base is not None:
                r["ratio_vs_none"] = round(r["seconds_per_step"] / base["seconds_per_step"], 4)
                both = r["projected_50_steps_s"] and base["projected_50_steps_s"]
                r["ratio_50_steps_vs_none"] = (
                    round(r["projected_50_steps_s"] / base["projected_50_steps_s"], 4) if both else None
                )
    return rows


# ------------------------------------------------------------------------------------------ targets


def targets(r: dict) -> list[tuple[str, bool]]:
    """(what, met) for each target that applies to this row."""
    out: list[tuple[str, bool]] = []
    if r.get("status") != "ok":
        return out
    if r.get("device_ratio") is not None:
        out.append((f"planner {r['device_ratio']:.2f}x", abs(r["device_ratio"] - 1) <= PLANNER_TOLERANCE))
    if (r["model"], r["size"]) != TARGET_RUN:
        return out
    if r["preset"] == "none" and r.get("fraction_of_spec") is not None:
        out.append((f"{r['fraction_of_spec']:.0%} of spec >= 50%", r["fraction_of_spec"] >= MIN_FRACTION_OF_SPEC))
    if r["preset"] in TARGETS:
        limit, slower = TARGETS[r["preset"]]
        peak = r.get("peak_device_reserved_bytes") or r.get("peak_device_bytes")
        if peak is not None:
            out.append((f"peak {peak / GiB:.1f} <= {limit} GiB", peak / GiB <= limit))
        ratio = r.get("ratio_50_steps_vs_none") or r.get("ratio_vs_none")
        if ratio is not None:
            out.append((f"time {ratio:.3f}x <= {slower:.2f}x", ratio <= slower))
    return out


def target_text(r: dict) -> str:
    found = targets(r)
    missed = [w for w, ok in found if not ok]
    if not found:
        return ""
    return ("MISSED: " + "; ".join(missed)) if missed else "met: " + "; ".join(w for w, _ in found)


# ------------------------------------------------------------------------------------------ formatting


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GiB:.2f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _status(r: dict) -> str:
    if r.get("status") == "started":
        return "did not finish (killed by its time box, or crashed: see gpu_check.log)"
    return f"failed: {r.get('error', '?')}"


def format_terminal(rows: list[dict]) -> str:
    """A fixed-width table, one line per row."""
    head = (
        f"{'model':18s} {'size':12s} {'preset':14s} {'s/step':>7s} {'x none':>6s} {'50-step s':>9s} {'TFLOP/s':>8s} "
        f"{'%spec':>5s} {'peak GiB':>8s} {'reserved':>8s} {'planned':>7s} {'ratio':>5s} {'host GiB':>8s} "
        f"{'planned':>7s} {'ratio':>5s}  decode / targets"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        name = f"{r['model'][:18]:18s} {r['size']:12s} {r['preset'][:14]:14s}"
        if r.get("status") != "ok":
            lines.append(f"{name} {_status(r)}")
            continue
        frac = r.get("fraction_of_spec")
        lines.append(
            f"{name} {r['seconds_per_step']:7.3f} {_num(r.get('ratio_vs_none')):>6s} "
            f"{_num(r.get('projected_50_steps_s'), '.1f'):>9s} {r['tflops']:8.1f} "
            f"{'-' if frac is None else f'{frac:.0%}':>5s} {_gib(r.get('peak_device_bytes')):>8s} "
            f"{_gib(r.get('peak_device_reserved_bytes')):>8s} {_gib(r.get('predicted_peak_device_bytes')):>7s} "
            f"{_num(r.get('device_ratio')):>5s} {_gib(r.get('peak_host_rss_bytes')):>8s} "
            f"{_gib(r.get('predicted_host_bytes')):>7s} {_num(r.get('host_ratio')):>5s}  "
            f"{r.get('decode', '')}; {target_text(r) or '-'}"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """One Markdown table per (device, run, model, size)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["run_id"], r["model"], r["size"]), []).append(r)
    parts = []
    for (device, run_id, model, size), group in groups.items():
        first = group[0]
        v = first.get("versions", {})
        h, w, f = size.split("x")
        parts.append(
            f"**{NAMES.get(model, model)}, {h}×{w}, {f} frames, {first.get('dtype')}, random weights** on "
            f"{device} (run {run_id}; torch {v.get('torch', '?')}, diffusers {v.get('diffusers', '?')}; "
            f"{first.get('warmup_steps')} warm-up + {first.get('timed_steps')} timed steps per preset)\n"
        )
        parts.append(
            "| preset | s/step | × none | 50-step video, s (× none) | TFLOP/s (% of spec) | peak GiB: allocated "
            "/ reserved | planned GiB (measured ÷ planned) | host GiB (planned) | decode | targets |"
        )
        parts.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for r in group:
            if r.get("status") != "ok":
                parts.append(f"| {r['preset']} | {_status(r)} | | | | | | | | |")
                continue
            frac = r.get("fraction_of_spec")
            video = _num(r.get("projected_50_steps_s"), ".0f")
            if r.get("ratio_50_steps_vs_none") is not None:
                video += f" ({r['ratio_50_steps_vs_none']:.2f})"
            parts.append(
                f"| {r['preset']} | {r['seconds_per_step']:.2f} | {_num(r.get('ratio_vs_none'))} | {video} | "
                f"{r['tflops']:.0f}{'' if frac is None else f' ({frac:.0%})'} | "
                f"{_gib(r.get('peak_device_bytes'))} / {_gib(r.get('peak_device_reserved_bytes'))} | "
                f"{_gib(r.get('predicted_peak_device_bytes'))} ({_num(r.get('device_ratio'))}) | "
                f"{_gib(r.get('peak_host_rss_bytes'))} ({_gib(r.get('predicted_host_bytes'))}) | "
                f"{r.get('decode', '')} | {target_text(r)} |"
            )
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def readme_block(paths: list[Path] | None = None) -> str:
    """What goes between the README's markers: the tables, or 'not measured yet'."""
    paths = sorted(RESULTS.glob("gpu_*.jsonl")) if paths is None else paths
    rows = latest(read_rows(paths))
    if not rows:
        return (
            "GPU figures: **not measured yet.** No GPU has run `benchmarks/gpu_check.sh` so far; its tables will appear\n"
            "here, generated from `benchmarks/results/gpu_<device>.jsonl`.\n"
        )
    return markdown(rows)


def write_readme(block: str, readme: Path = README) -> bool:
    """Replace the README's block; True if it changed."""
    return readme_blocks.write_blocks({(BEGIN, END): block}, readme)


def current_readme_block(readme: Path = README) -> str:
    return readme_blocks.current_block(BEGIN, END, readme)


# ------------------------------------------------------------------------------------------ gpu_check summary


def junit_summary(path: Path) -> str:
    """'N passed, N failed, N skipped' (+ the failing tests) from a pytest junit XML file."""
    if not path.exists():
        return "no junit file"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return f"unreadable junit file ({exc})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{c.get('classname', '').rpartition('.')[2]}::{c.get('name')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    text = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    return text + (f" (failing: {', '.join(failed)})" if failed else "")


def summary(out: Path) -> str:
    """The gpu_check summary: each step's status, the cuda tests, the results table and the targets."""
    lines = [
        "# GPU check summary",
        "",
        "## Steps",
        "",
        "| step | status | seconds | note |",
        "| --- | --- | ---: | --- |",
    ]
    steps = read_rows([out / "steps.jsonl"]) if (out / "steps.jsonl").exists() else []
    for s in steps:
        note = s.get("note", "")
        if s["step"] == "cuda_tests" and s["status"] in ("ok", "failed", "timeout"):
            note = f"{note}; {junit_summary(out / 'cuda_tests.xml')}".lstrip("; ")
        lines.append(f"| {s['step']} | {s['status']} | {s.get('seconds', '')} | {note} |")
    rows = latest(read_rows(sorted(out.glob("gpu_*.jsonl"))))
    lines += ["", "## Results", ""]
    lines += [markdown(rows) if rows else "no benchmark rows were written"]
    lines += ["", "## Targets", ""]
    found = [(r, w, ok) for r in rows for w, ok in targets(r)]
    lines += [f"- {'met   ' if ok else 'MISSED'} {r['model']} {r['preset']}: {w}" for r, w, ok in found]
    if not found:
        lines.append(
            "- none apply: the targets are for full-size ContentV-8B at 432x768x125 on a GPU (and the planner's"
            " device figure), and no such row succeeded"
        )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text + ("\n" + format_terminal(rows) + "\n" if rows else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="results files (default benchmarks/results/gpu_*.jsonl)")
    parser.add_argument("--readme", action="store_true", help="print the README block")
    parser.add_argument("--write-readme", action="store_true", help="write the README block between its markers")
    parser.add_argument("--summary", type=Path, metavar="OUT", help="gpu_check.sh's summary of the folder OUT")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    paths = args.files or sorted(RESULTS.glob("gpu_*.jsonl"))
    if args.readme or args.write_readme:
        block = readme_block(paths)
        if args.write_readme:
            print("README updated" if write_readme(block) else "README already up to date")
        else:
            print(block, end="")
        return 0
    rows = latest(read_rows(paths))
    print(format_terminal(rows) if rows else "no GPU results yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
