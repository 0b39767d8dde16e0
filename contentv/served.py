"""What the web page's server exposes: videos and their sidecars.

`ServedFiles` links videos (and sidecars) from the output folder into a private folder: the only files the page
hands to gradio. No gradio import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

VIDEO = ".mp4"
SIDECAR = ".json"
GALLERY_LIMIT = 24


def is_regular_file(path: str | os.PathLike) -> bool:
    """A regular file itself, not a symlink to one (lstat)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ServedFiles:
    """Videos under `root` (and their sidecars) linked into a private folder, the only files the page serves.

    A video is a regular `*.mp4` file (not a symlink) under `root`, outside hidden folders (`.hydra`); its
    sidecar is the `.json` next to it. Logs, Hydra configs and anything a symlink points to are never linked.
    """

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.dir = Path(tempfile.mkdtemp(prefix="contentv-page-")).resolve()

    def videos(self, limit: int = GALLERY_LIMIT) -> list[Path]:
        """The newest videos under root, newest first (symlinks and hidden files or folders skipped)."""
        found = []
        for folder, dirs, files in os.walk(self.root):  # never follows symlinked folders
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                path = Path(folder, name)
                if name.endswith(VIDEO) and not name.startswith(".") and is_regular_file(path):
                    found.append(path)
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return found[:limit]

    def check(self, path: Path) -> Path:
        """The file's real path if it is a video, or a video's sidecar, under root (ValueError otherwise)."""
        path = Path(path).absolute()
        real = path.resolve()
        ok = (
            path.suffix in (VIDEO, SIDECAR)
            and not path.name.startswith(".")
            and is_regular_file(path)  # a symlink is refused, wherever it points
            and _inside(str(real), str(self.root.resolve()))
            and not any(part.startswith(".") for part in real.relative_to(self.root.resolve()).parts)
            and (path.suffix == VIDEO or is_regular_file(path.with_suffix(VIDEO)))
        )
        if not ok:
            raise ValueError(f"not a video or sidecar under {self.root}: {path.name}")
        return real

    def serve(self, path: Path) -> str:
        """A link to a video or sidecar under root, in the served folder (ValueError for anything else)."""
        real = self.check(path)
        # One subfolder per source folder keeps same-named files from different runs apart.
        target = self.dir / hashlib.sha256(str(real.parent).encode()).hexdigest()[:12] / real.name
        if target.exists() and os.path.samefile(target, real):
            return str(target)
        target.parent.mkdir(exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.unlink(missing_ok=True)
        try:
            os.link(real, partial, follow_symlinks=False)
        except OSError:  # another file system: a copy, read without following a symlink swapped in meanwhile
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if not is_regular_file(partial):  # replaced by a symlink between the check and the link
            partial.unlink(missing_ok=True)
            raise ValueError(f"not a video or sidecar under {self.root}: {real.name}")
        os.replace(partial, target)
        return str(target)

    def gallery(self, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
        """(video path, caption) of the newest videos under root, newest first (caption from the sidecar)."""
        out = []
        for video in self.videos(limit):
            caption = video.stem
            sidecar = video.with_suffix(SIDECAR)
            if is_regular_file(sidecar):
                try:
                    record = json.loads(sidecar.read_text())
                    caption = f"{str(record.get('prompt', ''))[:80]} (seed {record.get('seed')})"
                except (OSError, ValueError, AttributeError):
                    pass
            out.append((str(video), caption))
        return out

    def served_gallery(self, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
        """gallery(), each video linked into the served folder (a video that vanished meanwhile is left out)."""
        out = []
        for video, caption in self.gallery(limit):
            try:
                out.append((self.serve(Path(video)), caption))
            except (OSError, ValueError):
                continue
        return out

    def close(self) -> None:
        """Remove the served links (the videos themselves stay)."""
        shutil.rmtree(self.dir, ignore_errors=True)
