"""The sweep summary: summary.csv (every field), summary.md (the table people read) and summary.png (time and
peak memory against PSNR, each point labelled with what its job changed from the baseline)."""

from __future__ import annotations

import csv
import logging
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from contentv.sweep.fidelity import add_fidelity
from contentv.sweep.rows import STAGES, collect

if TYPE_CHECKING:  # matplotlib is optional and loads only to draw the chart
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
COLUMNS = (
    "job",
    "overrides",
    "status",
    "reused",
    "generate_s",
    "seconds_per_step",
    "peak_device_gib",
    "peak_host_rss_gib",
    "psnr_db",
    "ssim",
    "fidelity",
    *(f"{s}_s" for s in STAGES),
    "prompt",
    "seed",
    "height",
    "width",
    "num_frames",
    "video",
    "sidecar",
    "note",
    "error",
)
# (column, heading, format) of summary.md
TABLE = (
    ("job", "job", "{}"),
    ("overrides", "overrides", "{}"),
    ("status", "status", "{}"),
    ("load_s", "load (s)", "{:.2f}"),
    ("generate_s", "generate (s)", "{:.2f}"),
    ("seconds_per_step", "s/step", "{:.3f}"),
    ("peak_device_gib", "peak device (GiB)", "{:.3f}"),
    ("peak_host_rss_gib", "peak host RSS (GiB)", "{:.3f}"),
    ("psnr_db", "PSNR (dB)", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
)
FIDELITY_NOTE = (
    "PSNR and SSIM: each video's frames against the baseline job's video with the same prompt, seed, size and "
    "frame count (lossless uint8 copies, torchmetrics, data range 1, over all frames); identical = bit-identical "
    "frames (CSV: psnr_db=inf, ssim=1.0). generate = text encoding + denoising + decoding; load is paid by the "
    "first job of each (model, memory, speed-up) key."
)


@dataclass
class Summary:
    paths: dict[str, Path]
    rows: list[dict]
    jobs: int  # jobs in the sweep (or with a record, if the count is not known)
    failed: list[int] = field(default_factory=list)  # job numbers that failed or left no record

    def failure_line(self) -> str:
        """What a sweep with failed jobs says as it exits with status 1."""
        return f"sweep: {len(self.failed)} of {self.jobs} jobs failed (see {self.paths['md']})"


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or v == "":
        return ""
    if key == "psnr_db" and v == math.inf:
        return "identical"
    text = fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
    return text.replace("|", "\\|")


def _note(row: dict) -> str:
    parts = [row.get("fidelity"), "reused" if row.get("reused") == "yes" else "", row.get("note"), row.get("error")]
    return "; ".join(p for p in parts if p and p != "identical").replace("|", "\\|")


def label(row: dict, base: dict | None) -> str:
    """What the row's job changed from the baseline's overrides (never truncated: long labels wrap)."""
    if base is not None and row.get("job") == base.get("job"):
        return f"{row['job']}: baseline"
    base_list = (base or {}).get("override_list", [])
    changed = [o for o in row.get("override_list", []) if o not in base_list]
    return textwrap.fill(f"{row['job']}: " + (" ".join(changed) or "(same overrides)"), 44)


def _plain_chart(plt: ModuleType, done: list[dict], mem_key: str, mem_label: str, total: int) -> Figure:
    """Nothing comparable to a baseline: time against memory, as a plain speed sweep."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in done:
        if r.get(mem_key) is None or r.get("generate_s") is None:
            continue
        ax.scatter([r[mem_key]], [r["generate_s"]])
        ax.annotate(
            label(r, None), (r[mem_key], r["generate_s"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xlabel(mem_label)
    ax.set_ylabel("generate time (s)")
    ax.set_title(f"Sweep: time against peak memory ({len(done)} of {total} rows ok; no fidelity values)")
    ax.grid(alpha=0.3)
    return fig


def _fidelity_chart(plt: ModuleType, done: list[dict], mem_key: str, mem_label: str, baseline: int) -> Figure:
    """Two panels, generate time and peak memory against PSNR; each point labelled with its job's changes."""
    base = next((r for r in done if r["job"] == baseline and r.get("fidelity") == "baseline"), None)
    placed = [r for r in done if r.get("psnr_db") is not None]
    finite = [r["psnr_db"] for r in placed if r["psnr_db"] != math.inf]
    # bit-identical frames have no finite PSNR: they go on a marked line right of the others
    span = (max(finite) - min(finite)) if len(finite) > 1 else 10.0
    x_same = (max(finite) if finite else 0.0) + max(0.15 * span, 3.0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, ylabel in zip(axes, ("generate_s", mem_key), ("generate time (s)", mem_label), strict=True):
        for r in placed:
            if r.get(key) is None:
                continue
            x = x_same if r["psnr_db"] == math.inf else r["psnr_db"]
            ax.scatter([x], [r[key]], color="black" if r is base else None, zorder=3)
            ax.annotate(label(r, base), (x, r[key]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.axvline(x_same, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("PSNR against the baseline (dB); right = closer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.15)
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if finite and lo <= t <= max(finite)]
        ax.set_xticks([*ticks, x_same], [f"{t:g}" for t in ticks] + ["identical"])
        ax.set_xlim(lo, hi)
    missing = sorted({r["job"] for r in done if r.get("psnr_db") is None})
    title = f"Sweep: speed and memory against fidelity (baseline: job {baseline})"
    if missing:
        title += f"\nnot shown (no fidelity value): job {', '.join(map(str, missing))}"
    fig.suptitle(title, fontsize=10)
    return fig


def _chart(rows: list[dict], path: Path, baseline: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no summary.png (pip install '.[sweep]')")
        return False
    done = [r for r in rows if r["status"] == "ok"]
    device = any(r.get("peak_device_gib") is not None for r in done)
    mem_key = "peak_device_gib" if device else "peak_host_rss_gib"
    mem_label = "peak device memory (GiB)" if device else "peak host RSS (GiB)"
    if any(r.get("psnr_db") is not None for r in done):
        fig = _fidelity_chart(plt, done, mem_key, mem_label, baseline)
    else:
        fig = _plain_chart(plt, done, mem_key, mem_label, len(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _markdown(rows: list[dict], baseline: int, jobs: int, failed: list[int], reused: tuple[int, ...]) -> str:
    # the table shows what each job sets that not every job does; a line below lists the rest once
    lists = [r.get("override_list", []) for r in rows]
    common = [o for o in lists[0] if all(o in other for other in lists)] if lists else []
    shown = [{**r, "overrides": " ".join(o for o in r.get("override_list", []) if o not in common)} for r in rows]
    lines = ["| " + " | ".join([h for _, h, _ in TABLE] + ["note"]) + " |", "|" + "---|" * (len(TABLE) + 1)]
    lines += ["| " + " | ".join([_cell(r, k, fmt) for k, _, fmt in TABLE] + [_note(r)]) + " |" for r in shown]
    base = next((r for r in shown if r["job"] == baseline), None)
    counts = f"{jobs} jobs: {jobs - len(failed)} ok, {len(failed)} failed"
    counts += f" (job {', '.join(map(str, failed))})" if failed else ""
    counts += f"; {len(reused)} done in an earlier run and reused" if reused else ""
    notes = [
        f"Every job: {' '.join(common)}." if common else "",
        f"Baseline: job {baseline}"
        + (f" ({base['overrides'] or 'the common overrides'})." if base else " (no record)."),
        FIDELITY_NOTE,
        counts + ".",
    ]
    return "\n".join(lines) + "\n\n" + "\n\n".join(n for n in notes if n) + "\n"


def write_summary(sweep_dir: Path, baseline: int = 0, reused: tuple[int, ...] = (), jobs: int | None = None) -> Summary:
    """Collect every job's rows, add fidelity against job `baseline`, and write summary.csv, summary.md and
    summary.png. `reused`: jobs done in an earlier run (skipped this time); `jobs`: how many the sweep has (jobs
    without a record then count as failed)."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    add_fidelity(rows, baseline)
    for r in rows:
        r["reused"] = "yes" if r["job"] in reused else ""
    recorded = {r["job"] for r in rows}
    failed = {r["job"] for r in rows if r["status"] != "ok"} | (set(range(jobs)) - recorded if jobs else set())
    total = max(jobs or 0, len(recorded))
    out = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "png": sweep_dir / "summary.png"}
    with out["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    out["md"].write_text(_markdown(rows, baseline, total, sorted(failed), reused))
    if not _chart(rows, out["png"], baseline):
        out.pop("png")
    return Summary(paths=out, rows=rows, jobs=total, failed=sorted(failed))
