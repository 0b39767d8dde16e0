"""Fidelity beside speed: PSNR and SSIM of each job's frames against a baseline job's (torchmetrics).

Frames are compared from the lossless copy each job keeps beside its video (`<video stem>.frames.npz`, uint8,
what the video encodes before H.264's loss), never decoded from the MP4: the codec's own error would swamp
the differences a speed-up makes.

"identical" means bit-identical frames: PSNR = inf (CSV: `inf`; Markdown: "identical") and SSIM = 1.0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contentv.video import read_frames, write_frames

if TYPE_CHECKING:  # contentv.runtime imports torch and diffusers
    from contentv.runtime import RunResult

IDENTICAL = math.inf
# A job is compared with the baseline's video that has the same values of these (and only then).
MATCH_KEYS = ("prompt", "seed", "height", "width", "num_frames")
FIELDS = ("psnr_db", "ssim", "fidelity")


def frames_path(video: str | Path) -> Path:
    """Where the lossless frames of `video` are kept: x.mp4 -> x.frames.npz."""
    video = Path(video)
    return video.with_name(video.stem + ".frames.npz")


def save_frames(result: RunResult) -> Path | None:
    """Keep `result.frames` ((F, H, W, 3) in [0, 1]) losslessly beside its video; None if it wrote no video."""
    if result.video is None:
        return None
    return write_frames(result.frames, frames_path(result.video))


def metrics(frames: np.ndarray, reference: np.ndarray, chunk: int = 8) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of (F, H, W, 3) uint8 `frames` against `reference`, over all frames (data range 1).

    PSNR from the mean squared error over every pixel of every frame; SSIM the mean of the per-frame SSIMs.
    Frames go through in chunks so a long 720p video needs little memory; both metrics accumulate exactly.
    """
    if frames.shape != reference.shape:
        raise ValueError(f"frames {frames.shape} and reference {reference.shape} differ in shape")
    if np.array_equal(frames, reference):
        return IDENTICAL, 1.0
    import torch
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    psnr = PeakSignalNoiseRatio(data_range=1.0)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    for start in range(0, len(frames), chunk):
        # (f, H, W, 3) uint8 -> (f, 3, H, W) float64 in [0, 1]
        x, y = (
            torch.from_numpy(np.ascontiguousarray(a[start : start + chunk])).permute(0, 3, 1, 2).double() / 255.0
            for a in (frames, reference)
        )
        psnr.update(x, y)
        ssim.update(x, y)
    return float(psnr.compute()), float(ssim.compute())


def _mismatch(row: dict, base: dict) -> str:
    diffs = [f"{k} {row.get(k)!r} vs {base.get(k)!r}" for k in MATCH_KEYS if row.get(k) != base.get(k)]
    return "not comparable to the baseline: " + ", ".join(diffs)


def add_fidelity(rows: list[dict], baseline: int) -> None:
    """Fill psnr_db, ssim and fidelity (a word or the reason there are no values) in every ok row, against the
    video of job `baseline` with the same prompt, seed, height, width and num_frames."""
    base_rows = [r for r in rows if r.get("job") == baseline and r.get("status") == "ok"]
    cache: dict[str, np.ndarray | str | None] = {}

    def load(video: str) -> np.ndarray | str | None:
        """The frames; None if there is no file; why, if it is damaged (the summary goes on without it)."""
        if video not in cache:
            path = frames_path(video)
            try:
                cache[video] = read_frames(path) if path.is_file() else None
            except Exception as exc:  # noqa: BLE001 - zip, npy or I/O damage of any kind: that row has no value
                cache[video] = f"frames file {path.name} is damaged ({type(exc).__name__}); rerun the sweep to redo it"
        return cache[video]

    for row in rows:
        row.update(psnr_db=None, ssim=None, fidelity="")
        if row.get("status") != "ok":
            continue
        if not base_rows:
            row["fidelity"] = f"no baseline: job {baseline} has no video (sweep.baseline)"
            continue
        base = next((b for b in base_rows if all(b.get(k) == row.get(k) for k in MATCH_KEYS)), None)
        if base is None:
            row["fidelity"] = _mismatch(row, base_rows[0])
            continue
        frames, reference = load(row["video"]), load(base["video"])
        damaged = next((x for x in (frames, reference) if isinstance(x, str)), None)
        if damaged is not None:
            row["fidelity"] = damaged
            continue
        if frames is None or reference is None:
            row["fidelity"] = "no frames file (sweep.fidelity was false when it ran)"
            continue
        try:
            psnr, ssim = metrics(frames, reference)
        except ImportError:
            from contentv.extras import install_hint

            row["fidelity"] = f"torchmetrics is not installed ({install_hint('sweep')})"
            continue
        except ValueError as exc:
            row["fidelity"] = str(exc)
            continue
        row.update(psnr_db=psnr if psnr == IDENTICAL else round(psnr, 3), ssim=round(ssim, 5))
        row["fidelity"] = "baseline" if row is base else ("identical" if psnr == IDENTICAL else "")
