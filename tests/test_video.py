"""Video writing: H.264 in MP4, metadata, never overwriting, no half-written file on failure."""

from __future__ import annotations

import numpy as np
import pytest

from contentv.video import read_mp4_frames, read_mp4_metadata, slugify, write_json, write_mp4


def frames(n=5, h=32, w=48):
    rng = np.random.default_rng(0)
    return rng.random((n, h, w, 3)).astype(np.float32)


def test_roundtrip_and_metadata(tmp_path):
    path = write_mp4(frames(), tmp_path, "clip", fps=12, metadata={"title": "a = b; #1", "seed": "7"}, crf=0)
    decoded, fps = read_mp4_frames(path)
    assert decoded.shape == (5, 32, 48, 3) and fps == 12.0
    tags = read_mp4_metadata(path)
    assert tags["title"] == "a = b; #1" and tags["seed"] == "7"
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # ordinary permissions, not mkstemp's


def test_never_overwrites(tmp_path):
    first = write_mp4(frames(), tmp_path, "clip", fps=8)
    second = write_mp4(frames(), tmp_path, "clip", fps=8)
    assert first.name == "clip.mp4" and second.name == "clip-1.mp4"
    side = write_json({"a": 1}, tmp_path / "clip.json")
    with pytest.raises(FileExistsError):
        write_json({"a": 2}, side)
    assert side.read_text().strip().endswith("}") and '"a": 1' in side.read_text()


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failure_mid_encoding_leaves_nothing(tmp_path, monkeypatch, error):
    """ffmpeg has started writing the temporary file when the run dies: no file may remain."""
    import imageio_ffmpeg

    real = imageio_ffmpeg.write_frames
    sent = []

    class FailingWriter:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def send(self, frame):
            self.inner.send(frame)
            if frame is not None:
                sent.append(1)
                if len(sent) == 2:
                    raise error

        def close(self):
            self.inner.close()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", FailingWriter)
    with pytest.raises(error):
        write_mp4(frames(), tmp_path, "clip", fps=8)
    assert len(sent) == 2
    assert list(tmp_path.iterdir()) == []


def test_slugify():
    assert slugify("A young musician, strumming!") == "a-young-musician-strumming"
    assert slugify("!!!") == "video"
