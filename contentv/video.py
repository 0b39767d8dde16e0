"""Writing videos and sidecars: H.264 MP4 through ffmpeg, never overwriting, never half-written, in pairs.

A video is encoded into a hidden temporary file in the target folder (`.<host>.<pid>.<random>.partial.mp4`),
ffmpeg's exit status is checked and the file is read back (its frames counted) and flushed to disk before
it gets a final name. Final names are hard links (`os.link` fails if the name exists, so nothing is ever
overwritten). A video and its sidecar are published as a pair under the first `<stem>[-N]` whose .mp4 and
.json names are both free, so a sidecar never sits beside someone else's video.

A crash, SIGTERM or kill -9 can leave a `.partial` file: the next write in that folder removes the partials
whose writer is gone (a dead process on this host, or older than STALE_AFTER_S for other hosts).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

# Partials of writers on other hosts (shared folders) can't be asked whether they are alive: removed after a
# day, far longer than any encode; their mtime moves while ffmpeg writes.
STALE_AFTER_S = 24 * 3600
# Suffixes: videos, sidecars and index files (here), frames files and sweep summaries (contentv.atomic).
_PARTIAL = re.compile(
    r"^\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?[\w]+\.partial\.(?:mp4|json|npz|csv|md|png|tmp)$"
)
# errno -> the cause, in the words a user searches for (ffmpeg prints strerror's text).
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EIO: "input/output error",
}


class VideoWriteError(OSError):
    """A video or sidecar could not be written; nothing was published. `errno` is set when the cause is known."""


def slugify(text: str, max_len: int = 48) -> str:
    """A file-name stem from a prompt: lower-case letters and digits of any script joined by "-".

    Accents on Latin letters are dropped (NFKD: "ünïcode" -> "unicode"); other scripts keep their letters and
    marks ("日本語", "हिन्दी"). Nothing else survives (no separators, dots or spaces): a safe name everywhere.
    """
    chars: list[str] = []
    for ch in unicodedata.normalize("NFKD", text.lower()):
        kind = unicodedata.category(ch)
        if kind.startswith("M"):
            # A combining mark: an accent on an ASCII letter is dropped; elsewhere it is part of the letter.
            if chars and chars[-1].isascii():
                continue
            chars.append(ch)
        elif kind[0] in "LN":
            chars.append(ch)
        elif chars and chars[-1] != "-":
            chars.append("-")
    slug = unicodedata.normalize("NFC", "".join(chars)).strip("-")
    return slug[:max_len].rstrip("-") or "video"


def to_uint8(frames: ArrayLike) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] (or uint8) -> uint8."""
    arr = np.asarray(frames)
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------ temporaries


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _new_temp(folder: Path, suffix: str) -> Path:
    """Create an empty hidden temporary in `folder` named after this host and process (for stale cleanup)."""
    umask = os.umask(0)
    os.umask(umask)
    while True:
        tmp = folder / f".{_host()}.{os.getpid()}.{secrets.token_hex(4)}.partial{suffix}"
        try:
            # The final file gets the usual permissions (mkstemp would make it 0600).
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~umask))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise _write_error(exc, folder) from exc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_partials(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove the `.partial` files in `folder` whose writer is gone; returns what was removed.

    Gone: the process named in the file is not running on this host, or the file is older than STALE_AFTER_S
    (other hosts sharing the folder, files of older versions without a host and pid). A PID reused by another
    process keeps its partial until then. Errors are ignored: cleanup never fails a write.
    """
    now = time.time() if now is None else now
    host, removed = _host(), []
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        entries = [e for e in it if e.name.startswith(".") and ".partial." in e.name]
    for entry in entries:
        m = _PARTIAL.match(entry.name)
        if m is None:
            continue
        try:
            if m["host"] == host and m["pid"]:
                stale = not _alive(int(m["pid"]))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def _staged(folder: Path, suffix: str) -> Iterator[Path]:
    """A new temporary path in `folder`, removed on exit whatever happens."""
    tmp = _new_temp(folder, suffix)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------ errors


def _cause(code: int | None = None, text: str = "") -> tuple[int | None, str | None]:
    """(errno, words) for an errno, or for the strerror text ffmpeg printed."""
    if code in _CAUSES:
        return code, _CAUSES[code]
    lowered = text.lower()
    for num, words in _CAUSES.items():
        if os.strerror(num).lower() in lowered:
            return num, words
    return None, None


def _write_error(exc: OSError, where: Path) -> VideoWriteError:
    num, words = _cause(exc.errno)
    err = VideoWriteError(f"{words or exc.strerror or exc} while writing {where}")
    err.errno = num or exc.errno
    return err


# ------------------------------------------------------------------------------------------ encoding


def _encode(video: np.ndarray, out: Path, fps: int, crf: int, metadata: dict[str, str]) -> None:
    """Run ffmpeg (H.264, yuv420p) on (F, H, W, 3) uint8 frames into `out`; raise VideoWriteError on failure.

    ffmpeg is run here rather than through imageio_ffmpeg.write_frames: that generator neither checks the exit
    status nor keeps ffmpeg's messages, so a failed encode (full disk, frames too large) returned normally.
    """
    import imageio_ffmpeg

    h, w = video.shape[1:3]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-v", "error"]
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-an"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf)]
    cmd += ["-movflags", "+faststart+use_metadata_tags"]
    for key, value in metadata.items():
        cmd += ["-metadata", f"{key}={value}"]
    # Own session: a Ctrl-C in the terminal reaches only us, and we stop ffmpeg ourselves.
    proc = subprocess.Popen(cmd + [str(out)], stdin=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    messages = bytearray()

    def drain() -> None:  # read stderr as it comes, so ffmpeg never blocks on a full pipe
        for line in proc.stderr:
            messages.extend(line)
            del messages[: max(0, len(messages) - 65536)]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    pipe_error = None
    try:
        try:
            for frame in video:
                proc.stdin.write(np.ascontiguousarray(frame).tobytes())
            proc.stdin.close()
        except OSError as exc:  # ffmpeg died (EPIPE) or the pipe failed: its exit status says why
            pipe_error = exc
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: stop ffmpeg before the temporary goes
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        reader.join(timeout=5)
        proc.stderr.close()
    text = messages.decode(errors="replace").strip()
    # The first message is the cause; later ones are its consequences ("[libx264 @ 0x55..] x" -> "libx264: x").
    first = re.sub(r"^\[([^\]@]+?) @ 0x[0-9a-f]+\]\s*", r"\1: ", text.splitlines()[0].strip()) if text else ""
    if code != 0 or pipe_error is not None:
        num, words = _cause(None, text)
        if code == -signal.SIGXFSZ:  # over RLIMIT_FSIZE: the kernel stops the writer with SIGXFSZ
            num, words = errno.EFBIG, _CAUSES[errno.EFBIG]
        if words:
            err = VideoWriteError(f"{words} while writing {out.parent}")
        else:
            status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            detail = f": {first}" if first else ""
            err = VideoWriteError(f"the video encoder (ffmpeg) failed ({status}) while writing {out.parent}{detail}")
        err.errno = num
        raise err
    _verify(out, len(video))


def _verify(path: Path, frames: int) -> None:
    """Read the encoded file back: it must be a readable MP4 with every frame; then flush it to disk."""
    import imageio_ffmpeg

    try:
        found, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure to read it back means it is not a playable video
        found, why = None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    else:
        why = f"{found} of {frames} frames"
    if found != frames:
        raise VideoWriteError(f"the encoded video in {path.parent} is incomplete or unreadable ({why})")
    try:  # a full disk can surface only when the data reaches it
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _write_error(exc, path.parent) from exc


# ------------------------------------------------------------------------------------------ publishing


def _link_new(tmp: Path, final: Path) -> None:
    """Give `tmp`'s content the name `final`, failing with FileExistsError if `final` exists."""
    try:
        os.link(tmp, final)
        return
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: claim the name exclusively, then replace it
        pass
    try:
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise
    except OSError as exc:  # a full disk has no room for a new name either
        raise _write_error(exc, final) from exc
    try:
        os.replace(tmp, final)
    except OSError as exc:
        os.unlink(final)  # never leave our empty claim under the final name
        raise _write_error(exc, final) from exc


def _sync_folder(folder: Path) -> None:
    """Flush the folder's entries (the new names) to disk; best effort: not every system can open a folder."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink_published(tmp: Path, final: Path) -> None:
    """Undo `_link_new(tmp, final)`: drop the link, or move the content back where there were no links."""
    if tmp.exists():
        os.unlink(final)
    else:
        os.replace(final, tmp)


def _write_text(path: Path, text: str, final: Path) -> None:
    """Write and flush `text` into the temporary `path`; errors name `final`, the file being written."""
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _write_error(exc, final) from exc


class StagedVideo:
    """An encoded, checked video in a temporary file, not yet published (see `staged_mp4`)."""

    def __init__(self, path: Path, folder: Path):
        self.path, self.folder = path, folder

    def publish(self, stem: str, sidecar: dict | None = None, video_key: str = "video") -> tuple[Path, Path | None]:
        """Link the video to `<stem>.mp4`, or `<stem>-N.mp4` for the first N whose .mp4 and .json are both free,
        and write `sidecar` (its `video_key` set to the video's file name) to the .json beside it.

        Never overwrites; if the sidecar's name is taken after the video was linked, the video link is removed
        and the next N tried. Returns (video, sidecar or None).
        """
        with contextlib.ExitStack() as stack:
            side_tmp = stack.enter_context(_staged(self.folder, ".json")) if sidecar is not None else None
            for n in range(10_000):
                base = stem if n == 0 else f"{stem}-{n}"
                video, side = self.folder / f"{base}.mp4", self.folder / f"{base}.json"
                if os.path.lexists(video) or (side_tmp is not None and os.path.lexists(side)):
                    continue
                if side_tmp is not None:  # written before the video is linked: a full disk fails here
                    text = json.dumps({**sidecar, video_key: video.name}, indent=2, default=str) + "\n"
                    _write_text(side_tmp, text, side)
                try:
                    _link_new(self.path, video)
                except FileExistsError:
                    continue
                if side_tmp is None:
                    _sync_folder(self.folder)
                    return video, None
                try:
                    _link_new(side_tmp, side)
                except FileExistsError:  # taken meanwhile: this N is not a free pair
                    _unlink_published(self.path, video)
                    continue
                except BaseException:
                    _unlink_published(self.path, video)
                    raise
                _sync_folder(self.folder)
                return video, side
        raise FileExistsError(f"no free file name for {self.folder / stem}.mp4")


@contextlib.contextmanager
def staged_mp4(
    frames: ArrayLike,
    folder: str | os.PathLike,
    fps: int,
    metadata: dict[str, str] | None = None,
    crf: int = 17,
) -> Iterator[StagedVideo]:
    """Encode (F, H, W, 3) frames as H.264 (yuv420p) into a checked temporary; `.publish(stem, sidecar)` it
    inside the block. The temporary is removed on exit whatever happens; stale partials in `folder` go first.

    Raises VideoWriteError (one line naming the cause: "no space left on device while writing <folder>")
    when ffmpeg fails or the file can't be read back.
    """
    video = to_uint8(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {video.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(folder)
    with _staged(folder, ".mp4") as tmp:
        _encode(video, tmp, fps, crf, dict(metadata or {}))
        yield StagedVideo(tmp, folder)


def write_mp4(
    frames: ArrayLike,
    folder: str | os.PathLike,
    stem: str,
    fps: int,
    metadata: dict[str, str] | None = None,
    crf: int = 17,
) -> Path:
    """Encode (F, H, W, 3) frames as H.264 (yuv420p) and return the final path (`<stem>[-N].mp4`)."""
    with staged_mp4(frames, folder, fps, metadata, crf) as staged:
        return staged.publish(stem)[0]


def write_video(
    frames: ArrayLike,
    folder: str | os.PathLike,
    stem: str,
    fps: int,
    sidecar: dict | None = None,
    metadata: dict[str, str] | None = None,
    crf: int = 17,
) -> tuple[Path, Path | None]:
    """`write_mp4` plus its sidecar, published as a pair (StagedVideo.publish); returns (video, sidecar)."""
    with staged_mp4(frames, folder, fps, metadata, crf) as staged:
        return staged.publish(stem, sidecar)


def write_json(data: dict, path: Path) -> Path:
    """Write `path` (exactly that name) atomically; fails with FileExistsError if it exists."""
    path = Path(path)
    clean_stale_partials(path.parent)
    with _staged(path.parent, ".json") as tmp:
        _write_text(tmp, json.dumps(data, indent=2, default=str) + "\n", path)
        try:
            _link_new(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            raise _write_error(exc, path) from exc
    _sync_folder(path.parent)
    return path


def write_frames(frames: ArrayLike, path: Path) -> Path:
    """A lossless copy of (F, H, W, 3) frames as uint8 (`.npz`, key "frames", zlib-compressed), written
    atomically; fails if `path` exists. Sweeps compare these, not the lossy H.264 video."""
    try:
        with _staged(path.parent, ".npz") as tmp:
            with tmp.open("wb") as f:
                np.savez_compressed(f, frames=to_uint8(frames))
            _link_new(tmp, path)
    except (VideoWriteError, FileExistsError):
        raise
    except OSError as exc:  # a full disk: one line naming the folder, as for the video
        raise _write_error(exc, path.parent) from exc
    return path


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """The (F, H, W, 3) uint8 frames `write_frames` stored."""
    with np.load(path) as data:
        return data["frames"]


# ------------------------------------------------------------------------------------------ reading


def read_mp4_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Container metadata tags (title, comment, ...) as ffmpeg reports them."""
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
