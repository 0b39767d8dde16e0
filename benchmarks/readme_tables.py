"""Every figure table in README.md, generated: the memory planner's predictions per model and backend, the CPU
benchmark results, the FirstBlockCache results and the GPU figures (benchmarks/gpu_tables.py).

    python benchmarks/readme_tables.py            # print every block
    python benchmarks/readme_tables.py --write    # write them between the README's markers
    python benchmarks/readme_tables.py --check    # exit 1 (and say which) if the README's blocks differ

The memory tables are `python demo.py dry_run=true model=M backend=B memory.budget_gb=N`'s figures: the planner
(contentv.planner, on the meta device: no weights, no device) with the presets composed as demo.py composes
them (conf/memory/*.yaml), planned for the named backend's capabilities on any machine. Each preset is planned at
its card size (low_vram_24g at 24 GiB, ...), where `vae_tiling: null` is resolved; the others without a budget.
The CPU and speed-up tables are benchmarks/results/cpu_reference.jsonl and speedups.jsonl as recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_tables, readme_blocks  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/readme_tables.py --write"
# (model preset, backend) for the memory tables, in README order.
MEMORY_RUNS = (("contentv_8b", "cuda"), ("contentv_8b", "npu"), ("cogvideox_5b", "cuda"))
AUTO_BUDGETS_GIB = (24, 16, 12, 8)
NAMES = {"contentv_8b": "ContentV-8B", "cogvideox_5b": "CogVideoX-5B", "cogvideox_2b": "CogVideoX-2B"}
GiB = 2**30


def card_gib(preset: str) -> int | None:
    """The card size a preset is meant for, from its name: low_vram_16g -> 16; None for the others."""
    found = re.search(r"(\d+)g$", preset)
    return int(found.group(1)) if found else None


# ------------------------------------------------------------------------------------------ memory (planner)


# Fields described in words by turns_on(); any other field that differs from MemoryConfig's default shows as key=value.
DESCRIBED = {
    "name", "budget_gb", "check_fit", "model_cpu_offload", "sequential_cpu_offload", "group_offload",
    "group_offload_blocks", "group_offload_stream", "text_encoders", "guidance_mode", "vae_slicing", "vae_tiling",
    "attention_slicing", "quantization", "quantize",
}  # fmt: skip


def _placement(memory, caps) -> list[str]:
    if memory.model_cpu_offload:
        return ["model CPU offload (one whole component on the device at a time)"]
    if memory.sequential_cpu_offload:
        return ["sequential CPU offload (layer by layer)"]
    if not memory.group_offload:
        return []
    blocks = memory.group_offload_blocks
    text = f"transformer group offload ({blocks} block{'s' if blocks != 1 else ''} at a time"
    if memory.group_offload_stream:
        text += (
            ", the next prefetched on a side stream from pinned memory"
            if caps.supports_offload_streams
            else "; no offload streams on this backend: synchronous copies"
        )
    return [text + ")"]


def _text_encoders(memory) -> list[str]:
    from contentv.memory_policy import text_encoder_mode

    mode, explicit = text_encoder_mode(memory), memory.text_encoders != "auto"
    if mode == "offload" and not (explicit or memory.group_offload):
        return []  # model/sequential offload hooks place them: said by the placement
    words = {
        "release": "text encoders on the device only while encoding",
        "offload": "text encoders offloaded layer by layer",
        "cpu": "text encoders run on the CPU",
        "device": "text encoders resident" if explicit else "",
    }
    return [words[mode]] if words.get(mode) else []


def turns_on(memory, caps, tiled: bool | None, budget: int | None) -> str:
    """What a preset turns on, from its fields (the composed YAML): every field that differs from MemoryConfig's
    defaults, in words; `tiled`: what vae_tiling=null resolved to at `budget`."""
    from contentv.config import MemoryConfig

    base = MemoryConfig()
    out = _placement(memory, caps) + _text_encoders(memory)
    if memory.guidance_mode != base.guidance_mode:
        out.append(f"{memory.guidance_mode} guidance")
    if memory.vae_slicing:
        out.append("VAE slicing")
    if memory.vae_tiling:
        out.append("VAE tiling")
    elif memory.vae_tiling is None:
        where = f"at {budget / GiB:.0f} GiB" if budget is not None else "without a budget"
        out.append(f"VAE tiling where the untiled decode wouldn't fit ({where}: {'tiled' if tiled else 'untiled'})")
    if memory.attention_slicing:
        out.append(f"attention slicing ({memory.attention_slicing}-token chunks)")
    if memory.quantization != "none":
        out.append(f"{memory.quantization} on {', '.join(memory.quantize or ())}")
    for f in dataclasses.fields(MemoryConfig):  # a field added later still shows
        if f.name not in DESCRIBED and getattr(memory, f.name) != getattr(base, f.name):
            out.append(f"{f.name}={getattr(memory, f.name)}")
    return ", ".join(out) or "everything resident"


def memory_table(model: str, backend: str, presets: dict) -> str:
    """One model on one backend: every preset's predicted peak device memory, host RAM, time and output, and what
    memory=auto chooses at a few budgets."""
    import backends
    import demo
    from contentv.errors import ConfigError
    from contentv.memory_policy import output_changes, with_defaults
    from contentv.planner import MARGIN, plan
    from contentv.registry import get_spec

    cfg = demo.load_config([f"model={model}", f"backend={backend}", "memory=none", "dry_run=true"])
    caps = backends.backend_class(backend).capabilities()
    spec = get_spec(cfg.model.family)
    plans = {}
    rows = []
    for name in presets:
        if name == "auto":
            continue
        size = card_gib(name)
        budget = None if size is None else size * GiB
        if budget not in plans:
            plans[budget] = plan(cfg, presets, caps, budget_bytes=budget, choose=False)
        rows.append((next(s for s in plans[budget].strategies if s.name == name), budget))
    p = plans[None] if None in plans else next(iter(plans.values()))
    s = p.sampling
    rows.sort(key=lambda r: (r[0].time, r[0].device_bytes, r[0].name))
    lines = [
        f"**{NAMES.get(model, model)}, {s.height}×{s.width}, {s.num_frames} frames, {cfg.model.dtype}, backend "
        f"`{backend}`** (`python demo.py dry_run=true model={model} backend={backend} memory.budget_gb=N`). "
        "Weights GiB: " + ", ".join(f"{n} {v / GiB:.2f}" for n, v in p.weights.items()) + ".",
        "",
        "| preset | turns on | peak device GiB | host GiB: generating / with loading | time × `none` | output vs `none` |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for x, budget in rows:
        memory = with_defaults(x.memory, spec.quantize_default)  # quantize: null -> the family's components
        if x.error:
            lines.append(f"| `{x.name}` | {turns_on(memory, caps, None, budget)} | unavailable: {x.error} | | | |")
            continue
        changes = output_changes(dataclasses.replace(memory, vae_tiling=x.vae_tiling))
        output = "same" if not changes else "changes: " + "; ".join(c.split(" (")[0] for c in changes)
        lines.append(
            f"| `{x.name}` | {turns_on(memory, caps, x.vae_tiling, budget)} | {x.device_bytes / GiB:.2f} | "
            f"{x.host_bytes / GiB:.2f} / {x.host_peak_bytes / GiB:.2f} | {x.time:.2f} | {output} |"
        )
    runnable = [x for x, _ in rows if not x.error]
    least = min(runnable, key=lambda x: x.device_bytes)
    choices = []
    for gib in AUTO_BUDGETS_GIB:
        try:
            chosen = plan(cfg, presets, caps, budget_bytes=gib * GiB).chosen.name
            choices.append(f"{gib} GiB → `{chosen}`")
        except ConfigError:
            choices.append(f"{gib} GiB → nothing fits")
    lines += [
        "",
        f"Least peak device memory: `{least.name}`. `memory=auto` (`memory.budget_gb=N`, or the free device memory) "
        f"chooses the fastest preset whose peak is at most {1 - MARGIN:.0%} of the budget: " + ", ".join(choices) + ".",
        "",
    ]
    return "\n".join(lines)


def memory_block() -> str:
    import demo

    presets = demo.load_presets(("memory",)).memories
    return "\n".join(memory_table(model, backend, presets) for model, backend in MEMORY_RUNS)


# ------------------------------------------------------------------------------------------ recorded results


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _runs(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        runs.setdefault((r["date"], r["size"]), []).append(r)
    return runs


def cpu_block(path: Path = RESULTS / "cpu_reference.jsonl") -> str:
    """benchmarks/cpu_reference.py's runs: each method's total time against the reference algorithm's."""
    source = (
        "Recorded by `python benchmarks/cpu_reference.py` in `benchmarks/results/cpu_reference.jsonl` (a small "
        "random-weight ContentV; ratios of total time, the median over repeats and, in brackets, the minimum):"
    )
    table = []
    for (date, size), rows in _runs(read_jsonl(path)).items():
        by = {r["method"]: r for r in rows}

        def ratio(method: str, by: dict = by) -> str:
            r = by.get(method)
            return "-" if r is None else f"{r['ratio_vs_reference']:.3f} ({r['ratio_min_vs_reference']:.3f})"

        reference = str(by.get("reference", {}).get("total_s_median", "-"))
        first = rows[0]
        table.append(
            [_when(date), first["device"], size, str(first["repeats"]), reference, ratio("runtime"), ratio("batched")]
        )
    header = ["run", "device", "size, steps", "repeats", "reference s (median)", "runtime ÷ reference"]
    header.append("batched guidance ÷ reference")
    return recorded_table(source, header, ["---", "---", "---", "---:", "---:", "---:", "---:"], table)


def speedups_block(path: Path = RESULTS / "speedups.jsonl") -> str:
    """benchmarks/speedups.py's runs: each setting's denoising time and PSNR against the plain run."""
    source = (
        "Recorded by `python benchmarks/speedups.py` in `benchmarks/results/speedups.jsonl` (a small random-weight "
        "ContentV on the CPU; denoising time, median over repeats; PSNR of the frames against the plain run's):"
    )
    table = []
    for (date, size), rows in _runs(read_jsonl(path)).items():
        for r in rows:
            psnr = r["psnr_db_vs_plain"]
            shown = "identical" if psnr is None or math.isinf(psnr) else f"{psnr:.1f}"
            speed = [f"{r['denoising_s_median']:.3f}", f"{r['speedup_vs_plain']:.2f}×"]
            table.append([_when(date), size, r["setting"], *speed, shown])
    header = ["run", "size, steps", "setting", "denoising s", "speed-up", "PSNR dB vs plain"]
    return recorded_table(source, header, ["---", "---", "---", "---:", "---:", "---:"], table)


def _when(date: str) -> str:
    """A recorded ISO time as the tables show it: to the minute."""
    return date[:16].replace("T", " ")


def recorded_table(source: str, header: list[str], align: list[str], rows: list[list[str]]) -> str:
    """A block of recorded figures: where they come from, then the table."""
    lines = [source, "", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def startup_block(path: Path = RESULTS / "startup.jsonl") -> str:
    """benchmarks/startup.py's latest run: wall time per command and checkout, and the tiny run's start-up share."""
    rows = read_jsonl(path) if path.exists() else []
    latest = [r for r in rows if r["time"] == rows[-1]["time"] and r["command"] != "import_breakdown"] if rows else []
    split = [r for r in rows if r["time"] == rows[-1]["time"] and r["command"] == "import_breakdown"] if rows else []
    source = (
        "Recorded by `python benchmarks/startup.py --compare <older checkout>` in `benchmarks/results/startup.jsonl` "
        "(fresh processes, interleaved; wall seconds, median and fastest; start-up share = the part of a tiny run "
        "outside text encoding, denoising, decoding and writing):"
    )
    table = [
        [
            r["commit"][:8],
            f"`{' '.join(r['args'])}`",
            f"{r['median_s']:.2f}",
            f"{r['fastest_s']:.2f}",
            ",".join(map(str, r["exit_status"])),
            "-" if r.get("startup_share_median") is None else f"{r['startup_share_median']:.0%}",
        ]
        for r in latest
    ]
    header = ["commit", "command", "median s", "fastest s", "exit", "start-up share"]
    text = recorded_table(source, header, ["---", "---", "---:", "---:", "---:", "---:"], table)
    for r in split:  # where a tiny run's import time goes (python -X importtime, self times by package)
        top = ", ".join(f"{k} {v:.2f} s" for k, v in r["top_s"].items())
        text += (
            f"\nImports of one tiny run at {r['commit'][:8]}: {r['total_s']:.2f} s in all, of which this runtime's own "
            f"modules {r['ours_s']:.2f} s ({r['ours_s'] / r['total_s']:.0%}); the largest: {top}.\n"
        )
    return text


def parity_block(path: Path = RESULTS / "reference_parity.jsonl") -> str:
    """benchmarks/reference_parity.py's latest run: max |difference| from the reference code per guidance mode."""
    rows = read_jsonl(path) if path.exists() else []
    source = (
        "Recorded by `python benchmarks/reference_parity.py --reference <ContentV checkout>` in "
        "`benchmarks/results/reference_parity.jsonl` (latest run):"
    )
    table = [
        [
            _when(r["date"]),
            r["reference_commit"][:7],
            r["size"],
            mode,
            f"{d['latents_max_abs']:.2g}",
            f"{d['frames_max_abs']:.2g}",
            f"{'pass' if r['passed'] else 'FAIL'} (<= 1e-4)",
        ]
        for r in rows[-1:]
        for mode, d in r["modes"].items()
    ]
    header = [
        "run",
        "reference commit",
        "size",
        "guidance mode",
        "latents max \\|Δ\\|",
        "frames max \\|Δ\\|",
        "verdict",
    ]
    return recorded_table(source, header, ["---", "---", "---", "---", "---:", "---:", "---"], table)


def serve_block(path: Path = RESULTS / "serve_load.jsonl") -> str:
    """benchmarks/serve_load.py's latest run: admission latency, throughput, exactly-once, warm against fresh."""
    rows = read_jsonl(path) if path.exists() else []
    latest = [r for r in rows if r["time"] == rows[-1]["time"]] if rows else []
    source = (
        "Recorded by `python benchmarks/serve_load.py` in `benchmarks/results/serve_load.jsonl` (latest run; "
        "127.0.0.1, tiny_contentv 48x32, 5 frames, 1 step, CPU workers):"
    )
    load = [r for r in latest if r["scenario"] in ("steady", "worker_killed")]
    table = [
        [
            _when(r["time"]),
            r["commit"][:8],
            r["scenario"].replace("_", " "),
            f"{r['workers']} on {r['cpu_count']} cores",
            f"{r['clients']} x {r['jobs']}",
            f"{r['admission_p50_ms']:.0f} / {r['admission_p99_ms']:.0f}",
            f"{r['jobs_per_min']:.0f}",
            f"{r['completed']} completed, {r['failed']} failed"
            + (f" ({', '.join(r['failed_codes'])})" if r["failed"] else ""),
            "yes" if r["exactly_once"] else "NO",
        ]
        for r in load
    ]
    header = ["run", "commit", "scenario", "workers", "clients x jobs", "admission p50 / p99 ms", "jobs/min"]
    header += ["outcome", "exactly once"]
    text = recorded_table(source, header, ["---", "---", "---", "---", "---:", "---:", "---:", "---", "---"], table)
    for r in latest:
        if r["scenario"] == "warm_vs_fresh":
            text += (
                f"\nOne tiny job through the idle server (submit to completed) took {r['warm_s']:.2f} s; the same job "
                f"as a fresh command-line process {r['fresh_s']:.2f} s: {r['ratio']:.1f}x (medians of {r['repeats']}).\n"
            )
    return text


def limits_block() -> str:
    """The hard limits every run is checked against (contentv/validation.py), whatever the memory."""
    from contentv import prompt_file as pf
    from contentv import validation as v
    from contentv.config import SamplingConfig

    rows = [
        (
            "`sampling.height`, `sampling.width`",
            f"16 .. {v.MAX_SIDE} (the H.264 encoder's limit), and the model's multiple",
        ),
        ("`sampling.num_frames`", f"1 .. {v.MAX_FRAMES}, and the model's form (4k+1, 8k+1)"),
        ("`sampling.num_inference_steps`", f"1 .. {v.MAX_STEPS} (schedulers are trained on 1000 timesteps)"),
        ("`sampling.fps`", f"1 .. {v.MAX_FPS}"),
        ("`sampling.guidance_scale`", f"a finite number in 0 .. {v.MAX_GUIDANCE:g} (<= 1 disables guidance)"),
        ("`sampling.seed`", f"an integer in {v.SEED_RANGE[0]} .. {v.SEED_RANGE[1]} (the generator's range)"),
        (
            "`sampling.prompt`, `negative_prompt`, prompt files",
            f"UTF-8 text, no NUL or other control characters (newlines, tabs allowed), at most {v.MAX_PROMPT_CHARS} characters",
        ),
        (
            "`sampling.prompt_file`",
            f"at most {pf.MAX_BYTES // 2**20} MiB (checked before reading), one prompt per line (split at \\n only), "
            f"at most `sampling.max_prompts` prompts (default {SamplingConfig().max_prompts}); a bad line is named by number",
        ),
        ("`output.name`", f"a file name: no separators, not `.`/`..`, at most {v.MAX_STEM_BYTES} bytes"),
    ]
    lines = ["| option | allowed |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the README


BLOCKS = {
    "memory-tables": memory_block,
    "cpu-figures": cpu_block,
    "speedup-figures": speedups_block,
    "startup-figures": startup_block,
    "limits": limits_block,
    "parity-figures": parity_block,
    "serve-figures": serve_block,
}


def blocks() -> dict[tuple[str, str], str]:
    """(begin marker, end marker) -> content, for every generated block of the README."""
    out = {readme_blocks.markers(name, COMMAND): make() for name, make in BLOCKS.items()}
    out[(gpu_tables.BEGIN, gpu_tables.END)] = gpu_tables.readme_block()
    return out


def differences(readme: Path = readme_blocks.README) -> list[str]:
    """The begin markers of the README's blocks that differ from what this script generates."""
    text = readme.read_text()
    return [
        begin for (begin, end), content in blocks().items() if readme_blocks.read_block(text, begin, end) != content
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write every block between the README's markers")
    group.add_argument("--check", action="store_true", help="exit 1 if a README block differs from what is generated")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)  # the planner's imports (torchao, diffusers) warn on a CPU machine
    if args.write:
        print("README updated" if readme_blocks.write_blocks(blocks()) else "README already up to date")
        return 0
    if args.check:
        stale = differences()
        for begin in stale:
            print(f"README.md: out of date: {begin}", file=sys.stderr)
        if stale:
            print(f"run `{COMMAND}`", file=sys.stderr)
        return 1 if stale else 0
    for (begin, end), content in blocks().items():
        print(f"{begin}\n{content}{end}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
