"""Check our ContentV pipeline against the reference implementation on the tiny checkpoint.

The reference code is not part of this project: point --reference at a checkout of
bytedance/ContentV (it needs `pip install einops`). Both pipelines load the same tiny checkpoint,
run fp32 on the CPU with the same prompt, seed (CPU generator), size, frames and steps, and the
maximum absolute differences of final latents and frames are printed (target: <= 1e-4) and recorded, with
the reference checkout's commit, in benchmarks/results/reference_parity.jsonl (--no-record: print only).

    python benchmarks/reference_parity.py --reference ../ContentV
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--reference", required=True, help="folder with contentv_transformer.py and contentv_pipeline.py"
    )
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from diffusers import AutoencoderKLWan

    from contentv.attention import sdpa
    from contentv.config import ModelConfig
    from contentv.models.contentv import SPEC
    from contentv.models.contentv.pipeline import ContentVPipeline

    sys.path.insert(0, str(Path(args.reference).resolve()))
    from contentv_pipeline import ContentVPipeline as ReferencePipeline  # noqa: E402
    from contentv_transformer import SD3Transformer3DModel as ReferenceTransformer  # noqa: E402

    ckpt = SPEC.resolve_path(ModelConfig(name="tiny_contentv", path=None, tiny=True, dtype="float32"))
    call = dict(
        prompt="A young musician sits on a rustic wooden stool, strumming an acoustic guitar.",
        negative_prompt="overexposed, low quality, deformation",
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=6.0,
    )

    def gen():
        return torch.Generator().manual_seed(args.seed)

    vae = AutoencoderKLWan.from_pretrained(ckpt, subfolder="vae", torch_dtype=torch.float32)
    ref_t = ReferenceTransformer.from_pretrained(ckpt, subfolder="transformer", torch_dtype=torch.float32)
    ref = ReferencePipeline.from_pretrained(ckpt, vae=vae, transformer=ref_t, torch_dtype=torch.float32)
    ref_latents = ref(**call, generator=gen(), output_type="latent").frames
    ref_frames = ref(**call, generator=gen(), output_type="np").frames

    ours = ContentVPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    SPEC.install_attention(ours, sdpa)
    same_keys = set(ours.transformer.state_dict()) == set(ref_t.state_dict())
    print(f"checkpoint: {ckpt}\nstate-dict keys identical: {same_keys}")
    worst = 0.0
    modes = {}
    for mode in ("sequential", "batched"):
        latents = ours(**call, guidance_mode=mode, generator=gen(), output_type="latent").frames
        frames = ours(**call, guidance_mode=mode, generator=gen(), output_type="np").frames
        d_lat = (latents - ref_latents).abs().max().item()
        d_fr = float(np.abs(frames - ref_frames).max())
        worst = max(worst, d_lat, d_fr)
        modes[mode] = {"latents_max_abs": d_lat, "frames_max_abs": d_fr}
        print(f"guidance_mode={mode:10s} latents max|d| = {d_lat:.3g}   frames max|d| = {d_fr:.3g}")
    passed = worst <= 1e-4 and same_keys
    print("PASS" if passed else "FAIL", f"(worst {worst:.3g}, target <= 1e-4)")
    if not args.no_record:
        from benchmarks.startup import git_commit

        row = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "reference_commit": git_commit(Path(args.reference)),
            "size": f"{args.height}x{args.width}x{args.frames}, {args.steps} steps, seed {args.seed}, fp32, cpu",
            "state_dict_keys_identical": same_keys,
            "modes": modes,
            "passed": passed,
        }
        out = ROOT / "benchmarks" / "results" / "reference_parity.jsonl"
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"recorded: {out.relative_to(ROOT)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
