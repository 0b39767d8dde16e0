"""Video writing: H.264 in MP4, metadata, never overwriting, published in pairs, nothing left behind on failure.

Faults are injected for real where the machine allows: a 1 MiB tmpfs (in a private mount namespace, so no
mount outlives the test), /dev/full behind the temporary file (ENOSPC from the real write calls),
RLIMIT_FSIZE (the kernel stops ffmpeg with SIGXFSZ), frames the encoder refuses, and SIGTERM/SIGKILL sent to
a process in the middle of a write.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from contentv import video as V
from contentv.video import (
    VideoWriteError,
    clean_stale_partials,
    read_mp4_frames,
    read_mp4_metadata,
    slugify,
    write_json,
    write_mp4,
    write_video,
)
from tests.helpers import run_in_process

ROOT = Path(__file__).resolve().parents[1]


def frames(n=5, h=32, w=48):
    rng = np.random.default_rng(0)
    return rng.random((n, h, w, 3)).astype(np.float32)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial." in p.name)


# ------------------------------------------------------------------------------------------ writing


def test_roundtrip_and_metadata(tmp_path):
    path = write_mp4(frames(), tmp_path, "clip", fps=12, metadata={"title": "a = b; #1", "seed": "7"}, crf=0)
    decoded, fps = read_mp4_frames(path)
    assert decoded.shape == (5, 32, 48, 3) and fps == 12.0
    tags = read_mp4_metadata(path)
    assert tags["title"] == "a = b; #1" and tags["seed"] == "7"
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # ordinary permissions, not mkstemp's
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_never_overwrites(tmp_path):
    first = write_mp4(frames(), tmp_path, "clip", fps=8)
    second = write_mp4(frames(), tmp_path, "clip", fps=8)
    assert first.name == "clip.mp4" and second.name == "clip-1.mp4"
    side = write_json({"a": 1}, tmp_path / "clip.json")
    with pytest.raises(FileExistsError):
        write_json({"a": 2}, side)
    assert side.read_text().strip().endswith("}") and '"a": 1' in side.read_text()


def test_a_foreign_sidecar_moves_the_pair_to_the_next_free_name(tmp_path):
    foreign = tmp_path / "same.json"
    foreign.write_text('{"someone": "else"}')
    video, side = write_video(frames(), tmp_path, "same", fps=8, sidecar={"prompt": "a cat", "video": None})
    assert (video.name, side.name) == ("same-1.mp4", "same-1.json")
    assert json.loads(side.read_text()) == {"prompt": "a cat", "video": "same-1.mp4"}  # names the published video
    assert foreign.read_text() == '{"someone": "else"}' and not (tmp_path / "same.mp4").exists()
    (tmp_path / "other.mp4").write_bytes(b"not ours")  # a foreign video: same rule
    video, side = write_video(frames(), tmp_path, "other", fps=8, sidecar={})
    assert (video.name, side.name) == ("other-1.mp4", "other-1.json") and not (tmp_path / "other.json").exists()
    assert partials(tmp_path) == []


def test_a_sidecar_name_taken_after_the_video_was_linked(tmp_path, monkeypatch):
    """Someone creates same.json between our check and our link: our same.mp4 link is taken back."""
    real = os.path.lexists

    def racing(path):
        if Path(path).name == "same.json" and not real(path):
            Path(path).write_text("theirs")  # appears right after we looked
            return False
        return real(path)

    monkeypatch.setattr(V.os.path, "lexists", racing)
    video, side = write_video(frames(), tmp_path, "same", fps=8, sidecar={"k": 1})
    assert (video.name, side.name) == ("same-1.mp4", "same-1.json")
    assert visible(tmp_path) == ["same-1.json", "same-1.mp4", "same.json"]  # no same.mp4 beside their sidecar
    assert (tmp_path / "same.json").read_text() == "theirs" and partials(tmp_path) == []


def test_file_systems_without_hard_links(tmp_path, monkeypatch):
    """Where os.link fails (FAT, some FUSE mounts) a name is claimed with O_EXCL and the file moved onto it; a
    pair whose sidecar name is taken meanwhile moves the video back and tries the next N."""

    def no_links(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    real = os.path.lexists

    def racing(path):
        if Path(path).name == "same.json" and not real(path):
            Path(path).write_text("theirs")
            return False
        return real(path)

    monkeypatch.setattr(V.os, "link", no_links)
    monkeypatch.setattr(V.os.path, "lexists", racing)
    video, side = write_video(frames(), tmp_path, "same", fps=8, sidecar={"k": 1})
    assert (video.name, side.name) == ("same-1.mp4", "same-1.json")
    assert visible(tmp_path) == ["same-1.json", "same-1.mp4", "same.json"] and partials(tmp_path) == []
    assert read_mp4_frames(video)[0].shape == (5, 32, 48, 3)


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failure_mid_encoding_leaves_nothing(tmp_path, monkeypatch, error):
    """ffmpeg has started writing the temporary file when the run dies: ffmpeg is stopped, no file remains."""
    real = V.subprocess.Popen
    started = []

    class FailingStdin:
        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def write(self, data):
            self.n += 1
            if self.n == 2:
                raise error
            return self.inner.write(data)

        def close(self):
            self.inner.close()

    def popen(*args, **kwargs):
        proc = real(*args, **kwargs)
        proc.stdin = FailingStdin(proc.stdin)
        started.append(proc)
        return proc

    monkeypatch.setattr(V.subprocess, "Popen", popen)
    with pytest.raises(error):
        write_mp4(frames(), tmp_path, "clip", fps=8)
    assert started and started[0].poll() is not None  # ffmpeg is not left running
    assert list(tmp_path.iterdir()) == []


def test_encoder_failure_publishes_nothing(tmp_path):
    """libx264 refuses frames wider than 16384: ffmpeg's exit status is checked, its first message reported."""
    wide = np.zeros((2, 16, 16400, 3), np.uint8)
    with pytest.raises(VideoWriteError) as info:
        write_mp4(wide, tmp_path, "wide", fps=8)
    message = str(info.value)
    assert "\n" not in message and "failed (exit status" in message and "invalid width x height" in message
    assert str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_result_is_not_published(tmp_path, monkeypatch):
    """ffmpeg exits 0 but the file doesn't hold the frames sent: not published."""
    import imageio_ffmpeg

    monkeypatch.setattr(imageio_ffmpeg, "count_frames_and_secs", lambda path: (3, 0.3))
    with pytest.raises(VideoWriteError, match=r"incomplete or unreadable \(3 of 5 frames\)"):
        write_mp4(frames(), tmp_path, "clip", fps=8)
    assert list(tmp_path.iterdir()) == []


def dev_full_temps(monkeypatch, suffix: str) -> None:
    """Temporaries ending in `suffix` become links to /dev/full: every write to them fails with ENOSPC."""
    real = V._new_temp

    def new_temp(folder, sfx):
        tmp = real(folder, sfx)
        if sfx == suffix:
            tmp.unlink()
            tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(V, "_new_temp", new_temp)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_full_disk_while_encoding(tmp_path, monkeypatch):
    dev_full_temps(monkeypatch, ".mp4")
    with pytest.raises(VideoWriteError) as info:
        write_video(frames(), tmp_path, "clip", fps=8, sidecar={})
    assert str(info.value) == f"no space left on device while writing {tmp_path}"
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_full_disk_while_writing_the_sidecar(tmp_path, monkeypatch):
    dev_full_temps(monkeypatch, ".json")
    with pytest.raises(VideoWriteError) as info:
        write_video(frames(), tmp_path, "clip", fps=8, sidecar={"a": 1})
    assert str(info.value) == f"no space left on device while writing {tmp_path / 'clip.json'}"
    assert list(tmp_path.iterdir()) == []  # the video was not published without its sidecar
    with pytest.raises(VideoWriteError, match="no space left on device"):
        write_json({"a": 1}, tmp_path / "index.json")
    assert list(tmp_path.iterdir()) == []


WRITER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from contentv.video import write_video
    folder, n, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    frames = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    print("writing", flush=True)
    try:
        write_video(frames, folder, "clip", fps=8, sidecar={"a": 1}, crf=0)
        print(json.dumps({"ok": True}))
    except OSError as exc:
        import os
        print(json.dumps({"error": str(exc), "errno": exc.errno, "left": sorted(os.listdir(folder))}))
    """
)


def python_writer(folder: Path, n: int, side: int) -> list[str]:
    return [sys.executable, "-c", WRITER, str(folder), str(n), str(side)]


def test_file_size_limit(tmp_path):
    """RLIMIT_FSIZE (no root needed): the kernel stops ffmpeg with SIGXFSZ at the limit."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        python_writer(tmp_path, 8, 128), capture_output=True, text=True, env=env, preexec_fn=limit, timeout=120
    )
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["error"] == f"file size limit exceeded while writing {tmp_path}" and result["errno"] == errno.EFBIG
    assert result["left"] == [] and list(tmp_path.iterdir()) == []


def in_private_tmpfs(folder: Path, command: str, size: str = "1m") -> subprocess.CompletedProcess:
    """Run `command` (sh) with a `size` tmpfs mounted on `folder`, in a private mount namespace (the mount ends
    with the command). Skips where mounting is not permitted."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a private mount namespace")
    root = ["--map-root-user"] if os.geteuid() != 0 else []
    probe = subprocess.run(
        ["unshare", "--mount", *root, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {probe.stderr.decode().strip()}")
    script = f"mount -t tmpfs -o size={size} tmpfs {folder} && {command}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        ["unshare", "--mount", *root, "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300
    )


def test_full_disk_on_a_real_tmpfs(tmp_path):
    """20 lossless 256x256 noise frames (several MiB) into a 1 MiB tmpfs: a clear error, nothing left there."""
    folder = tmp_path / "small"
    folder.mkdir()
    argv = " ".join(f"'{a}'" for a in python_writer(folder, 20, 256))
    proc = in_private_tmpfs(folder, argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"error": f"no space left on device while writing {folder}", "errno": errno.ENOSPC, "left": []}


# ------------------------------------------------------------------------------------------ stale partials


def test_stale_partials_are_removed_when_their_writer_is_gone(tmp_path):
    host = V._host()
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = {
        "dead": f".{host}.{dead.pid}.0badc0de.partial.mp4",
        "mine": f".{host}.{os.getpid()}.0badc0de.partial.json",  # this process: a write in progress
        "other_host_recent": ".elsewhere.1.0badc0de.partial.mp4",
        "other_host_old": ".elsewhere.2.0badc0de.partial.mp4",
        "legacy_old": ".tmpab12cd.partial.mp4",
        "legacy_recent": ".tmpzz99yy.partial.json",
        "not_ours": ".notes.partial.txt",
        "user_file": "clip.partial.mp4",
    }
    for name in names.values():
        (tmp_path / name).write_text("x")
    old = time.time() - V.STALE_AFTER_S - 60
    for key in ("other_host_old", "legacy_old", "not_ours", "user_file"):
        os.utime(tmp_path / names[key], (old, old))
    removed = sorted(p.name for p in clean_stale_partials(tmp_path))
    assert removed == sorted([names["dead"], names["other_host_old"], names["legacy_old"]])
    kept = {"mine", "other_host_recent", "legacy_recent", "not_ours", "user_file"}
    assert sorted(os.listdir(tmp_path)) == sorted(names[k] for k in kept)


def writers_of(folder: Path) -> list[int]:
    """PIDs of processes (ffmpeg orphans included) whose command line names `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(folder).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the orphaned encoder")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_writer_killed_mid_write_leaves_nothing_after_the_next_write(tmp_path, sig):
    folder = tmp_path / "out"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen(python_writer(folder, 2000, 256), stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout.readline().strip() == "writing"
    deadline = time.time() + 60
    while not any(p.name.endswith(".partial.mp4") and p.stat().st_size > 0 for p in folder.iterdir()):
        assert time.time() < deadline and writer.poll() is None, "the writer finished before it could be killed"
        time.sleep(0.05)
    writer.send_signal(sig)
    writer.wait(timeout=30)
    writer.stdout.close()
    while writers_of(folder) and time.time() < deadline:  # ffmpeg sees end of input and exits by itself
        time.sleep(0.1)
    assert visible(folder) == []  # no final file
    left = partials(folder)
    assert left and all(f".{writer.pid}." in name for name in left)  # the dead writer's partial, for now

    video = write_mp4(frames(), folder, "next", fps=8)  # the next write in that folder cleans up
    assert os.listdir(folder) == [video.name]


def test_slugify():
    assert slugify("A young musician, strumming!") == "a-young-musician-strumming"
    assert slugify("!!!") == "video"


# ------------------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    "content,words", [(b"a red fox\n\xff\xfe walks\n", "byte 10 is not UTF-8"), (b"a cat\x00\n", "NUL bytes")]
)
def test_demo_refuses_a_prompt_file_that_is_not_text(tmp_path, cache_dir, capsys, content, words):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    run = tmp_path / "run"
    args = ["model=tiny_contentv", "backend=cpu", f"sampling.prompt_file={prompts}", f"hydra.run.dir={run}"]
    proc = run_in_process(capsys, args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and f"sampling.prompt_file='{prompts}' is not valid" in errors[0] and words in errors[0]
    assert "Traceback" not in proc.stderr and not run.exists()


@pytest.mark.slow
def test_demo_on_a_full_disk(tmp_path, tiny_ckpt):
    """A whole run whose output folder is a full tmpfs: one line, exit 1, nothing but the filler there."""
    folder = tmp_path / "full"
    folder.mkdir()
    args = " ".join(
        f"'{a}'"
        for a in [
            sys.executable,
            str(ROOT / "demo.py"),
            "model=tiny_contentv",
            "backend=cpu",
            "sampling.num_inference_steps=1",
            "sampling.num_frames=5",
            "sampling.height=32",
            "sampling.width=48",
            f"output.dir={folder}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    fill = f"(dd if=/dev/zero of={folder}/filler bs=4k 2>/dev/null; true)"
    proc = in_private_tmpfs(folder, f"{fill} && cd {ROOT} && {args}; echo rc=$?; ls -A {folder}")
    lines = proc.stdout.strip().splitlines()
    assert lines[-2:] == ["rc=1", "filler"], proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert errors == [
        f"error: VideoWriteError: no space left on device while writing {folder} (debug=true for a traceback)"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
