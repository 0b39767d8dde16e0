"""What `torchrun` runs in tests/test_parallel.py: each parallel mode against the single-process result, on the CPU.

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node=2 tests/parallel_worker.py OUT SCENARIO...

Every rank joins one gloo process group (backends.distributed, as demo.py will), runs the scenarios in order
and writes OUT/rank<r>.json: per scenario, the max-abs difference between the parallel output and the
single-process output of the same model, inputs and seed (both computed here, fp32 unless noted), or an
error line.
Scenarios:
  sd3:<mode>      ContentV-shaped SD3Transformer3DModel forward: 7 heads, 333 text tokens, 45 video tokens
  sd3even:<mode>  the same with 8 heads, 336 text and 60 video tokens (even splits for 2 and 4 ranks)
  control:<mode>  sd3 with a wrong plan (text tokens replicated, not split): must NOT match
  npu:<mode>      sd3 in bf16 through diffusers' "_native_npu" backend on the strict torch_npu stand-in
  cog5b:<mode>    CogVideoX transformer, 5B-style (RoPE on the video tokens in attention), 7 heads, 13 text tokens
  cog2b:<mode>    CogVideoX transformer, 2B-style (sin-cos positions), 7 heads, 13 text tokens
  pipe:<mode>     the tiny ContentV pipeline, 2 denoising steps with guidance, final latents
  pipecog:<mode>  the tiny CogVideoX-5B pipeline, 2 steps with guidance, final latents
  data[:<mode>]   Runtime.run_all (contentv.parallel.data) over a 3-line prompt file x 2 seeds (files, index.json);
                  with <mode>, data-parallel groups of 2 ranks each running <mode>
  runtime:<mode>  Runtime + run_all, one prompt, one generation split across ranks (only rank 0 writes)
  model_offload:<mode>, group_offload:<mode>   the same with that memory strategy on each rank
<mode>: ulysses (all ranks, or the ranks cfg leaves), ring, cfg, cfg+ulysses, cfg+ring, ulysses_even, ring_even.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch

from backends import build_backend, distributed
from contentv import parallel
from contentv.config import BackendConfig, ModelConfig, RunConfig
from contentv.parallel.context import apply
from contentv.registry import ModelSpec, get_spec
from contentv.runtime import Runtime

TEXT_TOKENS = 333  # ContentV: 77 CLIP + 256 T5; odd, so every split of the text is uneven
HEADS = 7  # not divisible by 2 or 4: Ulysses pads heads (diffusers' ulysses_anything)


# ------------------------------------------------------------------------------------------ modes


def mode_config(mode: str, world_size: int) -> parallel.ParallelConfig:
    """`mode` ("ulysses", "ring", "cfg", "cfg+ulysses", "ulysses_even", ...) for `world_size` ranks; Ulysses or ring
    takes the ranks cfg_parallel leaves."""
    parts = set(mode.split("+"))
    cfg_parallel = "cfg" in parts
    n = world_size // (2 if cfg_parallel else 1)
    kind = next((p for p in parts if p != "cfg"), "")
    return parallel.ParallelConfig(
        ulysses_degree=n if kind.startswith("ulysses") else 1,
        ring_degree=n if kind.startswith("ring") else 1,
        cfg_parallel=cfg_parallel,
        uneven=not kind.endswith("_even"),
    )


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------------------------------ transformers


def sd3_transformer(heads: int = HEADS, text_tokens: int = TEXT_TOKENS, frames: int = 3):
    """ContentV-shaped: `heads` x 16 wide, `text_tokens` text tokens, frames x 3 x 5 video tokens, batch 2."""
    from contentv.models.contentv.transformer import SD3Transformer3DModel

    torch.manual_seed(0)
    model = SD3Transformer3DModel(
        sample_size=16,
        num_layers=2,
        attention_head_dim=16,  # the 3-D sin-cos table needs the width divisible by 16
        num_attention_heads=heads,
        joint_attention_dim=16,
        caption_projection_dim=16 * heads,
        pooled_projection_dim=8,
        qk_norm="rms_norm",
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 16, frames, 6, 10, generator=g),  # (B, C, T, H, W)
        encoder_hidden_states=torch.randn(2, text_tokens, 16, generator=g),  # uncond and cond differ
        pooled_projections=torch.randn(2, 8, generator=g),
        timestep=torch.tensor([500.0, 500.0]),
    )
    return model, inputs, get_spec("contentv")


def cog_transformer(rope: bool):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        time_embed_dim=16,
        text_embed_dim=16,
        num_layers=2,
        sample_width=10,
        sample_height=6,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=13,
        use_rotary_positional_embeddings=rope,
    ).eval()
    from contentv.attention import sdpa
    from contentv.models.cogvideox.attention import CogVideoXKernelAttnProcessor

    model.set_attn_processor(CogVideoXKernelAttnProcessor(sdpa))
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 3, 16, 6, 10, generator=g),  # (B, T, C, H, W) -> 45 video tokens
        encoder_hidden_states=torch.randn(2, 13, 16, generator=g),
        timestep=torch.tensor([500, 500]),
        image_rotary_emb=get_3d_rotary_pos_embed(16, ((0, 0), (3, 5)), (3, 5), 3) if rope else None,
    )
    return model, inputs, get_spec("cogvideox")


def run_transformer(
    build, mode: str, world: parallel.World, dtype: torch.dtype = torch.float32, spec: ModelSpec | None = None
) -> dict:
    model, inputs, family_spec = build()
    spec = spec or family_spec
    family = spec.family
    model.to(dtype)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    if family == "contentv":
        from contentv.attention import sdpa
        from contentv.models.contentv.attention import ContentVJointAttnProcessor

        model.set_attn_processor(ContentVJointAttnProcessor(sdpa))
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    model = copy.deepcopy(model)

    class Pipe:  # contentv.parallel.context.apply looks at pipe.transformer only
        transformer = model

    applied = apply(Pipe, mode_config(mode, world.size), spec, world)
    if applied.kernel is not None:
        from contentv.models.cogvideox.attention import CogVideoXKernelAttnProcessor
        from contentv.models.contentv.attention import ContentVJointAttnProcessor

        processor = ContentVJointAttnProcessor if family == "contentv" else CogVideoXKernelAttnProcessor
        model.set_attn_processor(processor(applied.kernel))
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return {"max_abs": max_abs(out, ref), "ref_abs": float(ref.abs().max()), "record": applied.record}


# ------------------------------------------------------------------------------------------ pipelines


def tiny_model(name: str) -> ModelConfig:
    family = "contentv" if name == "tiny_contentv" else "cogvideox"
    model = ModelConfig(name=name, family=family, path=None, tiny=True, dtype="float32")
    # small videos: 48x80 pixels, 5 frames (2 latent frames), 1-2 steps
    model.sampling_defaults.update(height=48, width=80, num_frames=5, num_inference_steps=2, fps=8)
    return model


def run_pipeline(model_name: str, mode: str, world: parallel.World) -> dict:
    from contentv.attention import sdpa
    from contentv.registry import get_spec

    model = tiny_model(model_name)
    spec = get_spec(model.family)
    pipe = spec.load(model, spec.resolve_path(model))
    spec.install_attention(pipe, sdpa)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt="a red fox in the snow",
        negative_prompt="blurry",
        height=48,
        width=80,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=6.0,
        output_type="latent",
    )

    def generate():
        with torch.no_grad():
            return pipe(**kwargs, generator=torch.Generator().manual_seed(42)).frames

    ref = generate()
    applied = apply(pipe, mode_config(mode, world.size), spec, world)
    if applied.kernel is not None:
        spec.install_attention(pipe, applied.kernel)
    out = generate()
    return {"max_abs": max_abs(out, ref), "ref_abs": float(ref.abs().max()), "record": applied.record}


def run_npu_standin(mode: str, world: parallel.World) -> dict:
    """The NPU attention backend's path under Ulysses: diffusers' `_native_npu` calls npu_fusion_attention
    (here the strict stand-in: real signature, layout, head count and dtype checks) on the local heads."""
    import functools

    import pytest
    from diffusers.models import attention_dispatch

    from backends.npu import NPUBackend
    from tests.npu_standin import StandIn

    # Only the op: installing the whole stand-in registers an "npu" device type for the rest of this process,
    # after which gloo's barrier asks for that accelerator. diffusers imports npu_fusion_attention only when
    # torch_npu is installed; the stand-in's takes its place.
    standin = StandIn()
    standin.is_on_device = lambda tensor: tensor.device.type == "cpu"  # no npu device here: CPU tensors stand in
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(attention_dispatch, "npu_fusion_attention", standin.npu_fusion_attention, raising=False)
    # The NPU backend's own choice of attention for context parallelism (it needs no device to choose).
    chooser = types.SimpleNamespace(cfg=BackendConfig(name="npu", attention="npu_fusion"))
    monkeypatch.setattr(world, "attention", functools.partial(NPUBackend.context_parallel_attention, chooser))
    try:
        result = run_transformer(sd3_transformer, mode, world, dtype=torch.bfloat16)
    finally:
        monkeypatch.undo()
    calls = [c for op, c in standin.calls if op == "npu_fusion_attention"]
    result.update(
        tolerance=3e-2,  # bf16: the stand-in computes in fp32 and rounds once, SDPA in bf16 rounds differently
        npu_calls=len(calls),
        npu_call=calls[0] if calls else None,
    )
    return result


def run_data(out_dir: Path, world: parallel.World, mode: str | None, backend) -> dict:
    """Data parallel (with `mode` inside each group of 2, if given): 3 prompts x 2 seeds, 1 step each."""
    folder = out_dir / f"data-{mode or 'dp'}"
    prompt_file = out_dir / "prompts.txt"
    if world.rank == 0:
        prompt_file.write_text("# three prompts\na red fox\na blue whale\na green frog\n")
    world.barrier()
    par = mode_config(mode, 2) if mode else parallel.ParallelConfig()
    par.seeds = [1, 2]
    cfg = RunConfig(model=tiny_model("tiny_contentv"), parallel=par)
    cfg.backend = BackendConfig(name="cpu")
    cfg.sampling.prompt_file = str(prompt_file)
    cfg.sampling.num_inference_steps = 1
    cfg.output.dir = str(folder if world.rank == 0 else out_dir / f"elsewhere{world.rank}")  # as Hydra's per-rank dirs
    results = Runtime(backend, world=world).run_all(cfg)  # the entry point's call
    return {
        "mine": [(r.sampling.prompt, r.sampling.seed, r.video.name if r.video else None) for r in results],
        "files": sorted(p.name for p in folder.iterdir()) if folder.exists() else [],
        "index": json.loads((folder / "index.json").read_text()) if (folder / "index.json").exists() else None,
        "stray": (out_dir / f"elsewhere{world.rank}").exists(),  # nothing may land in a non-broadcast folder
    }


def run_runtime(out_dir: Path, world: parallel.World, mode: str, backend, memory: str = "none") -> dict:
    """One generation across all ranks through Runtime (with a memory strategy: none, model_offload or
    group_offload, applied after the parallel hooks); its frames against a single-process Runtime's."""
    folder = out_dir / f"runtime-{memory}-{mode}"
    cfg = RunConfig(model=tiny_model("tiny_contentv"), parallel=mode_config(mode, world.size))
    cfg.backend = BackendConfig(name="cpu")
    cfg.memory.name = memory
    cfg.memory.model_cpu_offload = memory == "model_offload"
    cfg.memory.group_offload = memory == "group_offload"
    cfg.sampling.prompt = "a red fox in the snow"
    cfg.output.dir = str(folder if world.rank == 0 else out_dir / f"elsewhere{world.rank}")
    results = Runtime(backend, world=world).run_all(cfg)  # the entry point's call
    single = Runtime(backend).generate(dataclasses.replace(cfg, parallel=parallel.ParallelConfig()))  # one process
    return {
        "max_abs": max_abs(torch.from_numpy(results[0].frames), torch.from_numpy(single.frames)),
        "ref_abs": 1.0,
        "wrote": results[0].video is not None,
        "prepared": {k: results[0].prepared.get(k) for k in ("attention_kernel", "parallel", "placement")},
        "files": sorted(p.name for p in folder.iterdir()) if folder.exists() else [],
        "stray": (out_dir / f"elsewhere{world.rank}").exists(),
    }


# ------------------------------------------------------------------------------------------ main


def run_wrong_plan(mode: str, world: parallel.World) -> dict:
    """A wrong plan (text tokens not split): the comparison must catch it."""
    right = get_spec("contentv")
    wrong = dataclasses.replace(
        right, cp_plan=lambda r=right: {k: v for k, v in r.cp_plan().items() if k != "context_embedder"}
    )
    return run_transformer(sd3_transformer, mode, world, spec=wrong)


# Scenario kind (before the ":" of a scenario) -> its run(mode, world, out, backend), returning this rank's result.
SCENARIOS = {
    "sd3": lambda mode, world, out, backend: run_transformer(sd3_transformer, mode, world),
    # 8 heads, 336 text and 60 video tokens: even splits for 2 and 4 ranks
    "sd3even": lambda mode, world, out, backend: run_transformer(
        lambda: sd3_transformer(heads=8, text_tokens=336, frames=4), mode, world
    ),
    "control": lambda mode, world, out, backend: run_wrong_plan(mode, world),
    # Ulysses through diffusers' "_native_npu" on the strict torch_npu stand-in, bf16
    "npu": lambda mode, world, out, backend: run_npu_standin(mode, world),
    "cog5b": lambda mode, world, out, backend: run_transformer(lambda: cog_transformer(rope=True), mode, world),
    "cog2b": lambda mode, world, out, backend: run_transformer(lambda: cog_transformer(rope=False), mode, world),
    "pipe": lambda mode, world, out, backend: run_pipeline("tiny_contentv", mode, world),
    "pipecog": lambda mode, world, out, backend: run_pipeline("tiny_cogvideox_5b", mode, world),
    "data": lambda mode, world, out, backend: run_data(out, world, mode or None, backend),
    "runtime": lambda mode, world, out, backend: run_runtime(out, world, mode, backend),
    "model_offload": lambda mode, world, out, backend: run_runtime(out, world, mode, backend, memory="model_offload"),
    "group_offload": lambda mode, world, out, backend: run_runtime(out, world, mode, backend, memory="group_offload"),
}


def main(out_dir: str, scenarios: list[str]) -> int:
    torch.set_num_threads(1)
    out = Path(out_dir)
    cfg = BackendConfig(name="cpu")
    distributed.configure(cfg)
    backend = build_backend(cfg)
    backend.setup()
    world = distributed.init_world(backend)
    results: dict = {"rank": world.rank, "world_size": world.size, "scenarios": {}}
    for scenario in scenarios:
        kind, _, mode = scenario.partition(":")
        start = time.perf_counter()
        try:
            run = SCENARIOS.get(kind)
            if run is None:
                raise ValueError(f"unknown scenario {scenario}")
            result = run(mode, world, out, backend)
        except Exception as exc:  # noqa: BLE001 - reported per scenario; a hang would be worse than going on
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        world.barrier()
        result["seconds"] = round(time.perf_counter() - start, 2)
        results["scenarios"][scenario] = result
    (out / f"rank{world.rank}.json").write_text(json.dumps(results, indent=1, default=str))
    distributed.destroy()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
