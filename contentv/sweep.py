"""Sweep summaries: one row per job (written by the job), collected into CSV, Markdown and a PNG chart."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)
ROW_FILE = "job_result.json"
STAGES = ("load", "text_encoding", "denoising", "decoding", "writing")
COLUMNS = (
    "job",
    "overrides",
    "status",
    *(f"{s}_s" for s in STAGES),
    "seconds_per_step",
    "peak_device_gib",
    "peak_host_rss_gib",
    "video",
    "error",
)


def _gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def job_rows(job: int, overrides: str, results: list, error: str | None = None) -> list[dict]:
    """Rows for one job: one per video it made (prompt files make several), or one failure row."""
    if error is not None:
        return [{"job": job, "overrides": overrides, "status": "failed", "error": error}]
    rows = []
    for r in results:
        rec = r.record
        row = {
            "job": job,
            "overrides": overrides,
            "status": "ok",
            "seconds_per_step": rec["seconds_per_step"],
            "peak_device_gib": _gib(rec["peak_memory"]["device_bytes"]),
            "peak_host_rss_gib": _gib(rec["peak_memory"]["host_rss_bytes"]),
            "video": str(r.video),
            "error": "",
        }
        row.update({f"{s}_s": rec["timings_s"].get(s) for s in STAGES})
        rows.append(row)
    return rows


def write_job_rows(job_dir: Path, rows: list[dict]) -> None:
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    (Path(job_dir) / ROW_FILE).write_text(json.dumps(rows, indent=2))


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(Path(sweep_dir).glob(f"*/{ROW_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        rows.extend(json.loads(f.read_text()))
    return rows


def _total(row: dict) -> float | None:
    parts = [row.get(f"{s}_s") for s in STAGES]
    return sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None


def write_summary(sweep_dir: Path) -> dict[str, Path]:
    """Write summary.csv, summary.md and summary.png into the sweep folder; returns their paths."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    out = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "png": sweep_dir / "summary.png"}
    with out["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(v) -> str:
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    ok = sum(r["status"] == "ok" for r in rows)
    lines += ["", f"{len(rows)} rows: {ok} ok, {len(rows) - ok} failed."]
    out["md"].write_text("\n".join(lines) + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no summary.png (pip install '.[sweep]')")
        out.pop("png")
        return out
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["status"] == "ok"]
    device = any(r.get("peak_device_gib") is not None for r in done)
    key = "peak_device_gib" if device else "peak_host_rss_gib"
    for r in done:
        x, y = r.get(key), _total(r)
        ax.scatter([x], [y])
        ax.annotate(f"{r['job']}: {r['overrides'][:40]}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("peak device memory (GiB)" if device else "peak host RSS (GiB)")
    ax.set_ylabel("total time (s)")
    ax.set_title(f"Sweep: time against peak memory ({len(done)} of {len(rows)} jobs ok)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out["png"], dpi=120)
    plt.close(fig)
    return out
