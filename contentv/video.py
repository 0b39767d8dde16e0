"""Writing videos and sidecars: H.264 MP4 via imageio-ffmpeg, never overwriting, never half-written.

Files are written under a hidden temporary name in the target folder and then hard-linked to the
final name (`os.link` fails if the name exists, so nothing is ever overwritten) and the temporary
removed. A crash or Ctrl-C leaves at most a `.partial` file, never a broken file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def slugify(text: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "video"


def to_uint8(frames) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] (or uint8) -> uint8."""
    arr = np.asarray(frames)
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@contextlib.contextmanager
def _staged(folder: Path, suffix: str) -> Iterator[Path]:
    """A temporary path in `folder`, removed on exit whatever happens."""
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".partial" + suffix, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual permissions
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _link_new(tmp: Path, final: Path) -> None:
    """Give `tmp`'s content the name `final`, failing with FileExistsError if `final` exists."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: claim the name exclusively, then replace it
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, final)


def _publish(tmp: Path, folder: Path, stem: str, suffix: str) -> Path:
    """Link `tmp` to `<stem><suffix>`, or `<stem>-N<suffix>` if taken; never overwrites."""
    for n in range(10_000):
        final = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            _link_new(tmp, final)
            return final
        except FileExistsError:
            continue
    raise FileExistsError(f"no free file name for {folder / stem}{suffix}")


def write_mp4(
    frames,
    folder: str | os.PathLike,
    stem: str,
    fps: int,
    metadata: dict[str, str] | None = None,
    crf: int = 17,
) -> Path:
    """Encode (F, H, W, 3) frames as H.264 (yuv420p) and return the final path."""
    import imageio_ffmpeg

    video = to_uint8(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {video.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = ["-crf", str(crf), "-movflags", "+faststart+use_metadata_tags"]
    for key, value in (metadata or {}).items():
        params += ["-metadata", f"{key}={value}"]
    h, w = video.shape[1:3]
    with _staged(folder, ".mp4") as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (w, h),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=params,
        )
        writer.send(None)  # start ffmpeg
        try:
            for frame in video:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()
        return _publish(tmp, folder, stem, ".mp4")


def write_json(data: dict, path: Path) -> Path:
    """Write `path` (exactly that name) atomically; fails if it exists."""
    with _staged(path.parent, ".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        _link_new(tmp, path)
    return path


def write_frames(frames, path: Path) -> Path:
    """A lossless copy of (F, H, W, 3) frames as uint8 (`.npz`, key "frames", zlib-compressed), written
    atomically; fails if `path` exists. Sweeps compare these, not the lossy H.264 video."""
    with _staged(path.parent, ".npz") as tmp:
        with tmp.open("wb") as f:
            np.savez_compressed(f, frames=to_uint8(frames))
        _link_new(tmp, path)
    return path


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """The (F, H, W, 3) uint8 frames `write_frames` stored."""
    with np.load(path) as data:
        return data["frames"]


def read_mp4_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Container metadata tags (title, comment, ...) as ffmpeg reports them."""
    import subprocess

    import imageio_ffmpeg

    out = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tags = {}
    for line in out.splitlines():
        if "=" in line and not line.startswith(";"):
            key, _, value = line.partition("=")
            tags[key.strip().lower()] = value.replace("\\=", "=").replace("\\;", ";").replace("\\#", "#")
    return tags


def read_mp4_frames(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode an MP4 back to (F, H, W, 3) uint8 and its frame rate."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames), float(meta["fps"])
