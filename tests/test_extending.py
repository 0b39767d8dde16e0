"""A new device is one file in backends/ (here tests/), one YAML and one registry line: the test-only backend
`virtual` (tests/virtual_backend.py, tests/conf/backend/virtual.yaml) runs the whole runtime with no change to
any production file, from the command line (entry point) and from Python (`backends.register`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import backends
from backends.base import Backend
from contentv.config import BackendConfig, ModelConfig, RunConfig
from contentv.runtime import Runtime
from tests.helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]
TEST_CONF = ROOT / "tests" / "conf"
TARGET = "tests.virtual_backend:VirtualBackend"
# What a production file would have to say to know about the test backend or its device.
MENTIONS = re.compile(r"\bvirtual\b|virtual_?backend|virtual_?device|[\"']lazy(:\d+)?[\"']", re.IGNORECASE)

pytestmark = pytest.mark.usefixtures("single_thread")


def write_entry_point(folder: Path) -> Path:
    """The registry line as a package would ship it: a .dist-info folder with entry_points.txt."""
    info = folder / "contentv_virtual_backend-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: contentv-virtual-backend\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{backends.ENTRY_POINT_GROUP}]\nvirtual = {TARGET}\n")
    return folder


def test_no_production_file_mentions_the_test_backend():
    files = [ROOT / "demo.py", *(p for d in ("backends", "contentv", "conf") for p in (ROOT / d).rglob("*"))]
    files = [p for p in files if p.is_file() and p.suffix in (".py", ".yaml", ".toml", ".txt", ".cfg")]
    assert len(files) > 30
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in MENTIONS.finditer(p.read_text())]
    assert not found, found
    assert "virtual" not in backends.BACKENDS


def test_entry_point_on_the_path_registers_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(write_entry_point(tmp_path)))
    backends._plugins.cache_clear()
    try:
        assert [ep.value for ep in entry_points(group=backends.ENTRY_POINT_GROUP, name="virtual")] == [TARGET]
        assert "virtual" in backends.names()
        cls = backends.backend_class("virtual")
        assert cls.__name__ == "VirtualBackend" and issubclass(cls, Backend)
        assert backends.resolve_name("auto") != "virtual"  # detect() is None: auto never picks it
    finally:
        backends._plugins.cache_clear()


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_virtual_backend(tmp_path, cache_dir):
    """`python demo.py hydra.searchpath=[file://tests/conf] backend=virtual ...`, registered by entry point only.
    The device is installed by the backend's setup(), before diffusers is first imported (demo.py loads lazily)."""
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": str(write_entry_point(tmp_path / "site")),
        "CONTENTV_CACHE": str(cache_dir),
        "OMP_NUM_THREADS": "1",  # see conftest.single_thread
    }
    cmd = [
        sys.executable,
        "demo.py",
        f"hydra.searchpath=[file://{TEST_CONF}]",
        "backend=virtual",
        "model=tiny_contentv",
        "memory=auto",  # the planner asks the backend's free_memory (mem_get_info)
        *SMALL,
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    videos, sidecars = list(out.glob("*.mp4")), list(out.glob("*.json"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0 and len(sidecars) == 1
    record = json.loads(sidecars[0].read_text())
    assert record["device"]["backend"] == "virtual" and record["device"]["device"] == "lazy:0"
    assert record["device"]["lanes"] == 1  # the device's own option, from its YAML
    assert record["config"]["backend"]["name"] == "virtual"
    assert record["prepared"]["memory_preset"] == "none" and record["prepared"]["placement"] == "device"
    assert record["peak_memory"]["device_bytes"] > 0  # from torch.lazy's counters


@pytest.mark.slow
def test_python_api_runs_on_the_virtual_backend(virtual_backend, tmp_path):
    backend = virtual_backend
    assert backends.build_backend(BackendConfig(name="virtual")).device == torch.device("lazy", 0)
    assert type(backend).context_parallel_attention is Backend.context_parallel_attention
    assert backend.process_group_backend == "gloo" and not backend.supports_offload_streams
    cfg = RunConfig(backend=BackendConfig(name="virtual"))
    cfg.model = ModelConfig(name="tiny_contentv", path=None, tiny=True, dtype="float32")
    cfg.sampling.prompt = "a red fox walks in snow"
    cfg.sampling.height, cfg.sampling.width, cfg.sampling.num_frames, cfg.sampling.num_inference_steps = 32, 48, 5, 1
    cfg.output.dir = str(tmp_path)
    result = Runtime(backend).run(cfg)
    assert result.video.is_file() and result.frames.shape == (5, 32, 48, 3)
    assert result.record["device"]["backend"] == "virtual"
    vd = backend.vd
    assert torch.lazy is vd.module
    assert backend.peak_memory() == vd.max_memory_allocated() > 0
    assert result.record["peak_memory"]["device_bytes"] > 0
    assert backend.free_memory() == vd.capacity  # mem_get_info's free + reserved (== allocated here)


def test_a_device_setting_of_its_own_needs_no_shared_edit(tmp_path, monkeypatch, cache_dir):
    """backend.options.lanes exists only in the test device's file and YAML: composed, checked by its backend and
    recorded, with a bad value refused in one line before anything runs."""
    import demo
    from contentv.config import BackendConfig as Config

    monkeypatch.syspath_prepend(str(write_entry_point(tmp_path / "ep")))
    backends._plugins.cache_clear()
    try:
        search = f"hydra.searchpath=[file://{TEST_CONF}]"
        cfg = demo.load_config(["model=tiny_contentv", "backend=virtual", search, "backend.options.lanes=4"])
        assert cfg.backend.options == {"lanes": 4}
        cls = backends.backend_class("virtual")
        assert cls.check_options(cfg.backend.options) == {"lanes": 4}
        with pytest.raises(
            backends.ConfigError, match=r"backend.options.lanes='four' is not valid: a value of type int"
        ):
            cls.check_options({"lanes": "four"})
        with pytest.raises(
            backends.ConfigError, match=r"backend.options.layout=.* an option of backend virtual \(lanes\)"
        ):
            cls.check_options({"layout": "BSND"})
        with pytest.raises(backends.ConfigError, match=r"backend.options.lanes=.* an option of backend cpu \(none\)"):
            backends.build_backend(Config(name="cpu", options={"lanes": 4}))
        code = demo.main(
            ["model=tiny_contentv", "backend=virtual", search, "backend.options.lanes=four", "dry_run=true"]
        )
        assert code == 2
    finally:
        backends._plugins.cache_clear()
