"""The plan as a table: per strategy, predicted peak device memory (and per stage), host RAM, relative time."""

from __future__ import annotations

import dataclasses

from contentv.memory_policy import output_changes
from contentv.planner.strategies import MARGIN, STAGES, GiB, Plan


def format_plan(p: Plan) -> str:
    """The plan as a table: strategy, predicted peak device memory (and per stage), host RAM, relative time,
    whether it fits, and whether it changes the output."""
    s = p.sampling
    lines = [
        f"memory plan: {p.model}, {s.height}x{s.width}, {s.num_frames} frames, guidance {p.guidance}; "
        f"configs from {p.source}; no weights loaded",
        "weights GiB:     " + ", ".join(f"{n} {v / GiB:.2f}" for n, v in p.weights.items()),
        "activations GiB: " + ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in p.activations.items()),
        "",
    ]
    fits = "fits"
    if p.budget_bytes is not None:
        fits = f"fits {p.budget_bytes / GiB:.1f} GiB"
        if p.host_budget_bytes is not None:
            fits += f" / host {p.host_budget_bytes / GiB:.1f}"
    width = max([len("strategy"), *(len(x.name) for x in p.strategies)])
    header = (
        f"{'strategy':<{width}}  {'peak GiB':>8}  {'text':>6}  {'denoise':>7}  {'decode':>6}  "
        f"{'host GiB':>8}  {'host peak':>9}  {'rel. time':>9}  {'output':>7}  {fits}"
    )
    lines += [header, "-" * len(header)]
    for x in p.strategies:
        if x.error:
            lines.append(f"{x.name:<{width}}  unavailable: {x.error}")
            continue
        st = [x.stage_bytes[k] / GiB for k in STAGES]
        verdict = "-" if x.fits is None else ("yes" if x.fits else "no")
        output = "changes" if output_changes(dataclasses.replace(x.memory, vae_tiling=x.vae_tiling)) else "same"
        lines.append(
            f"{x.name:<{width}}  {x.device_bytes / GiB:8.2f}  {st[0]:6.2f}  {st[1]:7.2f}  {st[2]:6.2f}  "
            f"{x.host_bytes / GiB:8.2f}  {x.host_peak_bytes / GiB:9.2f}  {x.time:9.2f}  {output:>7}  {verdict}"
            + ("  <- chosen" if p.chosen is x else "")
        )
    lines += [
        "",
        "peak = max over stages (text encoding, denoising, decoding) of resident weights + activations; "
        f"fits = peak <= {1 - MARGIN:.0%} of the device budget and host peak <= the host budget.",
        "host GiB = RAM while generating (weights kept on the CPU, pinned copies, process); host peak includes "
        "loading. rel. time: published anchors (contentv/planner/strategies.py), 1.00 = all resident.",
        "output: 'changes' = quantization or VAE tiling, which change the frames; 'same' = identical to all resident "
        "(vae_tiling=null tiles only where the untiled decode wouldn't fit: the row shows what this budget gets).",
    ]
    if p.chosen is not None:
        lines.append(f"chosen: {p.chosen.name}")
    return "\n".join(lines)
