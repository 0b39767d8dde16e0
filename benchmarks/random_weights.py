"""Full-size pipelines with random weights, fast: built from the published configs on the meta device,
allocated in their load dtypes and filled in place (no download, no checkpoint round trip).

Speed and memory don't depend on weight values, so benchmarks/gpu_presets.py measures these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Random values are drawn once per dtype and tiled over every tensor: drawing 14e9 normals on the host takes
# minutes, copying takes seconds. Values don't change speed or memory; they only have to be finite and nonzero.
POOL = 1 << 22


def _keep_fp32(module: nn.Module, dtype: torch.dtype):
    """The loaders' float32 rule (as contentv.planner.weights counts it): diffusers keeps its
    `_keep_in_fp32_modules` in float32 at any dtype, transformers its `_strict` list at fp16/bf16."""
    if type(module).__module__.startswith("transformers."):
        names = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
        return lambda key: dtype != torch.float32 and any(n in key for n in names)
    names = set(getattr(type(module), "_keep_in_fp32_modules", None) or ())
    return lambda key: any(n in key.split(".") for n in names)


def materialize(module: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0) -> int:
    """Allocate a meta-device `module` on `device` in its load dtype and fill it with random numbers in place.

    Returns the bytes of its unique parameters and buffers."""
    keep = _keep_fp32(module, dtype)
    nn.Module.to(module, dtype)  # on meta: no memory (diffusers' own .to() would warn about float32 modules)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if keep(name) and t.is_floating_point():
            t.data = t.data.float()
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    pools: dict[torch.dtype, torch.Tensor] = {}

    def fill(t: torch.Tensor) -> None:
        if t.dtype not in pools:
            pools[t.dtype] = torch.empty(POOL, dtype=t.dtype, device=device).normal_(0.0, 0.02, generator=gen)
        pool, flat = pools[t.dtype], t.view(-1)
        rows = flat.numel() // POOL
        if rows:  # one multithreaded copy for the bulk
            flat[: rows * POOL].view(rows, POOL).copy_(pool.expand(rows, POOL))
        rest = flat.numel() - rows * POOL
        flat[rows * POOL :].copy_(pool[:rest])

    seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                fill(p) if p.is_floating_point() else p.zero_()
                total += p.numel() * p.element_size()
        for bname, b in module.named_buffers():
            if bname.endswith("position_ids"):  # CLIP's (1, 77) index buffer
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            elif b.is_floating_point() and "pos_embedding" in bname:  # CogVideoX-2B-style sin-cos table
                fill(b)
            else:
                b.zero_()
            total += b.numel() * b.element_size()
    return total


def random_pipeline(cfg, seed: int = 0) -> tuple[Any, int]:
    """(pipeline of model config `cfg` with random weights from its configs, on the host; its weight bytes)."""
    from contentv.registry import get_spec
    from contentv.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    spec = get_spec(cfg.family)
    parts: dict[str, Any] = {}
    total = 0
    for i, (name, (module, dtype)) in enumerate(spec.components_on_meta(cfg, spec.resolve_path(cfg)).items()):
        total += materialize(module, dtype, "cpu", seed + i)
        parts[name] = module.eval()
    # Token ids only need to be in range: text content doesn't change speed or memory (prompts are padded).
    if cfg.family == "contentv":
        from diffusers import FlowMatchEulerDiscreteScheduler

        from contentv.models.contentv.pipeline import ContentVPipeline

        parts.update(
            tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(), tokenizer_3=tiny_t5_tokenizer()
        )
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        return ContentVPipeline(**parts), total
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
    return CogVideoXRuntimePipeline(**parts), total


def decode(pipe, latents: torch.Tensor):
    """The pipeline's own decode of final latents to frames (B, F, H, W, 3), as its __call__ does it."""
    import inspect

    with torch.no_grad():
        if "output_type" in inspect.signature(pipe.decode_latents).parameters:  # ContentV
            return pipe.decode_latents(latents, "np")
        video = pipe.decode_latents(latents.to(pipe.vae.dtype))  # CogVideoX
        return pipe.video_processor.postprocess_video(video=video, output_type="np")
