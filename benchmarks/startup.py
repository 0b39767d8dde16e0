"""Start-up benchmark: how long `demo.py` takes to print its help, to refuse a bad setting, and to make a
video with the cached tiny model, and what share of that tiny run is start-up (imports, Hydra, loading the
tiny weights) rather than work (text encoding, denoising, decoding, writing).

Runs each command in a fresh process, interleaved across repeats (and across checkouts with --compare), and
reports the fastest and the median wall time, then splits one tiny run's import time by package
(`python -X importtime`: how much is this runtime's own). One JSON object per (checkout, command) goes to
benchmarks/results/startup.jsonl.

    python benchmarks/startup.py                              # this checkout
    python benchmarks/startup.py --compare /path/to/old/checkout --repeats 5

The tiny model is built once before timing (its checkpoint cache is shared by every checkout; --no-build skips
that untimed run where the cache has it already). Compare as ratios within one run: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_contentv", "backend=cpu", "sampling.num_inference_steps=2", "sampling.prompt=a red fox"]
COMMANDS = {
    "help": ["--help"],
    "preflight_error": ["model=tiny_contentv", "backend=cpu", "sampling.num_frames=0"],
    "tiny_run": TINY,
}


def run_once(checkout: Path, args: list[str], out: Path, env: dict) -> tuple[float, int, dict]:
    """(wall seconds, exit status, the sidecar's timings if a video was made)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(checkout / "demo.py"), *args, f"hydra.run.dir={out}", f"output.dir={out}"],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    sidecars = sorted(out.rglob("*.json"))
    record = json.loads(sidecars[-1].read_text()) if sidecars else {}
    return wall, proc.returncode, record


def measure(checkouts: list[Path], repeats: int, build: bool = True) -> tuple[dict, dict, dict]:
    """Interleaved runs: wall times and exit statuses per (checkout, command), start-up shares per checkout.
    `build`: one untimed tiny run per checkout first (it builds the tiny checkpoint if the cache lacks it)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    walls: dict[tuple[str, str], list[float]] = {}
    status: dict[tuple[str, str], set[int]] = {}
    shares: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for checkout in checkouts if build else []:  # build the tiny checkpoint once, untimed
            run_once(checkout, TINY, Path(tempfile.mkdtemp(dir=tmp)), env)
        for _ in range(repeats):
            for name, command in COMMANDS.items():
                for checkout in checkouts:
                    wall, rc, record = run_once(checkout, command, Path(tempfile.mkdtemp(dir=tmp)), env)
                    walls.setdefault((str(checkout), name), []).append(wall)
                    status.setdefault((str(checkout), name), set()).add(rc)
                    # start-up share: the process's wall time outside the work stages (text encoding ... writing).
                    # Loading counts as start-up: older checkouts imported the libraries inside their "load" stage.
                    skip = ("startup", "load", "total")
                    stages = {k: v for k, v in record.get("timings_s", {}).items() if k not in skip}
                    if name == "tiny_run" and stages:
                        shares.setdefault(str(checkout), []).append((wall - sum(stages.values())) / wall)
    return walls, status, shares


OURS = ("contentv", "backends", "demo")


def import_breakdown(checkout: Path) -> dict:
    """Seconds of import per top-level package in one cached tiny run (`python -X importtime`, self times)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", str(checkout / "demo.py"), *TINY, f"hydra.run.dir={out}"],
            cwd=out,
            env=env,
            capture_output=True,
            text=True,
        )
    by_package: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            package = m.group(2).split(".")[0]
            by_package[package] = by_package.get(package, 0.0) + int(m.group(1)) / 1e6
    total = sum(by_package.values())
    ours = sum(v for k, v in by_package.items() if k in OURS)
    top = dict(sorted(by_package.items(), key=lambda kv: -kv[1])[:6])
    return {
        "total_s": round(total, 3),
        "ours_s": round(ours, 3),
        "top_s": {k: round(v, 3) for k, v in top.items()},
        "exit_status": [proc.returncode],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, action="append", default=[], help="another checkout to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--no-build", action="store_true", help="no untimed tiny run first: the tiny checkpoint is already cached"
    )
    args = parser.parse_args()

    checkouts = [ROOT, *(p.resolve() for p in args.compare)]
    walls, status, shares = measure(checkouts, args.repeats, build=not args.no_build)
    rows = []
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for (checkout, name), values in walls.items():
        row = {
            "checkout": checkout,
            "commit": git_commit(Path(checkout)),
            "command": name,
            "args": COMMANDS[name],
            "exit_status": sorted(status[(checkout, name)]),
            "fastest_s": round(min(values), 3),
            "median_s": round(statistics.median(values), 3),
            "repeats": len(values),
            "cpu_count": os.cpu_count(),
            "time": stamp,
        }
        if name == "tiny_run" and checkout in shares:
            row["startup_share_median"] = round(statistics.median(shares[checkout]), 3)
        rows.append(row)
        share = f"  start-up share {row['startup_share_median']:.0%}" if "startup_share_median" in row else ""
        print(
            f"{row['commit'][:8]}  {name:<16} fastest {row['fastest_s']:6.2f} s  median {row['median_s']:6.2f} s  "
            f"exit {row['exit_status']}{share}"
        )
    breakdown = import_breakdown(ROOT)
    rows.append(
        {
            "checkout": str(ROOT),
            "commit": git_commit(ROOT),
            "command": "import_breakdown",
            "args": TINY,
            **breakdown,
            "cpu_count": os.cpu_count(),
            "time": stamp,
        }
    )
    top = ", ".join(f"{k} {v:.2f}" for k, v in breakdown["top_s"].items())
    print(f"imports of a tiny run: {breakdown['total_s']:.2f} s, this runtime's own {breakdown['ours_s']:.2f} s; {top}")
    for name in COMMANDS:
        base = statistics.median(walls[(str(checkouts[0]), name)])
        for other in checkouts[1:]:
            ratio = statistics.median(walls[(str(other), name)]) / base
            print(f"{name:<16} {git_commit(other)[:8]} takes {ratio:.2f}x this checkout's median")
    if not args.no_record:
        out = ROOT / "benchmarks" / "results" / "startup.jsonl"
        with out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"recorded: {out.relative_to(ROOT)}")
    return 0


def git_commit(checkout: Path) -> str:
    """The commit checked out in a git folder ("unknown" outside one)."""
    proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
