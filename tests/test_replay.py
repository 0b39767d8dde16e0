"""Every video can be made again: the sidecar records how it was started (the command as typed, the overrides, the
working folder), the project's version and commit, and the strategy that ran; `replay` makes the same frames from the
sidecar alone and says what differs."""

from __future__ import annotations

import json
import logging

import imageio_ffmpeg
import numpy as np
import pytest

import demo
from tests import helpers

TINY = [*helpers.TINY, "memory=auto"]


def frames(video) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(video))
    meta = reader.__next__()
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("replay")
    assert demo.main([*TINY, f"hydra.run.dir={folder / 'run'}"]) == 0
    logging.getLogger().handlers.clear()
    (sidecar,) = (folder / "run").glob("*.json")
    return folder, sidecar


def test_the_sidecar_records_how_to_make_the_video_again(recorded):
    folder, sidecar = recorded
    record = json.loads(sidecar.read_text())
    assert record["invocation"]["argv"] == [*TINY, f"hydra.run.dir={folder / 'run'}"]
    assert "memory=auto" in record["invocation"]["overrides"] and record["invocation"]["cwd"].startswith("/")
    assert record["project"]["version"] and "git_commit" in record["project"]
    assert record["run"]["requested_memory"] == "auto" and record["config"]["memory"]["name"] == "none"
    assert record["checkpoint"]["folder"].startswith("/")


def test_replay_makes_the_same_frames(recorded, capsys):
    folder, sidecar = recorded
    assert demo.main(["replay", str(sidecar), "--output", str(folder / "again")]) == 0
    out = capsys.readouterr().out
    assert "same versions and checkpoint as recorded: yes" in out
    (video,) = (folder / "again").glob("*.mp4")
    assert np.array_equal(frames(video), frames(sidecar.with_suffix(".mp4")))
    again = json.loads(video.with_suffix(".json").read_text())
    assert again["config"]["memory"] == json.loads(sidecar.read_text())["config"]["memory"]


def test_replay_says_what_differs(recorded, tmp_path, capsys):
    _, sidecar = recorded
    record = json.loads(sidecar.read_text())
    record["versions"]["torch"] = "0.0.1"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(record))
    assert demo.main(["replay", str(edited), "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "differs: torch 0.0.1 -> " in captured.err and "recorded: no" in captured.out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "a sidecar written by this runtime"),
        ("not json", "a readable JSON sidecar"),
        (None, "an existing sidecar"),
    ],
)
def test_replay_refuses_what_is_not_a_sidecar_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    assert demo.main(["replay", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: replay=") and message in err[0]
