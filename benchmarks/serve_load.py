"""Load on the video API server (python demo.py mode=serve), on this machine, 127.0.0.1 only.

    python benchmarks/serve_load.py                       # 4 clients, 20 tiny jobs, 2 CPU workers; records
    python benchmarks/serve_load.py --clients 8 --jobs 40 --no-record
    python benchmarks/serve_load.py --clients 2 --jobs 3 --workers 1 --repeats 1 --out /tmp/serve_load.jsonl  # smoke

One server (tiny_contentv, 48x32, 5 frames, 1 step) with `--workers` CPU workers. Three measurements:

- steady: `--clients` threads submit `--jobs` jobs between them (a bounded loop each), then wait for all:
  admission latency (POST round trip) p50/p99, jobs completed per minute (first submission -> last completion),
  and exactly-once: every accepted job listed, finished, each completed one with exactly one video file, none
  claimed twice;
- worker_killed: the same while one worker is killed (SIGKILL) mid-job: only that job fails (worker_died), the
  worker is restarted, every other job completes once;
- warm_vs_fresh: one tiny job through the idle server (submit -> completed) against the same job as a fresh
  command-line process (`python demo.py ...`, wall time), median of `--repeats`: the warm-worker saving.

Appends to benchmarks/results/serve_load.jsonl (or `--out`); the README's Serve figures are generated from it
(python benchmarks/readme_tables.py --write). Exits 1 when a scenario was not exactly-once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.startup import git_commit  # noqa: E402
from tests.serve_helpers import LiveServer  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "serve_load.jsonl"
JOB = {"model": "tiny_contentv", "size": "48x32", "seconds": "0.5", "num_inference_steps": 1}
CLI = ["model=tiny_contentv", "backend=cpu", "sampling.height=32", "sampling.width=48", "sampling.num_frames=5"]
CLI += ["sampling.num_inference_steps=1"]
TERMINAL = ("completed", "failed")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def submit_all(api: str, clients: int, jobs: int, tag: str) -> tuple[list[str], list[float], float]:
    """`clients` threads submit `jobs` jobs in all; returns (ids, admission seconds, start time)."""
    ids: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    share = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]

    def client(n: int, count: int) -> None:
        with httpx.Client(timeout=60) as http:
            for i in range(count):  # bounded: `count` requests, no retries
                start = time.perf_counter()
                r = http.post(f"{api}/videos", json={**JOB, "prompt": f"{tag} client {n} job {i}"})
                took = time.perf_counter() - start
                r.raise_for_status()
                with lock:
                    ids.append(r.json()["id"])
                    latencies.append(took)

    start = time.time()
    threads = [threading.Thread(target=client, args=(n, c)) for n, c in enumerate(share)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return ids, latencies, start


def wait_all(api: str, ids: list[str], timeout: float = 1800) -> dict[str, dict]:
    end = time.monotonic() + timeout
    final: dict[str, dict] = {}
    with httpx.Client(timeout=30) as http:
        while len(final) < len(ids) and time.monotonic() < end:
            for video_id in ids:
                if video_id not in final:
                    v = http.get(f"{api}/videos/{video_id}").json()
                    if v["status"] in TERMINAL:
                        final[video_id] = v
            time.sleep(0.2)
    return final


def listed(api: str) -> set[str]:
    out, after = set(), None
    with httpx.Client(timeout=30) as http:
        while True:
            page = http.get(
                f"{api}/videos", params={"limit": 100, "order": "asc", **({"after": after} if after else {})}
            )
            body = page.json()
            out |= {v["id"] for v in body["data"]}
            if not body["has_more"]:
                return out
            after = body["last_id"]


def exactly_once(server: LiveServer, ids: list[str], final: dict[str, dict]) -> dict:
    """Every accepted job listed and finished; completed ones with one video file each; none claimed twice."""
    videos = server.folder / "videos"
    files = {p.name for p in videos.glob("*.mp4")}
    completed = [i for i in ids if final.get(i, {}).get("status") == "completed"]
    extra = [n for n in files if any(n.startswith(i + "-") for i in ids)]
    return {
        "accepted": len(ids),
        "lost": len(set(ids) - listed(server.api)),
        "unfinished": len(set(ids) - set(final)),
        "completed": len(completed),
        "failed": sum(1 for v in final.values() if v["status"] == "failed"),
        "failed_codes": sorted({v["error"]["code"] for v in final.values() if v["status"] == "failed"}),
        "missing_videos": sum(1 for i in completed if f"{i}.mp4" not in files),
        "duplicate_videos": len(extra),
        "claimed_twice": sum(1 for v in final.values() if v.get("attempts", 1) > 1),
    }


def load(server: LiveServer, clients: int, jobs: int, kill: bool) -> dict:
    killer = None
    if kill:  # SIGKILL the first worker once it runs a job

        def kill_one() -> None:
            while True:
                for w in server.health()["workers"]:
                    if w["job"]:
                        os.kill(w["pid"], signal.SIGKILL)
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_one, daemon=True)
        killer.start()
    ids, latencies, start = submit_all(server.api, clients, jobs, "killed" if kill else "steady")
    final = wait_all(server.api, ids)
    if killer is not None:
        killer.join(5)
    last = max(v["completed_at"] for v in final.values())
    check = exactly_once(server, ids, final)
    ok = not (check["lost"] or check["unfinished"] or check["missing_videos"] or check["duplicate_videos"])
    ok = ok and not check["claimed_twice"] and check["failed"] == (1 if kill else 0)
    return {
        "scenario": "worker_killed" if kill else "steady",
        "clients": clients,
        "jobs": jobs,
        "admission_p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "admission_p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "jobs_per_min": round(check["completed"] / max(1e-9, last - start) * 60, 1),
        "exactly_once": ok,
        **check,
    }


def warm_job(server: LiveServer) -> float:
    with httpx.Client(timeout=60) as http:
        start = time.perf_counter()
        video_id = http.post(f"{server.api}/videos", json={**JOB, "prompt": "warm"}).json()["id"]
        while http.get(f"{server.api}/videos/{video_id}").json()["status"] not in TERMINAL:
            time.sleep(0.05)
        return time.perf_counter() - start


def fresh_job(folder: Path) -> float:
    start = time.perf_counter()
    out = tempfile.mkdtemp(dir=folder)
    cmd = [sys.executable, str(ROOT / "demo.py"), *CLI, f"output.dir={out}", f"hydra.run.dir={out}/hydra"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="CPU workers of the server")
    parser.add_argument("--repeats", type=int, default=3, help="warm and fresh runs each (median)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON-lines file the rows are appended to")
    args = parser.parse_args(argv)
    base = {
        "commit": git_commit(ROOT),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "workers": args.workers,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        devices = "serve.devices=[" + ",".join(["cpu"] * args.workers) + "]"
        max_queue = f"serve.max_queue={max(64, args.jobs)}"
        server = LiveServer(Path(tmp) / "server", devices, max_queue, f"serve.max_queue_per_key={max(16, args.jobs)}")
        try:
            warmup, _, _ = submit_all(server.api, args.workers, args.workers, "warm-up")
            wait_all(server.api, warmup)  # the workers load the model before anything is timed
            for kill in (False, True):
                rows.append({**base, **load(server, args.clients, args.jobs, kill)})
                print(json.dumps(rows[-1]))
            warm = [warm_job(server) for _ in range(args.repeats)]
        finally:
            server.stop()
        fresh = [fresh_job(Path(tmp)) for _ in range(args.repeats)]
    row = {
        **base,
        "scenario": "warm_vs_fresh",
        "warm_s": round(statistics.median(warm), 3),
        "fresh_s": round(statistics.median(fresh), 3),
        "ratio": round(statistics.median(fresh) / statistics.median(warm), 2),
        "repeats": args.repeats,
    }
    rows.append(row)
    print(json.dumps(row))
    if not args.no_record:
        with args.out.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"recorded: {args.out}")
    return 0 if all(r.get("exactly_once", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
