"""Compare two sweeps (before/after an upgrade, two machines): per matching job, the change in time, s/step,
peak memory and PSNR, with regressions beyond a threshold flagged.

    python demo.py compare multirun/before multirun/after [--threshold 0.10]
    python -m contentv.sweep.compare multirun/before multirun/after

Reads each folder's summary.csv. Jobs match on their overrides (and prompt and seed, for prompt files).
Exit status: 0 no regression, 1 at least one, 2 nothing to compare: a folder without a summary.csv of its own
(missing, a link, not a sweep summary, unreadable) or two sweeps with no job in common.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

# (column, heading, lower is better)
METRICS = (
    ("generate_s", "generate s", True),
    ("seconds_per_step", "s/step", True),
    ("peak_gib", "peak GiB", True),
    ("psnr_db", "PSNR dB", False),
)


# A summary's cells are short; a prompt can be 20,000 characters. csv's default cap (131072) is raised to this.
MAX_FIELD = 16 * 2**20
# The columns every summary.csv has (contentv.sweep.summary.COLUMNS); another CSV is not a sweep's summary.
REQUIRED = ("job", "overrides", "status")


class CompareError(Exception):
    """Nothing to compare (a folder that isn't a finished sweep, no job in common); exit status 2."""


def _num(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return None if value is not None and math.isnan(value) else value


def read_sweep(folder: str | Path) -> list[dict]:
    """The rows of `folder`/summary.csv, numbers parsed (inf = identical); peak_gib is the device peak, or the
    host RSS peak where no device memory was measured (CPU)."""
    path = Path(folder) / "summary.csv"
    if path.is_symlink():  # the tool never writes one: a link may point at anything (another sweep's, a stranger's)
        raise CompareError(f"{path} is a link, not a summary this sweep wrote (run the sweep again to rewrite it)")
    if not path.is_file():
        raise CompareError(f"{path}: no such file (run the sweep command again to finish it and write the summary)")
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD))
    rows = []
    try:
        # undecodable bytes become U+FFFD: a prompt with a stray byte still compares
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise CompareError(f"{path} is not a sweep summary (no {', '.join(missing)} column)")
            for r in reader:
                row = {k: _num(r.get(k)) for k in ("generate_s", "seconds_per_step", "psnr_db", "ssim")}
                device = _num(r.get("peak_device_gib"))
                row["peak_gib"] = device if device is not None else _num(r.get("peak_host_rss_gib"))
                row.update({k: r.get(k) or "" for k in ("job", "status", "overrides", "prompt", "seed")})
                rows.append(row)
    except csv.Error as exc:
        raise CompareError(f"{path} is not a readable summary (line {reader.line_num}: {exc})") from exc
    except OSError as exc:
        raise CompareError(f"{path} can't be read ({exc.strerror or exc})") from exc
    return rows


def pair_rows(a: list[dict], b: list[dict]) -> list[tuple[dict | None, dict | None]]:
    """Rows of the same job side by side, matched on overrides; where both sides made several videos for a job
    (a prompt file), on prompt and seed too. A job with one row on a side (one video, or one failure row for
    the whole job) faces each of the other side's rows."""
    pairs: list[tuple[dict | None, dict | None]] = []
    for overrides in dict.fromkeys(r["overrides"] for r in [*a, *b]):  # in job order, A's first
        ra = [r for r in a if r["overrides"] == overrides]
        rb = [r for r in b if r["overrides"] == overrides]
        if len(ra) <= 1 or len(rb) <= 1:
            pairs += [(x, y) for x in ra or [None] for y in rb or [None]]
            continue
        by_video = {(r["prompt"], r["seed"]): r for r in rb}
        pairs += [(x, by_video.pop((x["prompt"], x["seed"]), None)) for x in ra]
        pairs += [(None, y) for y in by_video.values()]
    return pairs


@dataclass
class Change:
    a: dict | None
    b: dict | None
    regressions: list[str] = field(default_factory=list)

    @property
    def row(self) -> dict:
        return self.a or self.b or {}


def _regression(name: str, a: float | None, b: float | None, lower_better: bool, threshold: float) -> str:
    if a is None or b is None:
        return ""
    if not lower_better:  # PSNR: identical (inf) -> anything finite is a loss; else relative to the dB value
        if a == math.inf:
            return f"{name} identical -> {b:.2f}" if b != math.inf else ""
        if a <= 0:  # 0 dB or less: no relative change to speak of; a drop in dB is still a loss
            return f"{name} {a:.2f} -> {b:.2f} dB" if b < a else ""
        return f"{name} {b / a - 1:+.0%}" if b < a * (1 - threshold) else ""
    return f"{name} {b / a - 1:+.0%}" if a > 0 and b > a * (1 + threshold) else ""


def compare(a: list[dict], b: list[dict], threshold: float = 0.10) -> list[Change]:
    """One Change per video found in either sweep; `regressions` lists what got worse by more than `threshold`
    (relative: time, s/step and peak memory up, PSNR down or no longer identical), or an ok job that now fails."""
    out = []
    for ra, rb in pair_rows(a, b):
        change = Change(ra, rb)
        if ra and rb:
            if ra["status"] == "ok" and rb["status"] != "ok":
                change.regressions.append("failed")
            for col, name, lower in METRICS:
                flag = _regression(name, ra[col], rb[col], lower, threshold)
                if flag:
                    change.regressions.append(flag)
        out.append(change)
    return out


def _fmt(v: float | None, col: str) -> str:
    if v is None:
        return "-"
    if col == "psnr_db" and v == math.inf:
        return "identical"
    return f"{v:.3f}" if col in ("seconds_per_step", "peak_gib") else f"{v:.2f}"


def _delta(a: float | None, b: float | None, col: str) -> str:
    text = f"{_fmt(a, col)} -> {_fmt(b, col)}"
    if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and a > 0:
        text += f" ({b / a - 1:+.0%})"
    return text


def _tokens(overrides: str) -> list[str]:
    try:
        return shlex.split(overrides, posix=False)  # keeps a quoted prompt override in one piece
    except ValueError:
        return [overrides]


def format_changes(changes: list[Change], threshold: float) -> str:
    """The table `main` prints: overrides every job shares once, one entry per video, then a one-line verdict."""
    tokens = {id(c): _tokens(c.row.get("overrides", "")) for c in changes}
    common = [t for t in next(iter(tokens.values()), []) if all(t in other for other in tokens.values())]
    per_job: dict[str, int] = {}
    for c in changes:
        per_job[c.row.get("overrides", "")] = per_job.get(c.row.get("overrides", ""), 0) + 1
    lines = [f"every job: {' '.join(common)}"] if common else []
    for c in changes:
        name = " ".join(t for t in tokens[id(c)] if t not in common) or "(the common overrides)"
        if per_job[c.row.get("overrides", "")] > 1 and c.row.get("prompt"):  # a prompt file: which video
            name += f" [seed {c.row['seed']}: {c.row['prompt']}]"
        if c.a is None or c.b is None:
            lines.append(f"{name}: only in {'B' if c.a is None else 'A'}")
            continue
        status = "" if c.a["status"] == c.b["status"] else f"  status {c.a['status']} -> {c.b['status']}"
        cells = "  ".join(f"{title} {_delta(c.a[col], c.b[col], col)}" for col, title, _ in METRICS)
        flag = f"  REGRESSION: {', '.join(c.regressions)}" if c.regressions else ""
        lines.append(f"job {c.a['job']} -> {c.b['job']}: {name}\n    {cells}{status}{flag}")
    bad = sum(bool(c.regressions) for c in changes)
    matched = sum(c.a is not None and c.b is not None for c in changes)
    if bad:
        verdict = f"{bad} of {matched} matching jobs regressed beyond {threshold:.0%}"
    else:
        verdict = f"no regression beyond {threshold:.0%} in {matched} matching jobs"
    return "\n".join([*lines, verdict])


def main(argv: list[str] | None = None, prog: str = "python -m contentv.sweep.compare") -> int:
    """The command line: prints the comparison; returns the exit status (0, 1 regressed, 2 nothing to compare)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_a", help="the earlier (reference) sweep folder")
    parser.add_argument("sweep_b", help="the later sweep folder")
    parser.add_argument("--threshold", type=float, default=0.10, help="relative change that counts (default 0.10)")
    args = parser.parse_args(argv)
    if not 0 <= args.threshold < 1:
        parser.error(f"--threshold={args.threshold}: a fraction in [0, 1)")
    try:
        a, b = read_sweep(args.sweep_a), read_sweep(args.sweep_b)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    changes = compare(a, b, args.threshold)
    if not any(c.a is not None and c.b is not None for c in changes):
        print(
            f"error: {args.sweep_a} and {args.sweep_b} have no job in common (jobs match on their overrides): "
            "nothing to compare",
            file=sys.stderr,
        )
        return 2
    print(f"A: {args.sweep_a}\nB: {args.sweep_b}")
    print(format_changes(changes, args.threshold))
    return 1 if any(c.regressions for c in changes) else 0


if __name__ == "__main__":
    sys.exit(main())
