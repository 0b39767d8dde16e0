"""A sweep killed mid-run, resumed, re-run, and compared with a second run: the README's "Sweeps" figures.

    python benchmarks/sweep_resume.py            # tiny model on the CPU; records benchmarks/results/sweep_tiny.*
    python benchmarks/sweep_resume.py --out /tmp/s --no-record --no-compare --height 32 --width 48 --frames 5

1. Runs the sweep command and kills it with SIGKILL (a crash, the OOM killer, a lost node) as soon as job
   `--kill-at` has started, so that job is interrupted mid-run.
2. Runs the same command again: it prints "sweep: N jobs, D done, R to run", skips the D and finishes the rest.
3. Runs it once more: everything is done, nothing is generated.
4. (--compare) Runs the same sweep into a second folder and compares the two (`python demo.py compare`).

With --record the transcript, summary.md and summary.png go to benchmarks/results/sweep_tiny.{txt,md,png}
(a test keeps the README's copies equal to those files).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def sweep_command(out: Path, args: argparse.Namespace) -> list[str]:
    return [
        "python",
        "demo.py",
        "-m",
        "model=tiny_contentv",
        "backend=cpu",
        f"sampling.height={args.height}",
        f"sampling.width={args.width}",
        f"sampling.num_frames={args.frames}",
        f"speedup.cache_threshold={args.cache_threshold}",
        # two ways to trade fidelity for time, against job 0 (all the steps, no step cache)
        f"sampling.num_inference_steps={args.steps},{max(1, args.steps // 2)}",
        "speedup.cache=none,first_block",
        f"hydra.sweep.dir={out}",
    ]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{ROOT}" if path else str(ROOT)}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True)


def run_and_kill(cmd: list[str], sweep_dir: Path, job: int, timeout_s: float = 900) -> int:
    """Start `cmd` and SIGKILL it once job `job`'s folder appears (Hydra makes it as the job starts); returns
    how many jobs had finished (left a record) at that moment."""
    from contentv.sweep import ROW_FILE

    proc = subprocess.Popen(
        [sys.executable, *cmd[1:]], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout_s
    while not (sweep_dir / str(job) / ".hydra").is_dir():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the sweep ended (status {proc.returncode}) before job {job} started")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return sum((sweep_dir / str(n) / ROW_FILE).is_file() for n in range(job + 1))


def sweep_line(stderr: str) -> str:
    return next((ln for ln in stderr.splitlines() if ln.startswith("sweep: ")), "(no 'sweep:' line)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("multirun/sweep_resume_demo"), help="replaced if it exists")
    parser.add_argument("--kill-at", type=int, default=2, help="kill the first run once this job has started")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=8, help="the baseline's steps (the sweep also runs half)")
    parser.add_argument("--cache-threshold", type=float, default=1.0, help="FirstBlockCache threshold (random weights)")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    out = args.out if args.out.is_absolute() else ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)  # this script's own folder
    sweep_dir = out / "sweep"
    cmd = sweep_command(args.out / "sweep", args)
    shown = " ".join(cmd)
    log = [f"$ {shown}", f"# killed with SIGKILL while job {args.kill_at} was running"]
    done = run_and_kill(cmd, sweep_dir, args.kill_at)
    log.append(f"# jobs finished before the kill: {done}")
    for _ in ("resume", "re-run"):
        proc = run(cmd)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        log += [f"$ {shown}", sweep_line(proc.stderr)]
    if args.compare:
        again = run(sweep_command(args.out / "again", args))
        if again.returncode != 0:
            print(again.stderr[-3000:], file=sys.stderr)
            return again.returncode
        compare = ["python", "demo.py", "compare", str(args.out / "sweep"), str(args.out / "again")]
        proc = run(compare)
        log += [f"$ {' '.join(compare)}   # the same sweep run again, on the same machine", proc.stdout.rstrip()]
        log.append(f"# exit status {proc.returncode}")
    text = "\n".join(log) + "\n"
    print(text, end="")
    print((sweep_dir / "summary.md").read_text(), end="")
    if args.record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "sweep_tiny.txt").write_text(text)
        shutil.copyfile(sweep_dir / "summary.md", RESULTS / "sweep_tiny.md")
        shutil.copyfile(sweep_dir / "summary.png", RESULTS / "sweep_tiny.png")
        print(f"recorded: {RESULTS}/sweep_tiny.txt, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
