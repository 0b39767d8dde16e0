"""A diffusers user's first day: export_to_video after install, a quiet Python API, the download hint, file names
from any script, the page's frame rule and start-up time, and --help and README agreeing on offload streams."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import contentv
from contentv.errors import ConfigError
from contentv.hub import check_hub
from contentv.video import slugify
from tests.test_api import readme_python_blocks

ROOT = Path(__file__).resolve().parents[1]
# tqdm's step bar as diffusers draws it ("100%|██████████| 4/4 [00:01<00:00, 3.1it/s]"): the one line a pipeline
# call shows by default, as diffusers' own pipelines do.
STEP_BAR = re.compile(r"^\s*\d+%\|[^|]*\| \d+/\d+ \[[^\]]*\]$")


# ------------------------------------------------------------------------------------------ export_to_video


def test_imageio_is_a_dependency():
    """diffusers' export_to_video needs imageio (with imageio-ffmpeg); without it, it falls back to OpenCV."""
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.findall(r'^\s*"([^"]+)",', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1), re.M)
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in deps}
    assert {"imageio", "imageio-ffmpeg"} <= names


def test_export_to_video_on_a_pipelines_frames(cache_dir, tmp_path, single_thread):
    import imageio_ffmpeg
    import torch
    from diffusers.utils import export_to_video

    pipe = contentv.CogVideoXRuntimePipeline.from_pretrained(contentv.tiny_checkpoint("tiny_cogvideox"))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        "a red fox", height=32, width=48, num_frames=9, num_inference_steps=1, generator=torch.Generator()
    ).frames[0]  # PIL images, diffusers' default output_type
    out = export_to_video(frames, str(tmp_path / "out.mp4"), fps=8)
    assert imageio_ffmpeg.count_frames_and_secs(out)[0] == 9


# ------------------------------------------------------------------------------------------ a quiet Python API

QUIET_SCRIPT = """
import torch

import contentv

{readme}
pipe = contentv.CogVideoXRuntimePipeline.from_pretrained(contentv.tiny_checkpoint("tiny_cogvideox"))
pipe("a cat", height=32, width=48, num_frames=9, num_inference_steps=1, generator=torch.Generator())
"""


@pytest.mark.slow
def test_python_api_prints_only_the_step_bar(cache_dir, tmp_path):
    """README's "From Python" pipeline snippet and a CogVideoX call, as a user runs them (no environment set up for
    quiet): nothing but diffusers' step bar; no torchvision notices, no "Loading weights" bars, no lines from
    bitsandbytes or torchao (nothing asked for quantization)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "DIFFUSERS_", "HF_HUB_VERB"))}
    env.update(CONTENTV_CACHE=str(cache_dir), PYTHONPATH=str(ROOT))
    script = QUIET_SCRIPT.format(readme=readme_python_blocks()[0])
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""
    noise = [ln for ln in re.split(r"[\r\n]+", proc.stderr) if ln.strip() and not STEP_BAR.match(ln)]
    assert noise == []
    assert "bitsandbytes" not in proc.stderr and "torchao" not in proc.stderr


@pytest.mark.slow
def test_importing_contentv_defers_the_quantization_libraries_only_while_the_models_load():
    """`import contentv` before diffusers' models keeps torchao and bitsandbytes from being imported with them; a
    Python user's own diffusers quantization (BitsAndBytesConfig, TorchAoConfig) still finds them afterwards."""
    code = (
        "import sys, contentv, diffusers, transformers\n"
        "from contentv.models.cogvideox.pipeline import CogVideoXRuntimePipeline\n"
        "import transformers.modeling_utils\n"
        "from diffusers.utils import is_bitsandbytes_available, is_torchao_available\n"
        "from transformers.utils import is_torchao_available as transformers_torchao\n"
        "print(sorted(m for m in ('torchao', 'bitsandbytes') if m in sys.modules))\n"
        "print(is_bitsandbytes_available(), is_torchao_available(), transformers_torchao())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported, available = proc.stdout.splitlines()
    assert imported == "[]"
    assert available == "True True True"  # the test extras install both
    assert "requires torchvision" not in proc.stderr


# ------------------------------------------------------------------------------------------ help where the user is


def test_the_download_hint_names_the_hf_command():
    with pytest.raises(ConfigError, match=r"\(hf download someone/model --local-dir <folder>\)"):
        check_hub("someone/model", None, local_files_only=True)
    # huggingface_hub installs the command the hint names.
    scripts = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points}
    assert "hf" in scripts


@pytest.mark.parametrize(
    "prompt,stem",
    [
        ("ünïcode prompt", "unicode-prompt"),
        ("A young musician, strumming!", "a-young-musician-strumming"),
        ("日本語 の 猫", "日本語-の-猫"),
        ("한국어 고양이", "한국어-고양이"),
        ("हिन्दी कविता", "हिन्दी-कविता"),
        ("Ｆｕｌｌ　ｗｉｄｔｈ", "full-width"),
        ("../../etc/passwd", "etc-passwd"),
        (".hidden\x00name", "hidden-name"),
        ("!!!", "video"),
    ],
)
def test_file_names_keep_the_prompts_letters_and_stay_safe(prompt, stem):
    assert slugify(prompt) == stem


def test_file_names_stay_short_in_any_script():
    slug = slugify("猫" * 300)
    assert len(slug) == 48 and len(slug.encode()) < 200  # well under the 255-byte file name limit


def test_offload_stream_help_and_readme_name_the_backends_that_have_streams():
    """--help shows the field's comment; the README's memory table says the same. Both name every backend whose
    class has offload streams, and the CPU as copying without them."""
    import backends

    with_streams = []
    for name, target in backends.BACKENDS.items():
        module, cls = target.split(":")
        if getattr(importlib.import_module(module), cls).supports_offload_streams:
            with_streams.append(name.upper())
    assert sorted(with_streams) == ["CUDA", "NPU"]
    source = (ROOT / "contentv" / "config.py").read_text()
    comment = re.search(r"#([^\n]*)\n\s*group_offload_stream:", source).group(1)
    readme = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if "`group_offload_stream` (" in ln)
    for text in (comment, readme):
        assert all(name in text for name in with_streams), text
        assert "the CPU copies without streams" in text
        assert "CUDA only" not in text


# ------------------------------------------------------------------------------------------ the web page


def test_frames_label_is_the_familys_rule():
    from contentv.config import SamplingConfig
    from contentv.form import frames_label
    from contentv.registry import FAMILIES, get_spec

    assert frames_label("cogvideox") == "Frames (8k+1)" and frames_label("contentv") == "Frames (4k+1)"
    for family in FAMILIES:
        spec = get_spec(family)
        step = spec.frames_multiple
        for n, ok in ((1 + step, True), (1 + 2 * step, True), (1 + step + 4, step == 4)):
            s = SamplingConfig(
                prompt="x", num_frames=n, height=64, width=96, num_inference_steps=1, seed=0, fps=8, guidance_scale=6.0
            )
            if ok:
                spec.validate(s)
            else:
                with pytest.raises(ConfigError, match="sampling.num_frames"):
                    spec.validate(s)


@pytest.fixture(scope="module")
def studio(cache_dir, tmp_path_factory):
    from backends import build_backend
    from contentv import studio as st
    from tests.test_ui import PRESETS, tiny_cfg

    return st.Studio(tiny_cfg(tmp_path_factory.mktemp("habits-ui")), PRESETS, build_backend)


def test_the_page_relabels_frames_when_the_model_changes(studio):
    from contentv import ui

    assert studio.frames_label("tiny_cogvideox") == "Frames (8k+1)"
    assert studio.frames_label("tiny_contentv") == "Frames (4k+1)"
    blocks = ui.build_blocks(studio)
    widget = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "frames")
    assert widget.label == "Frames (4k+1)"  # the command line's model: tiny_contentv
    on_model = next(f.fn for f in blocks.fns.values() if f.api_name == "model_defaults")
    updates = on_model("tiny_cogvideox")
    assert updates[list(ui.MODEL_DEFAULT_FIELDS).index("num_frames")]["label"] == "Frames (8k+1)"


@pytest.mark.slow
def test_a_page_jobs_startup_is_the_jobs_not_the_servers_idle_time(studio, monkeypatch, single_thread):
    """A server started long ago: its first job's "startup" counts from the job, not from the server's start."""
    from tests.test_ui import form, run

    monkeypatch.setattr(contentv, "IMPORTED_AT", time.time() - 3600)
    studio.runtimes.clear()  # the page's first job on a fresh runtime
    outcome = run(studio, form(studio))
    assert outcome.ok, outcome.status
    timings = outcome.record["timings_s"]
    assert timings.get("startup", 0) < 60 and timings["total"] < 600
