"""CogVideoX text-to-video: diffusers' `CogVideoXPipeline` plus the runtime's call arguments.

`__call__` is adapted from diffusers 0.42 `pipelines/cogvideo/pipeline_cogvideox.py`; prompt encoding,
latent preparation, RoPE tables, scheduler arguments and VAE decoding are inherited unchanged, so a
default call gives diffusers' output. Differences: guidance can also run sequentially (two forwards per
step instead of one of batch 2), stages can be observed (`stage_context`), `_interrupt` raises
`GenerationCancelled` instead of silently skipping the remaining steps, the backend's execution device
and text-encoder placement are honoured, embeddings are cast to the transformer's dtype and latents to
the VAE's (no-ops when the dtypes agree, as in diffusers), a prompt longer than
`max_sequence_length` T5 tokens is reported with its length before it is truncated, a frame count the
VAE would not return (13 -> 16) is refused, and `num_videos_per_prompt` is honoured (diffusers: one video).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps
from diffusers.pipelines.cogvideo.pipeline_output import CogVideoXPipelineOutput
from transformers import T5EncoderModel, T5TokenizerFast

from contentv import guidance
from contentv.errors import GenerationCancelled
from contentv.memory_policy import PIPELINE_GUIDANCE_MODES
from contentv.models.cogvideox import decoded_frames, frames_rule_text
from contentv.models.common import (
    DiffusersName,
    RuntimePlacement,
    StageContext,
    load_parts,
    load_scheduler,
    null_stage,
    parse_load_args,
)

log = logging.getLogger(__name__)

# Subfolders of a CogVideoX checkpoint, each loaded by its own class (model_index.json is not trusted).
COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
# The schedulers CogVideoX checkpoints ship (2B: DDIM; DPM is the one diffusers suggests for 5B); any diffusers
# scheduler a folder names loads, as in diffusers.
SCHEDULERS = {"CogVideoXDDIMScheduler": CogVideoXDDIMScheduler, "CogVideoXDPMScheduler": CogVideoXDPMScheduler}


class CogVideoXRuntimePipeline(DiffusersName, RuntimePlacement, CogVideoXPipeline):
    """Text-to-video with CogVideoX-2B/5B. Use like diffusers' `CogVideoXPipeline`:

    >>> pipe = CogVideoXRuntimePipeline.from_pretrained("THUDM/CogVideoX-2b", torch_dtype=torch.float16)
    >>> frames = pipe(prompt="a cat", generator=torch.Generator().manual_seed(42), output_type="np").frames[0]
    """

    # model_index.json names diffusers' class: DiffusionPipeline.from_pretrained loads a saved folder.
    diffusers_class_name = "CogVideoXPipeline"

    def __init__(
        self,
        tokenizer: T5TokenizerFast,
        text_encoder: T5EncoderModel,
        vae: AutoencoderKLCogVideoX,
        transformer: CogVideoXTransformer3DModel,
        scheduler: CogVideoXDDIMScheduler | CogVideoXDPMScheduler,
    ):
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
        vae_dtype: torch.dtype | None = None,
        text_encoder_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> CogVideoXRuntimePipeline:
        """Load a CogVideoX checkpoint (local diffusers-layout folder or hub id), one component per subfolder.

        Arguments as diffusers' `CogVideoXPipeline.from_pretrained`: `torch_dtype` (or `dtype`) is one dtype for
        every component or a dict per component with a "default" ({"transformer": torch.bfloat16, "default":
        torch.float16}); `vae_dtype` / `text_encoder_dtype` override it for those. `variant`, `revision`,
        `local_files_only`, `cache_dir`, `token`, `force_download`, `proxies`, `device_map` (one device),
        `max_memory`, `offload_folder` go to the components' loaders; components passed by name
        (`transformer=...`) are used as given. The scheduler is the diffusers class named in
        scheduler/scheduler_config.json. Safetensors only: pickle weights are refused with the command that
        converts them; missing files raise an OSError naming the component.
        """
        path = str(pretrained_model_name_or_path)
        args = parse_load_args(cls.__name__, path, COMPONENTS, torch_dtype, kwargs)
        hub = args.hub
        loaders: dict[str, Callable[[], Any]] = {
            "tokenizer": lambda: T5TokenizerFast.from_pretrained(path, subfolder="tokenizer", **hub),
            "text_encoder": lambda: T5EncoderModel.from_pretrained(
                path, **args.model_kwargs("text_encoder", text_encoder_dtype)
            ),
            "vae": lambda: AutoencoderKLCogVideoX.from_pretrained(path, **args.model_kwargs("vae", vae_dtype)),
            "transformer": lambda: CogVideoXTransformer3DModel.from_pretrained(
                path, **args.model_kwargs("transformer")
            ),
            "scheduler": lambda: load_scheduler(path, hub),
        }
        # A failing component is one line naming the folder and the component (contentv.checkpoint).
        return cls(**load_parts(args, loaders))

    # ---------------------------------------------------------------- helpers

    def check_runtime_inputs(self, guidance_mode: str, text_len: int) -> None:
        """Raise ValueError for the arguments diffusers' check_inputs does not cover."""
        if guidance_mode not in PIPELINE_GUIDANCE_MODES:
            raise ValueError(f"guidance_mode={guidance_mode!r}: must be one of {', '.join(PIPELINE_GUIDANCE_MODES)}")
        cfg = self.transformer.config
        # 2B-style sin-cos: the patch embedding's joint position table has exactly max_text_seq_length
        # text slots before the video tokens, so any other text length fails to broadcast.
        if not cfg.use_rotary_positional_embeddings and text_len != cfg.max_text_seq_length:
            raise ValueError(
                f"max_sequence_length={text_len}: this transformer (sin-cos positions) takes exactly "
                f"{cfg.max_text_seq_length} text tokens"
            )

    def warn_if_truncated(self, name: str, text: str | list[str] | None, max_sequence_length: int) -> None:
        """Log a warning for each text longer than `max_sequence_length` T5 tokens (counting </s>)."""
        if text is None:
            return
        for t in [text] if isinstance(text, str) else text:
            n = len(self.tokenizer(t, add_special_tokens=True, verbose=False).input_ids)
            if n > max_sequence_length:
                log.warning(
                    "%s is %d T5 tokens, over the %d-token limit (max_sequence_length): truncated to its first "
                    "%d tokens and </s>",
                    name,
                    n,
                    max_sequence_length,
                    max_sequence_length - 1,
                )

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
        attention_kwargs: dict[str, Any] | None,
        guidance_mode: str,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(unconditional, conditional) predictions in fp32; unconditional is None without guidance.

        latents (B, T, C, h, w); cond/uncond (B, St, 4096). "batched" is diffusers' single forward on
        [uncond, cond]; "sequential" runs them one after the other (half the activation memory).
        """

        def forward(x: torch.Tensor, inputs: Sequence[torch.Tensor], context: str) -> torch.Tensor:
            with self.transformer.cache_context(context):
                out = self.transformer(
                    hidden_states=x,
                    encoder_hidden_states=inputs[0],
                    timestep=t.expand(x.shape[0]),
                    image_rotary_emb=image_rotary_emb,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                )[0]
            return out.float()

        x = self.scheduler.scale_model_input(latents, t)
        return guidance.predictions(forward, x, [cond], None if uncond is None else [uncond], guidance_mode)

    # ---------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(  # noqa: C901 - kept close to diffusers' CogVideoXPipeline.__call__ to diff against upstream
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 6,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 226,
        *,
        guidance_mode: str = "batched",
        stage_context: StageContext | None = None,
    ) -> CogVideoXPipelineOutput | tuple:
        """Generate videos; arguments as diffusers' `CogVideoXPipeline.__call__` (same order), plus, keyword-only:

        `guidance_mode`: "batched" (diffusers': one forward of batch 2 per step) or "sequential" (two
        forwards per step; same result within rounding, less activation memory). `stage_context(name)`
        wraps the stages "text_encoding", "denoising" and "decoding" (timing, memory statistics). Setting
        `pipe._interrupt = True` from a step callback stops at the end of that step and raises
        `GenerationCancelled`. Returns `CogVideoXPipelineOutput(frames=...)`: (B, F, H, W, 3) in [0, 1]
        for "np", lists of PIL images for "pil", latents (B, T, C, H/8, W/8) for "latent".
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        stage = stage_context or null_stage

        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        num_frames = num_frames or self.transformer.config.sample_frames
        # diffusers returns another length here (13 frames -> 16) and one video whatever num_videos_per_prompt says:
        # a frame count the VAE can't return is refused (the command line's line), and num_videos_per_prompt honoured.
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r}: must be an integer >= 1 (of the form 8k+1, e.g. 49)")
        if decoded_frames(num_frames) != num_frames:
            raise ValueError(f"num_frames={num_frames} is not valid: {frames_rule_text(num_frames)}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt={num_videos_per_prompt!r}: must be an integer >= 1")

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            callback_on_step_end_tensor_inputs,
            prompt_embeds,
            negative_prompt_embeds,
        )
        self.check_runtime_inputs(
            guidance_mode, prompt_embeds.shape[1] if prompt_embeds is not None else max_sequence_length
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        # 2. Default call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0

        # 3. Encode input prompt (where the placement says), then move to the denoising device and dtype
        self.warn_if_truncated("prompt", prompt, max_sequence_length)
        if do_classifier_free_guidance:
            self.warn_if_truncated("negative_prompt", negative_prompt, max_sequence_length)
        with stage("text_encoding"), self._text_encoding_device(device) as te_device:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt,
                negative_prompt,
                do_classifier_free_guidance,
                num_videos_per_prompt=num_videos_per_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                max_sequence_length=max_sequence_length,
                device=te_device,
            )
            dtype = self.transformer.dtype
            # Embeddings passed in come once per prompt: one copy per video, as the encoded ones are.
            copies = batch_size * num_videos_per_prompt // prompt_embeds.shape[0]
            prompt_embeds = prompt_embeds.repeat_interleave(copies, 0).to(device=device, dtype=dtype)  # (B, St, 4096)
            if do_classifier_free_guidance:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(
                    batch_size * num_videos_per_prompt // negative_prompt_embeds.shape[0], 0
                ).to(device=device, dtype=dtype)

        with stage("denoising"):
            # 4. Prepare timesteps
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)
            self._num_timesteps = len(timesteps)

            # 5. Prepare latents (B, T, C, H/8, W/8)
            latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
            # For CogVideoX 1.5, the latent frames are padded to a multiple of patch_size_t
            patch_size_t = self.transformer.config.patch_size_t
            additional_frames = 0
            if patch_size_t is not None and latent_frames % patch_size_t != 0:
                additional_frames = patch_size_t - latent_frames % patch_size_t
                num_frames += additional_frames * self.vae_scale_factor_temporal
            latents = self.prepare_latents(
                batch_size * num_videos_per_prompt,
                self.transformer.config.in_channels,
                num_frames,
                height,
                width,
                prompt_embeds.dtype,
                device,
                generator,
                latents,
            )

            # 6. Prepare extra step kwargs (eta; the DPM scheduler's generator)
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

            # 7. Rotary embeddings (5B-style) or None (2B-style sin-cos, added in the patch embedding)
            image_rotary_emb = (
                self._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)
                if self.transformer.config.use_rotary_positional_embeddings
                else None
            )

            # 8. Denoising loop
            num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                old_pred_original_sample = None  # for DPM-solver++
                for i, t in enumerate(timesteps):
                    self._current_timestep = t
                    noise_pred_uncond, noise_pred = self.predict_noise(
                        latents,
                        t,
                        prompt_embeds,
                        negative_prompt_embeds if do_classifier_free_guidance else None,
                        image_rotary_emb,
                        attention_kwargs,
                        guidance_mode,
                    )

                    # perform guidance
                    if use_dynamic_cfg:
                        self._guidance_scale = 1 + guidance_scale * (
                            (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0))
                            / 2
                        )
                    if do_classifier_free_guidance:
                        noise_pred = guidance.combine(noise_pred_uncond, noise_pred, self.guidance_scale)

                    # compute the previous noisy sample x_t -> x_t-1
                    if not isinstance(self.scheduler, CogVideoXDPMScheduler):
                        latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    else:
                        latents, old_pred_original_sample = self.scheduler.step(
                            noise_pred,
                            old_pred_original_sample,
                            t,
                            timesteps[i - 1] if i > 0 else None,
                            latents,
                            **extra_step_kwargs,
                            return_dict=False,
                        )
                    latents = latents.to(prompt_embeds.dtype)

                    if callback_on_step_end is not None:
                        local = {
                            "latents": latents,
                            "prompt_embeds": prompt_embeds,
                            "negative_prompt_embeds": negative_prompt_embeds,
                        }
                        callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                        progress_bar.update()

                    if self.interrupt:
                        self._current_timestep = None
                        self.maybe_free_model_hooks()
                        raise GenerationCancelled(f"cancelled after step {i + 1} of {len(timesteps)}")
            self._current_timestep = None

        if output_type == "latent":
            video = latents
        else:
            with stage("decoding"):
                # Discard any padding frames that were added for CogVideoX 1.5
                latents = latents[:, additional_frames:]
                video = self.decode_latents(latents.to(self.vae.dtype))  # (B, 3, F, H, W) in [-1, 1]
                video = self.video_processor.postprocess_video(video=video, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video,)
        return CogVideoXPipelineOutput(frames=video)
