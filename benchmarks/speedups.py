"""Speed-up benchmark: step caching (FirstBlockCache) and regional torch.compile against the plain run.

For each setting: median time of the denoising loop, speed-up against the plain run, and how far the
frames move from the plain run's (PSNR in dB; higher = closer; inf = identical). Interleaved repeats
in one run. One JSON object per setting goes to benchmarks/results/speedups.jsonl.

    python benchmarks/speedups.py                       # small random ContentV on the CPU
    python benchmarks/speedups.py --compile             # also torch.compile (slow to compile on a CPU)
    python benchmarks/speedups.py --model contentv_8b --backend cuda --steps 20   # full size, random weights

Random weights make the quality figures a measure of how much the output changes, not of how good it
looks: judge quality on real weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench (small random ContentV, CPU) or a conf/model name")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--thresholds", default="0.05,0.1,0.2")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args()


def denoise(pipe, backend, args: argparse.Namespace) -> tuple[float, np.ndarray]:
    """One generation at the benchmark's size: the denoising loop's seconds, and the frames."""
    stages = {}

    @contextlib.contextmanager
    def stage(n):
        backend.synchronize()
        start = time.perf_counter()
        yield
        backend.synchronize()
        stages[n] = time.perf_counter() - start

    out = pipe(
        prompt="a red fox walks in snow",
        negative_prompt="low quality",
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        stage_context=stage,
    ).frames
    return stages["denoising"], out


def report(rows: list[dict], record: bool) -> None:
    """The table on stdout; the rows appended to benchmarks/results/speedups.jsonl if `record`."""
    print(f"{'setting':18s} {'denoise s':>10s} {'speed-up':>9s} {'PSNR vs plain':>14s}")
    for r in rows:
        print(
            f"{r['setting']:18s} {r['denoising_s_median']:10.3f} {r['speedup_vs_plain']:9.2f} {r['psnr_db_vs_plain']:14.2f}"
        )
    if record:
        path = ROOT / "benchmarks" / "results" / "speedups.jsonl"
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"recorded in {path}")


def main() -> int:
    args = parse_args()

    import backends
    from benchmarks.cpu_reference import small_checkpoint
    from benchmarks.gpu_presets import random_pipeline
    from contentv import speedup
    from contentv.config import BackendConfig, MemoryConfig, SpeedupConfig
    from contentv.models.contentv import SPEC
    from contentv.models.contentv.pipeline import ContentVPipeline
    from contentv.registry import get_spec

    backend = backends.build_backend(BackendConfig(name=args.backend))
    backend.setup()

    def fresh():
        if args.model == "bench":
            return SPEC, ContentVPipeline.from_pretrained(small_checkpoint())
        cfg, pipe = random_pipeline(args.model)
        return get_spec(cfg.family), pipe

    settings = {"plain": SpeedupConfig()}
    for t in args.thresholds.split(","):
        settings[f"first_block {t}"] = SpeedupConfig(cache="first_block", cache_threshold=float(t))
    if args.compile:
        settings["compile"] = SpeedupConfig(compile=True)
    pipes = {}
    for name, sp in settings.items():
        spec, pipe = fresh()
        backend.prepare(pipe, MemoryConfig(), spec)
        speedup.apply(pipe, sp)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe

    for pipe in pipes.values():  # warm-up (and compilation)
        denoise(pipe, backend, args)
    times = {n: [] for n in pipes}
    frames = {}
    for _ in range(args.repeats):
        for n, pipe in pipes.items():
            t, out = denoise(pipe, backend, args)
            times[n].append(t)
            frames[n] = out
    base = statistics.median(times["plain"])
    rows = []
    for n, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "benchmark": "speedups",
                "setting": n,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "device": backend.describe().get("name", args.backend),
                "torch": torch.__version__,
                "model": args.model,
                "size": f"{args.height}x{args.width}x{args.frames}, {args.steps} steps",
                "denoising_s_median": round(med, 4),
                "speedup_vs_plain": round(base / med, 3),
                "psnr_db_vs_plain": round(psnr(frames[n], frames["plain"]), 2),
            }
        )
    report(rows, record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
