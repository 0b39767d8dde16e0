"""The tiny-model cache, output folders and the web page's private folders under faults: one line naming the
cache (or the option) and what to do; nothing half-built or private left behind after kill -9 or SIGTERM.

Builds here write a few files (no model): what is tested is the cache's handling of them.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contentv import tiny
from contentv.errors import ConfigError
from contentv.validation import check_writable_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def build(out: Path) -> None:
    """A two-component checkpoint, as the tiny builders lay one out."""
    (out / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "A"], "unet": [None]}))
    (out / "vae").mkdir()
    (out / "vae" / "config.json").write_text("{}")


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def test_a_cache_that_is_a_file_is_one_line(tmp_path):
    root = tmp_path / "cache"
    root.write_text("oops")
    with pytest.raises(ConfigError) as info:
        tiny.cached_build("tiny_x", {"a": 1}, build, root)
    assert str(info.value) == (
        f"CONTENTV_CACHE='{root}' is not valid: a writable folder for the tiny checkpoints (it is a file); point "
        "CONTENTV_CACHE at another folder, or fix this one and run again to rebuild"
    )


def test_a_read_only_cache_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tiny.tempfile, "mkdtemp", read_only)
    with pytest.raises(ConfigError, match=r"read-only file system while building tiny_x-[0-9a-f]{12}\)"):
        tiny.cached_build("tiny_x", {"a": 1}, build, tmp_path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_a_full_disk_during_the_first_build_is_one_line_and_leaves_nothing(tmp_path):
    def filling(out: Path) -> None:
        build(out)
        (out / "vae" / "weights").symlink_to("/dev/full")
        with open(out / "vae" / "weights", "wb") as f:
            f.write(b"x" * 100_000)

    with pytest.raises(ConfigError, match=r"^CONTENTV_CACHE=.*\(no space left on device while building tiny_x-"):
        tiny.cached_build("tiny_x", {"a": 1}, filling, tmp_path)
    assert os.listdir(tmp_path / "tiny") == []

    def library_wrapped(out: Path) -> None:  # safetensors reports a full disk as its own error type
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, message: No space left on device })")

    with pytest.raises(ConfigError, match="no space left on device while building"):
        tiny.cached_build("tiny_x", {"a": 1}, library_wrapped, tmp_path)


def test_a_cached_checkpoint_missing_a_component_says_how_to_rebuild(tmp_path):
    final = tiny.cached_build("tiny_x", {"a": 1}, build, tmp_path)
    assert tiny.cached_build("tiny_x", {"a": 1}, build, tmp_path) == final
    for file in (final / "vae").iterdir():
        file.unlink()
    with pytest.raises(ConfigError) as info:
        tiny.cached_build("tiny_x", {"a": 1}, build, tmp_path)
    assert f"the cached {final.name} is incomplete (vae/ missing): remove {final} to rebuild" in str(info.value)


HALF_BUILD = """
import sys, time
from pathlib import Path
from contentv import tiny
def slow(out):
    (out / "model_index.json").write_text("{}")
    print("building", flush=True)
    time.sleep(60)
tiny.cached_build("tiny_x", {"a": 1}, slow, Path(sys.argv[1]))
"""


def test_a_build_killed_with_sigkill_is_cleaned_up_by_the_next(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HALF_BUILD, str(tmp_path)], stdout=subprocess.PIPE, env=ENV)
    assert proc.stdout.readline().strip() == b"building"
    assert len(hidden(tmp_path / "tiny")) == 1  # this live build's folder: never touched by another builder
    tiny.cached_build("tiny_y", {"b": 1}, build, tmp_path)
    assert len(hidden(tmp_path / "tiny")) == 1
    proc.kill()
    proc.wait()
    final = tiny.cached_build("tiny_x", {"a": 1}, build, tmp_path)
    assert hidden(tmp_path / "tiny") == [] and not tiny.missing_parts(final)


# ------------------------------------------------------------------------------------------ output folders


def test_a_dangling_link_or_a_loop_is_refused_before_loading(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as info:
        check_writable_dir("output.dir", tmp_path / "dangling" / "run")
    assert str(info.value).endswith(
        f"a folder ({tmp_path / 'dangling'} is a link to {tmp_path / 'nowhere'}, which doesn't exist)"
    )
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for path in (tmp_path / "a", tmp_path / "a" / "run" / "x"):
        with pytest.raises(
            ConfigError, match=f"hydra.run.dir=.* is not valid: a folder \\({tmp_path / 'a'} is a symbolic link loop\\)"
        ):
            check_writable_dir("hydra.run.dir", path)
    (tmp_path / "real").mkdir()
    (tmp_path / "good").symlink_to(tmp_path / "real")
    check_writable_dir("output.dir", tmp_path / "good" / "new")  # a link to a folder is a folder


# ------------------------------------------------------------------------------------------ the page's folders


PAGE = """
import time
from contentv.served import private_dir, sigterm_exits
made = [private_dir("contentv-page-"), private_dir("contentv-gradio-")]
with sigterm_exits():
    print(*made, flush=True)  # the handler is in place before the test is told to send SIGTERM
    time.sleep(60)
"""


def test_sigterm_removes_the_private_folders(tmp_path):
    env = {**ENV, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", PAGE], stdout=subprocess.PIPE, text=True, env=env)
    made = [Path(p) for p in proc.stdout.readline().split()]
    assert all(p.is_dir() and p.parent == tmp_path.resolve() for p in made)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_private_folders_go_at_exit_whatever_the_way_out(tmp_path):
    env = {**ENV, "TMPDIR": str(tmp_path)}
    code = "from contentv.served import private_dir; private_dir('contentv-page-'); raise SystemExit(3)"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 3
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_on_the_web_page_leaves_nothing_private_in_tmpdir(tmp_path, cache_dir):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**ENV, "TMPDIR": str(tmp), "CONTENTV_CACHE": str(cache_dir)}
    argv = ["mode=ui", "model=tiny_contentv", "backend=cpu", "ui.port=0", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "demo.py"), *argv], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 240
        for line in proc.stderr:
            if line.startswith("ContentV page on") or time.monotonic() > deadline:
                break
        assert sorted(p.name.split("-")[1] for p in tmp.glob("contentv-*")) == ["gradio", "page"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert list(tmp.glob("contentv-*")) == []


def test_the_gallery_reads_sidecars_with_limits(tmp_path):
    """Anyone may drop files in the output folder: a sidecar nested 100,000 deep is a caption-less video."""
    from contentv.served import ServedFiles

    (tmp_path / "clip.mp4").write_bytes(b"\0")
    (tmp_path / "clip.json").write_text("[" * 100_000 + "]" * 100_000)
    files = ServedFiles(tmp_path)
    try:
        assert files.gallery() == [(str(tmp_path / "clip.mp4"), "clip")]
    finally:
        files.close()
