"""GPU benchmark: full-size random-weight ContentV-8B / CogVideoX-5B under every memory preset (PERFORMANCE.md).

Speed and memory don't depend on weight values, so the model is built from its published configs
on the meta device and filled with random numbers (no download). For each preset: seconds per
denoising step, total time, peak device memory, peak host RSS, achieved TFLOP/s against the
989 TFLOP/s bf16 spec of an H100, and the time ratio against everything resident.
One JSON object per preset is appended to benchmarks/results/gpu_<device>.jsonl and a table printed.

    python benchmarks/gpu_presets.py                         # ContentV-8B, all presets, 432x768x125, 4 timed steps
    python benchmarks/gpu_presets.py --model cogvideox_5b    # CogVideoX-5B, 720x480x49
    python benchmarks/gpu_presets.py --presets none,low_vram_24g --steps 8
    python benchmarks/gpu_presets.py --model tiny_contentv --backend cpu --steps 1 --no-record   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H100_BF16_FLOPS = 989e12


def load_preset(name: str):
    """conf/memory/<name>.yaml as the command line composes it."""
    import demo

    return demo.load_presets(("memory",)).memories[name]


def load_model(name: str):
    """conf/model/<name>.yaml as the command line composes it."""
    import demo

    return demo.load_presets(("model",)).models[name]


def random_pipeline(model: str, seed: int = 0):
    """The model's pipeline with random weights from its configs (full-size or tiny), on the CPU."""
    from contentv.registry import get_spec
    from contentv.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    cfg = load_model(model)
    spec = get_spec(cfg.family)
    torch.manual_seed(seed)
    parts = {}
    for name, (module, dtype) in spec.components_on_meta(cfg, spec.resolve_path(cfg)).items():
        module = module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.02)
            for bname, b in module.named_buffers():
                if bname.endswith("position_ids"):  # CLIP's (1, 77) index buffer
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
                elif b.is_floating_point() and "pos_embedding" in bname:  # CogVideoX's sin-cos table
                    b.normal_(0.0, 0.02)
                else:
                    b.zero_()
        parts[name] = module.to(dtype).eval()
    # Token ids only need to be in range: text content doesn't change speed or memory.
    if cfg.family == "contentv":
        from diffusers import FlowMatchEulerDiscreteScheduler

        from contentv.models.contentv.pipeline import ContentVPipeline

        parts.update(
            tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(), tokenizer_3=tiny_t5_tokenizer()
        )
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        return cfg, ContentVPipeline(**parts)
    from diffusers import CogVideoXDPMScheduler

    from contentv.models.cogvideox.pipeline import CogVideoXRuntimePipeline

    parts["tokenizer"] = tiny_t5_tokenizer()
    parts["scheduler"] = CogVideoXDPMScheduler(
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    return cfg, CogVideoXRuntimePipeline(**parts)


def flops_per_step(pipe, tokens: int, guidance_passes: int = 2) -> float:
    """PERFORMANCE.md's count: linear layers 24*d^2*N and attention 4*N^2*d per block and pass."""
    c = pipe.transformer.config
    d, layers = c.num_attention_heads * c.attention_head_dim, c.num_layers
    return guidance_passes * layers * (24 * d * d * tokens + 4 * tokens * tokens * d)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="contentv_8b", help="conf/model name: contentv_8b, cogvideox_5b, tiny_*")
    parser.add_argument("--presets", default="all", help="comma-separated conf/memory names, or all")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--height", type=int, help="default: the model's")
    parser.add_argument("--width", type=int, help="default: the model's")
    parser.add_argument("--frames", type=int, help="default: the model's")
    parser.add_argument("--steps", type=int, default=4, help="timed denoising steps (per-step time is what counts)")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import backends
    import demo
    from contentv.config import BackendConfig, SamplingConfig, resolve_sampling
    from contentv.memory_policy import guidance_mode
    from contentv.registry import get_spec
    from contentv.runtime import library_versions
    from contentv.stats import StageRecorder

    defaults = resolve_sampling(SamplingConfig(), load_model(args.model))
    args.height = args.height or defaults.height
    args.width = args.width or defaults.width
    args.frames = args.frames or defaults.num_frames
    names = (
        [n for n in demo.group_options("memory") if n != "auto"] if args.presets == "all" else args.presets.split(",")
    )
    if "none" in names:  # the baseline first
        names = ["none"] + [n for n in names if n != "none"]
    backend = backends.build_backend(BackendConfig(name=args.backend, attention=args.attention))
    backend.setup()
    device_name = backend.describe().get("name", str(backend.device))
    text_tokens = 333 if load_model(args.model).family == "contentv" else 226
    tokens = ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16) + text_tokens
    rows = []
    for name in names:
        memory = load_preset(name)
        model_cfg, pipe = random_pipeline(args.model)
        spec = get_spec(model_cfg.family)
        pipe.set_progress_bar_config(disable=True)
        recorder = StageRecorder(backend)
        row = {"benchmark": "gpu_presets", "profile": name, "memory": dataclasses.asdict(memory)}
        try:
            with recorder.stage("load"):
                prepared = backend.prepare(pipe, memory, spec)
            out = pipe(
                prompt="a red fox walks in snow",
                negative_prompt="low quality",
                height=args.height,
                width=args.width,
                num_frames=args.frames,
                num_inference_steps=args.steps,
                guidance_mode=guidance_mode(memory, backend.batched_guidance),
                generator=torch.Generator().manual_seed(0),
                output_type="np",
                stage_context=recorder.stage,
            )
            assert out.frames.shape[1] == args.frames
            stages = recorder.as_dict()
            per_step = stages["denoising"]["seconds"] / args.steps
            row.update(
                status="ok",
                prepared=prepared,
                stages=stages,
                seconds_per_step=round(per_step, 4),
                total_s=round(sum(v["seconds"] for v in stages.values()), 3),
                total_50_steps_s=round(
                    sum(v["seconds"] for k, v in stages.items() if k != "denoising") + 50 * per_step, 2
                ),
                peak_device_bytes=max((v["peak_device_bytes"] or 0) for v in stages.values()) or None,
                peak_host_rss_bytes=max(v["peak_host_rss_bytes"] for v in stages.values()),
                tflops=round(flops_per_step(pipe, tokens) / per_step / 1e12, 1),
            )
        except Exception as exc:  # noqa: BLE001 - a preset that fails (e.g. OOM) is recorded, the rest go on
            row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        row.update(
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            device=device_name,
            versions=library_versions(),
            model=f"{args.model} random weights",
            size=f"{args.height}x{args.width}x{args.frames}, bf16, {args.steps} timed steps",
        )
        rows.append(row)
        del pipe
        gc.collect()
        backend.empty_cache()
        time.sleep(1)

    base = next((r for r in rows if r["profile"] == "none" and r["status"] == "ok"), None)
    print(f"{'profile':20s} {'s/step':>8s} {'vs none':>8s} {'peak GiB':>9s} {'host GiB':>9s} {'TFLOP/s':>8s}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['profile']:20s} failed: {r['error']}")
            continue
        r["ratio_vs_none"] = round(r["seconds_per_step"] / base["seconds_per_step"], 3) if base else None
        r["ratio_total_vs_none"] = round(r["total_50_steps_s"] / base["total_50_steps_s"], 3) if base else None
        peak = (r["peak_device_bytes"] or 0) / 2**30
        print(
            f"{r['profile']:20s} {r['seconds_per_step']:8.3f} {r['ratio_vs_none'] or float('nan'):8.2f} "
            f"{peak:9.2f} {r['peak_host_rss_bytes'] / 2**30:9.2f} {r['tflops']:8.1f}"
        )
    if not args.no_record:
        slug = "".join(c if c.isalnum() else "_" for c in device_name).strip("_").lower()
        path = ROOT / "benchmarks" / "results" / f"gpu_{slug}.jsonl"
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
        print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
