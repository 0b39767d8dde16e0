"""GPU benchmark: full-size random-weight ContentV-8B / CogVideoX-5B under memory presets.

Speed and memory don't depend on weight values, so each model is built from its published configs on the meta
device, allocated on the host in its load dtypes and filled with random numbers in place (no download, no
checkpoint round trip); `Backend.prepare` then places it as the preset says, as after a real load. Per preset:
seconds per denoising step (warm-up steps excluded), text encoding and decoding time, peak device memory
(allocated and reserved), peak host RSS, achieved TFLOP/s against the bf16 spec, the memory planner's
predictions beside each measurement, and the time ratio against everything resident (`none`).

A row is appended (and flushed) to gpu_<device>.jsonl in each --out folder as soon as denoising is measured,
and again after decoding: the last row of a (run, model, preset) is the one that counts, so a run killed in
the decode still leaves its denoising figures. benchmarks/gpu_check.sh runs one preset per process, each in
a time box; this script runs several in one process too (a failing preset is recorded and the next runs).

    python benchmarks/gpu_presets.py                          # ContentV-8B, every preset, 432x768x125
    python benchmarks/gpu_presets.py --model cogvideox_5b     # CogVideoX-5B, 720x480x49
    python benchmarks/gpu_presets.py --presets none,low_vram_24g --steps 3 --warmup 1 --no-decode
    python benchmarks/gpu_presets.py --predict plan.json --model contentv_8b,cogvideox_5b   # the planner only
    python benchmarks/gpu_presets.py --model tiny_contentv --backend cpu --steps 1 --warmup 0 \\
        --height 32 --width 48 --frames 9 --out /tmp/bench                                 # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_tables import device_slug, format_terminal, spec_tflops, video_seconds  # noqa: E402
from benchmarks.random_weights import decode, random_pipeline  # noqa: E402

PROMPT, NEGATIVE = "a red fox walks in snow", "low quality"
GEN_STAGES = ("text_encoding", "denoising", "decoding")


# ------------------------------------------------------------------------------------------ presets and models


@functools.cache
def _presets():
    import demo

    return demo.load_presets(("model", "memory"))


def load_preset(name: str):
    """conf/memory/<name>.yaml as the command line composes it (ConfigError-like KeyError for unknown names)."""
    memories = _presets().memories
    if name not in memories:
        raise KeyError(f"memory preset {name!r}: one of {', '.join(sorted(memories))}")
    return memories[name]


def load_model(name: str):
    """conf/model/<name>.yaml as the command line composes it."""
    models = _presets().models
    if name not in models:
        raise KeyError(f"model {name!r}: one of {', '.join(sorted(models))}")
    return models[name]


def sampling_for(model: str, height: int | None, width: int | None, frames: int | None):
    """The model's published sampling settings with the given size (None = the model's)."""
    from contentv.config import SamplingConfig, resolve_sampling

    s = SamplingConfig(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=frames)
    return resolve_sampling(s, load_model(model))


# ------------------------------------------------------------------------------------------ planner and FLOPs


def plan_key(model: str, s) -> str:
    return f"{model}@{s.height}x{s.width}x{s.num_frames}"


def predict(model: str, backend_name: str, sampling) -> dict:
    """The memory planner's predictions for every preset of this run (contentv.planner.plan, as
    `python demo.py dry_run=true` makes them), as plain numbers."""
    import backends
    from contentv.config import RunConfig
    from contentv.planner import plan

    cfg = RunConfig(model=load_model(model), sampling=sampling)
    p = plan(cfg, _presets().memories, backends.backend_class(backend_name).capabilities())
    return {
        "model": model,
        "backend": backend_name,
        "weights_bytes": sum(p.weights.values()),
        "strategies": {
            s.name: {
                "device_bytes": s.device_bytes,
                "stage_bytes": dict(s.stage_bytes),
                "host_bytes": s.host_bytes,
                "host_peak_bytes": s.host_peak_bytes,
                "rel_time": s.time if s.time != float("inf") else None,
                "error": s.error or None,
            }
            for s in p.strategies
        },
    }


def tokens_and_flops(pipe, model: str, sampling) -> tuple[int, float]:
    """Transformer tokens per sequence and FLOPs per denoising step: linear layers
    24*d^2*N and attention 4*N^2*d per block and pass; two passes per step with guidance (batched or not)."""
    from contentv.models.common import generic_workload
    from contentv.registry import get_spec

    spec = get_spec(load_model(model).family)
    components = {n: (m, next(m.parameters()).dtype) for n, m in pipe.components.items() if isinstance(m, nn.Module)}
    wl = (spec.workload or generic_workload)(components, sampling)
    n = wl.video_tokens + wl.text_tokens
    c = pipe.transformer.config
    d, layers = c.num_attention_heads * c.attention_head_dim, c.num_layers
    passes = 2 if (sampling.guidance_scale or 0) > 1 else 1
    return n, float(passes * layers * (24 * d * d * n + 4 * n * n * d))


# ------------------------------------------------------------------------------------------ measuring


class Stages:
    """`with stages("denoising"): ...`: the StageRecorder's time and peaks, plus the peak device memory reserved
    by the caching allocator (what a card must hold) and the start of denoising (for per-step times)."""

    def __init__(self, backend):
        from contentv.stats import StageRecorder

        self.recorder = StageRecorder(backend)
        self.device = backend.device
        self.reserved: dict[str, int] = {}
        self.marks: list[float] = []  # denoising start, then the end of each step
        self._reserved = getattr(getattr(torch, backend.device.type, None), "max_memory_reserved", None)

    @contextlib.contextmanager
    def __call__(self, name: str):
        with self.recorder.stage(name):
            if name == "denoising":
                self.marks.append(time.perf_counter())
            yield
        if self._reserved is not None:
            self.reserved[name] = self._reserved(self.device)

    def as_dict(self) -> dict[str, dict]:
        out = self.recorder.as_dict()
        for name, v in out.items():
            v["peak_device_reserved_bytes"] = self.reserved.get(name)
        return out


class Rows:
    """Appends rows to gpu_<device>.jsonl in each folder, synced at once."""

    def __init__(self, folders: list[Path], device_name: str):
        self.paths = [Path(f) / f"gpu_{device_slug(device_name)}.jsonl" for f in folders]
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        data = (json.dumps(row, default=str) + "\n").encode()
        for p in self.paths:  # one append of the whole line: a process killed here leaves no half row
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    def find(self, **match) -> dict | None:
        """The last row written with these fields (e.g. this run's `none`)."""
        if not self.paths or not self.paths[0].exists():
            return None
        found = None
        for line in self.paths[0].read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if all(row.get(k) == v for k, v in match.items()):
                    found = row
        return found


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _max(values) -> int | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def compare(row: dict, prediction: dict | None) -> None:
    """Put the planner's numbers beside the measured ones, over the stages that ran."""
    strategy = (prediction or {}).get("strategies", {}).get(row["preset"])
    if prediction is None or "error" in prediction or strategy is None or strategy.get("error"):
        why = (prediction or {}).get("error") or (strategy or {}).get("error") or "no prediction for this preset"
        row["predicted"] = {"error": why}
        row.update(predicted_peak_device_bytes=None, device_ratio=None, predicted_host_bytes=None, host_ratio=None)
        row.update(predicted_host_peak_bytes=None, host_peak_ratio=None, predicted_rel_time=None)
        return
    stages = row["stages"]
    ran = [s for s in GEN_STAGES if s in stages]
    row["predicted"] = strategy
    row["predicted_peak_device_bytes"] = max(strategy["stage_bytes"][s] for s in ran)
    row["device_ratio"] = _ratio(row["peak_device_bytes"], row["predicted_peak_device_bytes"])
    row["stage_device_ratios"] = {s: _ratio(stages[s]["peak_device_bytes"], strategy["stage_bytes"][s]) for s in ran}
    row["predicted_host_bytes"] = strategy["host_bytes"]
    row["host_ratio"] = _ratio(row["peak_host_rss_bytes"], strategy["host_bytes"])
    row["predicted_host_peak_bytes"] = strategy["host_peak_bytes"]
    row["host_peak_ratio"] = _ratio(row["load_peak_host_rss_bytes"], strategy["host_peak_bytes"])
    row["predicted_rel_time"] = strategy["rel_time"]


def summarize(row: dict, stages_: Stages, warmup: int, flops: float, rows: Rows) -> None:
    """Fill the row's figures from the stage statistics recorded so far."""
    stages = stages_.as_dict()
    step_times = [b - a for a, b in itertools.pairwise(stages_.marks)]
    timed = step_times[warmup:] or step_times  # no warm-up step asked: every step counts
    per_step = sum(timed) / len(timed)
    ran = [s for s in GEN_STAGES if s in stages]
    row["stages"] = stages
    row["step_seconds"] = [round(t, 4) for t in step_times]
    row["seconds_per_step"] = round(per_step, 4)
    row["total_s"] = round(sum(stages[s]["seconds"] for s in ran), 3)
    row["load_s"] = round(stages["load"]["seconds"], 3)
    row["text_encoding_s"] = round(stages["text_encoding"]["seconds"], 3)
    row["decoding_s"] = round(stages["decoding"]["seconds"], 3) if "decoding" in stages else None
    row["projected_50_steps_s"] = video_seconds(row, row["decoding_s"])
    row["peak_device_bytes"] = _max(stages[s]["peak_device_bytes"] for s in ran)
    row["peak_device_reserved_bytes"] = _max(stages[s]["peak_device_reserved_bytes"] for s in ran)
    row["peak_host_rss_bytes"] = _max(stages[s]["peak_host_rss_bytes"] for s in ran)
    row["load_peak_host_rss_bytes"] = _max(v["peak_host_rss_bytes"] for v in stages.values())
    row["flops_per_step"] = flops
    row["tflops"] = round(flops / per_step / 1e12, 3)
    spec = spec_tflops(row["device"], row["backend"])
    row["spec_tflops"] = spec
    row["fraction_of_spec"] = round(row["tflops"] / spec, 4) if spec else None
    base = rows.find(run_id=row["run_id"], model=row["model"], size=row["size"], preset="none", status="ok")
    if row["preset"] == "none":
        base = row
    row["ratio_vs_none"] = _ratio(per_step, base["seconds_per_step"]) if base else None
    row["ratio_50_steps_vs_none"] = (
        _ratio(row["projected_50_steps_s"], base.get("projected_50_steps_s")) if base else None
    )


def run_preset(name: str, args, backend, prediction: dict | None, rows: Rows, base_row: dict) -> dict:
    """Build, place and run one preset; its row is written after denoising and again after decoding."""
    from contentv.memory_policy import guidance_mode
    from contentv.registry import get_spec

    row = {**base_row, "preset": name, "status": "started"}
    rows.write(row)  # if this process dies (time box, crash), the tables say the preset didn't finish
    row["status"] = "failed"
    pipe = None
    row["memory_cap_bytes"] = cap_memory(backend, name)
    try:
        memory = load_preset(name)
        row["memory"] = dataclasses.asdict(memory)
        stages = Stages(backend)
        with stages("load"):
            cfg = load_model(args.model)
            pipe, row["weights_bytes"] = random_pipeline(cfg)
            row["prepared"] = backend.prepare(pipe, memory, get_spec(cfg.family))
        pipe.set_progress_bar_config(disable=True)
        mode = guidance_mode(memory, backend.batched_guidance)
        row["guidance"] = mode

        def on_step(_pipe, _i, _t, _kwargs):
            backend.synchronize()
            stages.marks.append(time.perf_counter())

        s = args.sampling
        out = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            height=s.height,
            width=s.width,
            num_frames=s.num_frames,
            num_inference_steps=args.warmup + args.steps,
            guidance_scale=s.guidance_scale,
            max_sequence_length=s.max_sequence_length,
            guidance_mode=mode,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            stage_context=stages,
            callback_on_step_end=on_step,
        )
        row["tokens"], flops = tokens_and_flops(pipe, args.model, s)
        row["pinned_host_bytes"] = pinned_host_bytes()  # beside the planner's host figure (pinned copies rounded)
        row.update(status="ok", decode="pending" if args.decode else "skipped", decode_from=args.decode_from)
        summarize(row, stages, args.warmup, flops, rows)
        compare(row, prediction)
        rows.write(row)  # denoising is in, whatever happens in the decode
        if args.decode:
            try:
                with stages("decoding"):
                    frames = decode(pipe, out.frames)
                pipe.maybe_free_model_hooks()
                assert frames.shape[1] == s.num_frames, frames.shape
                row.update(decode="measured", decode_from=None)
            except Exception as exc:  # noqa: BLE001 - an OOM in the decode is a result too
                row["decode"] = f"failed: {_error(exc)}"
            summarize(row, stages, args.warmup, flops, rows)
            compare(row, prediction)
            rows.write(row)
    except Exception as exc:  # noqa: BLE001 - a preset that fails (e.g. OOM) is recorded, the rest go on
        row.update(status="failed", error=_error(exc))
        rows.write(row)
    finally:
        del pipe
        gc.collect()
        backend.empty_cache()
        cap_memory(backend, None)
    return row


def pinned_host_bytes() -> int | None:
    """Bytes torch's caching host allocator holds (pinned blocks, each rounded up to a power of two); None off CUDA."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_initialized():
        return None
    found = stats()
    return found.get("allocated_bytes.current", found.get("allocated_bytes.all.current"))


def cap_memory(backend, preset: str | None) -> int | None:
    """A low-VRAM preset runs capped at its card size (low_vram_16g: 16 GiB) with the caching allocator's
    per-process fraction, so a larger GPU measures what that card would do: an allocation that would need more
    reserved memory fails with an out-of-memory error there, as on the card. None: uncapped (also resets)."""
    from benchmarks.readme_tables import card_gib

    if backend.name != "cuda":
        return None
    total = torch.cuda.get_device_properties(backend.device).total_memory
    card = card_gib(preset) if preset else None
    cap = min(card * 2**30, total) if card else total
    torch.cuda.set_per_process_memory_fraction(cap / total, backend.device)
    return cap if card else None


def base_row(args, backend) -> dict:
    from contentv.runtime import library_versions

    info = backend.describe()
    s = args.sampling
    model = load_model(args.model)
    return {
        "benchmark": "gpu_presets",
        "run_id": args.run_id,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": info.get("name", "") if backend.name == "cuda" else f"{backend.name} {info.get('name', '')}".strip(),
        "device_info": info,
        "backend": backend.name,
        "attention": args.attention,
        "versions": library_versions(),
        "model": args.model,
        "weights": "random",
        "dtype": model.dtype,
        "vae_dtype": model.vae_dtype,
        "height": s.height,
        "width": s.width,
        "num_frames": s.num_frames,
        "size": f"{s.height}x{s.width}x{s.num_frames}",
        "guidance_scale": s.guidance_scale,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
    }


def load_prediction(args) -> dict | None:
    """This run's planner predictions: from --predictions if it has them, else computed here."""
    key = plan_key(args.model, args.sampling)
    if args.predictions and Path(args.predictions).exists():
        with contextlib.suppress(json.JSONDecodeError):
            found = json.loads(Path(args.predictions).read_text()).get(key)
            if found is not None:
                return found
    try:
        return predict(args.model, args.backend, args.sampling)
    except Exception as exc:  # noqa: BLE001 - measurements go on without a prediction, and say why
        return {"error": _error(exc)}


def write_predictions(args) -> int:
    """--predict FILE: the planner's predictions for each --model at the run's size, as JSON."""
    out = {}
    for model in args.model.split(","):
        s = sampling_for(model, args.height, args.width, args.frames)
        t = time.perf_counter()
        try:
            out[plan_key(model, s)] = predict(model, args.backend, s)
        except Exception as exc:  # noqa: BLE001 - one model's failure doesn't hide the other's plan
            out[plan_key(model, s)] = {"error": _error(exc)}
        print(f"planned {plan_key(model, s)} in {time.perf_counter() - t:.1f} s", flush=True)
    tmp = Path(args.predict).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.predict)  # readers never see half a file
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="contentv_8b", help="conf/model names, comma-separated: contentv_8b, ...")
    parser.add_argument("--presets", default="all", help="comma-separated conf/memory names, or all")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--height", type=int, help="default: the model's")
    parser.add_argument("--width", type=int, help="default: the model's")
    parser.add_argument("--frames", type=int, help="default: the model's")
    parser.add_argument("--steps", type=int, default=2, help="timed denoising steps (s/step is what counts)")
    parser.add_argument("--warmup", type=int, default=1, help="denoising steps run first and not timed")
    parser.add_argument("--no-decode", dest="decode", action="store_false", help="stop after denoising")
    parser.add_argument("--decode-from", help="with --no-decode: the preset whose decode this one shares")
    parser.add_argument("--out", action="append", help="results folder (repeatable); default benchmarks/results")
    parser.add_argument("--no-record", action="store_true", help="write no results file")
    parser.add_argument("--run-id", default=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    parser.add_argument("--predictions", help="planner predictions made by --predict (else planned here)")
    parser.add_argument("--predict", metavar="FILE", help="write the planner's predictions for --model and exit")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.predict:
        return write_predictions(args)

    import backends
    import demo
    from contentv.config import BackendConfig

    names = (
        [n for n in demo.group_options("memory") if n != "auto"] if args.presets == "all" else args.presets.split(",")
    )
    if "none" in names:  # the baseline first
        names = ["none"] + [n for n in names if n != "none"]
    backend = backends.build_backend(BackendConfig(name=args.backend, attention=args.attention))
    backend.setup()
    folders = [] if args.no_record else [Path(p) for p in (args.out or [ROOT / "benchmarks" / "results"])]
    done = []
    for model in args.model.split(","):  # each model with every preset
        args.model = model
        args.sampling = sampling_for(model, args.height, args.width, args.frames)
        base = base_row(args, backend)
        rows = Rows(folders, base["device"])
        prediction = load_prediction(args)
        for name in names:
            s = args.sampling
            print(
                f"[gpu_presets] {model} {s.height}x{s.width}x{s.num_frames} {name}: {args.warmup} warm-up + "
                f"{args.steps} timed steps",
                flush=True,
            )
            done.append(run_preset(name, args, backend, prediction, rows, base))
            time.sleep(0.5)
    print(format_terminal(done))
    for p in rows.paths:
        print(f"recorded in {p}")
    return 0 if all(r["status"] == "ok" for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
