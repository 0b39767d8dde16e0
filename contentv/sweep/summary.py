"""The sweep summary: summary.csv (every field), summary.md (the table people read) and summary.png (time and
peak memory against PSNR, each point labelled with what its job changed from the baseline).

Each file is written atomically and never through a link (contentv.atomic). `end_sweep` is what a launcher
calls last: it never raises, and its status is 1 when a job failed or the summary could not be written."""

from __future__ import annotations

import csv
import io
import logging
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from contentv.errors import SweepError, first_line
from contentv.extras import install_hint
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
        where = f"see {self.paths['md']}" if "md" in self.paths else "the summary was not written"
        return f"sweep: {len(self.failed)} of {self.jobs} jobs failed ({where})"


@dataclass
class SweepEnd:
    """How a sweep ends (`end_sweep`): the exit status and the lines to print."""

    status: int  # 0: every job ok and the summary written; 1 otherwise
    out: list[str]  # for stdout: where the summary is
    err: list[str]  # for stderr: one line per failure
    summary: Summary | None = None


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
    from contentv import atomic

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no summary.png (%s)", install_hint("sweep"))
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
    png = io.BytesIO()  # rendered in memory: matplotlib would open `path` itself, following a link there
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic.write_bytes(path, png.getvalue())
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


def summarize(sweep_dir: Path, baseline: int = 0, reused: tuple[int, ...] = (), jobs: int | None = None) -> Summary:
    """The summary's rows and counts, read from the job records (nothing written). With `jobs`, exactly jobs
    0..jobs-1: rows of jobs an earlier, larger run of the sweep left are not this sweep's."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir, jobs)
    add_fidelity(rows, baseline)
    for r in rows:
        r["reused"] = "yes" if r["job"] in reused else ""
    recorded = {r["job"] for r in rows}
    failed = {r["job"] for r in rows if r["status"] != "ok"} | (set(range(jobs)) - recorded if jobs else set())
    total = jobs if jobs is not None else len(recorded)
    return Summary(paths={}, rows=rows, jobs=total, failed=sorted(failed))


def write_summary(sweep_dir: Path, baseline: int = 0, reused: tuple[int, ...] = (), jobs: int | None = None) -> Summary:
    """Collect every job's rows, add fidelity against job `baseline`, and write summary.csv, summary.md and
    summary.png. `reused`: jobs done in an earlier run (skipped this time); `jobs`: how many the sweep has (jobs
    without a record then count as failed; records of jobs beyond it are left out).

    Raises SweepError (one line; `.summary` holds the counts when they were worked out) if anything fails."""
    from contentv import atomic

    sweep_dir = Path(sweep_dir)
    try:
        summary = summarize(sweep_dir, baseline, reused, jobs)
    except Exception as exc:  # noqa: BLE001 - whatever breaks, the caller gets one line and a status
        raise SweepError(f"sweep summary not written: {first_line(exc, with_type=True)}") from exc
    out = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "png": sweep_dir / "summary.png"}
    try:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary.rows)
        atomic.write_text(out["csv"], table.getvalue())
        atomic.write_text(out["md"], _markdown(summary.rows, baseline, summary.jobs, summary.failed, reused))
        if not _chart(summary.rows, out["png"], baseline):
            out.pop("png")
    except OSError as exc:  # a full disk, a read-only folder: "no space left on device while writing <folder>"
        raise SweepError(f"sweep summary not written: {first_line(exc)}", summary=summary) from exc
    except Exception as exc:  # noqa: BLE001 - a chart or table that fails to draw: still one line
        raise SweepError(f"sweep summary not written: {first_line(exc, with_type=True)}", summary=summary) from exc
    summary.paths = out
    return summary


def end_sweep(sweep_dir: Path, baseline: int = 0, reused: tuple[int, ...] = (), jobs: int | None = None) -> SweepEnd:
    """The end of a sweep: write the summary and say how it went. Never raises (an exception in a Hydra callback
    would only become a warning, and the sweep would exit 0): status 1 with one line per problem when a job
    failed or the summary could not be written, else 0."""
    try:
        summary = write_summary(sweep_dir, baseline, reused, jobs)
    except SweepError as exc:
        done = exc.summary if isinstance(exc.summary, Summary) else None
        err = [f"error: {exc}"] + ([done.failure_line()] if done is not None and done.failed else [])
        return SweepEnd(1, [], err, done)
    except Exception as exc:  # noqa: BLE001 - never lost: one line and status 1
        return SweepEnd(1, [], [f"error: sweep summary not written: {first_line(exc, with_type=True)}"])
    out = ["sweep summary: " + ", ".join(str(p) for p in summary.paths.values())]
    return SweepEnd(1 if summary.failed else 0, out, [summary.failure_line()] if summary.failed else [], summary)
