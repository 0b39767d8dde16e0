"""ContentV text-to-video pipeline: SD3 prompt encoding, a video latent, flow-matching Euler, Wan VAE.

Adapted from diffusers' `pipeline_stable_diffusion_3.py` and `pipeline_wan.py` (prompt encoding is
inherited from `StableDiffusion3Pipeline` unchanged). Differences from the reference ContentV
pipeline: guidance can run batched (one forward of batch 2) or sequential (the reference's two
forwards), invalid sizes are an error rather than silently rounded, and stages can be observed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from contentv import guidance
from contentv.errors import GenerationCancelled
from contentv.memory_policy import PIPELINE_GUIDANCE_MODES
from contentv.models.common import (
    RuntimePlacement,
    StageContext,
    load_parts,
    load_scheduler,
    null_stage,
    parse_load_args,
)
from contentv.models.contentv.transformer import SD3Transformer3DModel

if TYPE_CHECKING:
    import PIL.Image

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
# Subfolders of a ContentV checkpoint, each loaded by its own class (model_index.json is not trusted).
COMPONENTS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
)


@dataclass
class ContentVPipelineOutput(BaseOutput):
    """`frames`: (B, F, H, W, 3) in [0, 1] for "np", (B, F, 3, H, W) for "pt", lists of PIL images for
    "pil", or the final latents (B, 16, T, H/8, W/8) for "latent"."""

    frames: Any


def check_sequence_length(max_sequence_length: object) -> None:
    """T5 tokens: 1..512, as SD3's pipeline and the reference refuse more (ValueError otherwise)."""
    if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
        raise ValueError(f"max_sequence_length={max_sequence_length!r} is not valid: an integer in 1..512")


class ContentVPipeline(RuntimePlacement, StableDiffusion3Pipeline):
    """Text-to-video with ContentV-8B. Use like any diffusers pipeline:

    >>> pipe = ContentVPipeline.from_pretrained("ByteDance/ContentV-8B", torch_dtype=torch.bfloat16)
    >>> frames = pipe(prompt="a cat", num_frames=49, generator=torch.Generator().manual_seed(42)).frames[0]
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components: list[str] = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        transformer: SD3Transformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLWan,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel,
        tokenizer_3: T5TokenizerFast,
    ):
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            text_encoder_3=text_encoder_3,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            tokenizer_3=tokenizer_3,
            transformer=transformer,
            scheduler=scheduler,
        )
        self.vae_scale_factor_temporal = 2 ** sum(vae.temperal_downsample)  # 4 for Wan2.1
        self.vae_scale_factor_spatial = 2 ** len(vae.temperal_downsample)  # 8 for Wan2.1
        self.vae_scale_factor = self.vae_scale_factor_spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.tokenizer_max_length = tokenizer.model_max_length
        self.patch_size = transformer.config.patch_size
        self.default_sample_size = None

    def enable_sequential_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        # StableDiffusion3Pipeline's override reads `image_encoder`, which ContentV doesn't have.
        DiffusionPipeline.enable_sequential_cpu_offload(self, *args, **kwargs)

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
        vae_dtype: torch.dtype | None = None,
        text_encoder_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> ContentVPipeline:
        """Load a ContentV checkpoint (local diffusers-layout folder or hub id), one component per subfolder.

        `torch_dtype` (or `dtype`) applies to the transformer and (unless `text_encoder_dtype` is given) the
        text encoders; the VAE loads in `vae_dtype` (fp32 by default, as the reference does). A dict per
        component with a "default" is taken as diffusers takes it (the VAE still fp32 unless the dict names
        "vae"). `variant`, `revision`, `local_files_only`, `cache_dir`, `token`, `force_download`, `proxies`,
        `device_map` (one device), `max_memory`, `offload_folder` go to the components' loaders; components
        passed by name (`transformer=...`) are used as given. Safetensors only: pickle weights are refused with
        the command that converts them; missing files raise an OSError naming the component.
        """
        path = str(pretrained_model_name_or_path)
        args = parse_load_args(cls.__name__, path, COMPONENTS, torch_dtype, kwargs)
        hub = args.hub
        vae_dtype = vae_dtype or args.dtypes.get("vae", torch.float32)

        def text_encoder(name: str, model: type) -> Callable[[], Any]:
            return lambda: model.from_pretrained(path, **args.model_kwargs(name, text_encoder_dtype))

        loaders: dict[str, Callable[[], Any]] = {
            "transformer": lambda: SD3Transformer3DModel.from_pretrained(path, **args.model_kwargs("transformer")),
            "vae": lambda: AutoencoderKLWan.from_pretrained(path, **args.model_kwargs("vae", vae_dtype)),
            "text_encoder": text_encoder("text_encoder", CLIPTextModelWithProjection),
            "text_encoder_2": text_encoder("text_encoder_2", CLIPTextModelWithProjection),
            "text_encoder_3": text_encoder("text_encoder_3", T5EncoderModel),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **hub),
            "tokenizer_2": lambda: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **hub),
            "tokenizer_3": lambda: T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", **hub),
            "scheduler": lambda: load_scheduler(path, hub),
        }
        # A failing component is one line naming the folder and the component (contentv.checkpoint).
        return cls(**load_parts(args, loaders))

    # ---------------------------------------------------------------- helpers

    def num_latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_factor_temporal + 1

    def check_video_inputs(
        self, height: int, width: int, num_frames: int, steps: int, guidance_mode: str, output_type: str
    ) -> None:
        """Raise ValueError naming the argument, the value and what is allowed."""
        mult = self.vae_scale_factor_spatial * self.patch_size
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % mult:
                raise ValueError(f"{name}={value}: must be a positive multiple of {mult}")
        t = self.vae_scale_factor_temporal
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % t:
            raise ValueError(f"num_frames={num_frames}: must be of the form {t}k+1 (e.g. 49, 121, 125)")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps={steps}: must be an integer >= 1")
        if guidance_mode not in PIPELINE_GUIDANCE_MODES:
            raise ValueError(f"guidance_mode={guidance_mode!r}: must be one of {', '.join(PIPELINE_GUIDANCE_MODES)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: must be one of {', '.join(OUTPUT_TYPES)}")

    def prepare_video_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        num_frames: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gaussian latents (B, C, T, H/8, W/8), drawn where the generator lives (CPU generators give the
        same noise on every device)."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        shape = (
            batch_size,
            self.transformer.config.in_channels,
            self.num_latent_frames(num_frames),
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor] | None,
        guidance_mode: str,
    ) -> torch.Tensor:
        """One guided velocity prediction; cond/uncond are (prompt_embeds, pooled_embeds)."""

        def forward(x: torch.Tensor, inputs: Sequence[torch.Tensor], context: str) -> torch.Tensor:
            embeds, pooled = inputs
            with self.transformer.cache_context(context):
                return self.transformer(
                    hidden_states=x,
                    timestep=t.expand(x.shape[0]),
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled,
                    joint_attention_kwargs=self.joint_attention_kwargs,
                    return_dict=False,
                )[0]

        # the reference's order when sequential: conditional pass first, then unconditional
        noise_uncond, noise_cond = guidance.predictions(forward, latents, cond, uncond, guidance_mode, cond_first=True)
        if noise_uncond is None:
            return noise_cond
        return guidance.combine(noise_uncond, noise_cond, self.guidance_scale)

    def latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent (mean, std), each (1, C, 1, 1, 1) on `device` in `dtype`; made once per
        (device, dtype) and kept, so decoding copies nothing from the host."""
        key = (torch.device(device), dtype)
        cached = getattr(self, "_latent_stats", None)
        if cached is None or cached[0] != key:
            cfg = self.vae.config
            shape = (1, cfg.z_dim, 1, 1, 1)
            mean = torch.tensor(cfg.latents_mean).view(shape).to(device, dtype)
            std = torch.tensor(cfg.latents_std).view(shape).to(device, dtype)
            self._latent_stats = cached = (key, (mean, std))
        return cached[1]

    def decode_latents(
        self, latents: torch.Tensor, output_type: str
    ) -> np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]:
        """Un-normalise per channel (latents * std + mean), decode in the VAE's dtype, post-process."""
        latents = latents.to(self.vae.dtype)
        mean, std = self.latent_stats(latents.device, latents.dtype)
        video = self.vae.decode(latents * std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    # ---------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(
        self,
        # Positional order: the reference's, i.e. diffusers' StableDiffusion3Pipeline's with num_frames after width.
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int = 432,
        width: int = 768,
        num_frames: int = 125,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 256,
        *,
        guidance_mode: str = "batched",
        stage_context: StageContext | None = None,
    ):
        """Generate videos. Returns `ContentVPipelineOutput(frames=...)` (see its docstring for shapes).

        Arguments come in the reference pipeline's order (diffusers' StableDiffusion3Pipeline's, with `num_frames`
        after `width`, `num_videos_per_prompt` for `num_images_per_prompt`), so `pipe(prompt, prompt_2)` sends the
        second text to CLIP-G as in diffusers. This runtime's own arguments are keyword-only:
        `guidance_mode`: "batched" runs conditional and unconditional passes as one batch of 2 (faster,
        more activation memory); "sequential" runs two forwards per step, as the reference does.
        `stage_context(name)` wraps the stages "text_encoding", "denoising" and "decoding" (used for
        timing and memory statistics). Setting `pipe._interrupt = True` from a step callback stops at
        the end of that step and raises `GenerationCancelled`.
        """
        stage = stage_context or null_stage
        self.check_video_inputs(height, width, num_frames, num_inference_steps, guidance_mode, output_type)
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor {name!r}: must be one of {self._callback_tensor_inputs}")
        check_sequence_length(max_sequence_length)
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        elif prompt_embeds is not None:
            batch_size = prompt_embeds.shape[0]
        else:
            raise ValueError("prompt: give a prompt (or prompt_embeds)")
        device = self._execution_device

        with stage("text_encoding"), self._text_encoding_device(device) as te_device:
            embeds = self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                prompt_3=prompt_3,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                negative_prompt_3=negative_prompt_3,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                device=te_device,
                clip_skip=self.clip_skip,
                num_images_per_prompt=num_videos_per_prompt,
                max_sequence_length=max_sequence_length,
            )
            # To the denoising device and the transformer's compute dtype (the text encoders may run in another).
            dtype = self.transformer.dtype
            embeds = [e.to(device=device, dtype=dtype) if e is not None else None for e in embeds]
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = embeds

        with stage("denoising"):
            latents = self.prepare_video_latents(
                batch_size * num_videos_per_prompt,
                height,
                width,
                num_frames,
                dtype,
                device,
                generator,
                latents,
            )
            # Tables the loop and the decoder need, made once here: the steps then copy nothing from the host.
            self.transformer.prepare_positions(latents.shape, device, dtype)
            if output_type != "latent":
                self.latent_stats(device, self.vae.dtype)
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
            timesteps = self.scheduler.timesteps
            self._num_timesteps = len(timesteps)
            cond = (prompt_embeds, pooled_prompt_embeds)
            uncond = (
                (negative_prompt_embeds, negative_pooled_prompt_embeds) if self.do_classifier_free_guidance else None
            )

            with self.progress_bar(total=len(timesteps)) as progress:
                for i, t in enumerate(timesteps):
                    noise_pred = self.predict_noise(latents, t, cond, uncond, guidance_mode)
                    latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        local = {"latents": latents, "prompt_embeds": cond[0], "negative_prompt_embeds": None}
                        if uncond is not None:
                            local["negative_prompt_embeds"] = uncond[0]
                        kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                        out = callback_on_step_end(self, i, t, kwargs) or {}
                        latents = out.pop("latents", latents)
                    progress.update()
                    if self.interrupt:
                        self.maybe_free_model_hooks()
                        raise GenerationCancelled(f"cancelled after step {i + 1} of {len(timesteps)}")

        if output_type == "latent":
            frames = latents
        else:
            with stage("decoding"):
                frames = self.decode_latents(latents, output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return ContentVPipelineOutput(frames=frames)
