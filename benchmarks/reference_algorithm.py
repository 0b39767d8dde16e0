"""The reference ContentV sampling algorithm written out plainly (bytedance/ContentV's loop).

SD3 prompt encoding, latents from a CPU generator, sigmas = linspace(1, 0, steps + 1)[:-1] into the
flow-matching Euler scheduler, two transformer forwards per step (conditional first), then
uncond + g * (cond - uncond), and the VAE decode `latents / (1 / std) + mean` in the VAE's dtype.
Used as the yardstick by tests/test_pipeline.py and benchmarks/cpu_reference.py.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def reference_generate(pipe, prompt, negative_prompt, height, width, num_frames, steps, guidance_scale, seed):
    """Returns (final latents, frames as (B, F, H, W, 3) float numpy)."""
    device = pipe._execution_device
    pe, npe, pp, npp = pipe.encode_prompt(
        prompt=prompt,
        prompt_2=None,
        prompt_3=None,
        negative_prompt=negative_prompt,
        do_classifier_free_guidance=True,
        device=device,
        max_sequence_length=256,
    )
    g = torch.Generator().manual_seed(seed)
    shape = (1, pipe.transformer.config.in_channels, (num_frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(shape, generator=g, dtype=pe.dtype).to(device)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=device)
    for t in pipe.scheduler.timesteps:
        ts = t.expand(1)
        cond = pipe.transformer(latents, pe, pp, ts, return_dict=False)[0]
        uncond = pipe.transformer(latents, npe, npp, ts, return_dict=False)[0]
        latents = pipe.scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents, return_dict=False)[0]
    cfg = pipe.vae.config
    x = latents.to(pipe.vae.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(x.device, x.dtype)
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(x.device, x.dtype)
    video = pipe.vae.decode(x / inv_std + mean, return_dict=False)[0]
    return latents, pipe.video_processor.postprocess_video(video, output_type="np")
