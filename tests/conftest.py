"""Shared fixtures: one tiny ContentV checkpoint per test session, built offline into a temp cache."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Under pytest-xdist (-n N) each worker is one process per core: one intra-op thread each, inherited by the processes
# the tests start, so N workers don't oversubscribe the cores (OpenMP's spinning made tiny runs 5-10x slower).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A private CONTENTV_CACHE for the session (also inherited by demo.py subprocesses); under pytest-xdist one for
    all the workers (a tiny checkpoint is built in a private folder and renamed into place, so two workers building
    the same one at once both end with it)."""
    if XDIST_WORKER:
        path = tmp_path_factory.getbasetemp().parent / "contentv-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("contentv-cache")
    old = os.environ.get("CONTENTV_CACHE")
    os.environ["CONTENTV_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CONTENTV_CACHE", None)
    else:
        os.environ["CONTENTV_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_cfg():
    from contentv.config import ModelConfig

    return ModelConfig(name="tiny_contentv", family="contentv", path=None, tiny=True, dtype="float32")


@pytest.fixture(scope="session")
def tiny_ckpt(cache_dir, tiny_model_cfg) -> str:
    from contentv.models.contentv import SPEC

    return SPEC.resolve_path(tiny_model_cfg)


@pytest.fixture
def tiny_pipe(tiny_ckpt):
    """A freshly loaded tiny ContentV pipeline on the CPU with our SDPA processor."""
    from contentv.attention import sdpa
    from contentv.models.contentv import SPEC
    from contentv.models.contentv.pipeline import ContentVPipeline

    pipe = ContentVPipeline.from_pretrained(tiny_ckpt, torch_dtype=torch.float32)
    SPEC.install_attention(pipe, sdpa)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module: the tiny models gain nothing from more, and on a shared 2-core
    machine OpenMP's spinning made a 1-step tiny run 5-10x slower (measured 2.5 s vs 0.2-0.5 s)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def virtual_backend(cache_dir):
    """The test-only backend `virtual` (tests/virtual_backend.py) registered in-process with its one registry line,
    built and set up (the virtual device installed); unregistered and the device uninstalled afterwards."""
    import backends
    from contentv.config import BackendConfig
    from tests import virtual_backend as vb

    backends.register("virtual", "tests.virtual_backend:VirtualBackend")
    try:
        backend = backends.build_backend(BackendConfig(name="virtual"))
        backend.setup()
        yield backend
    finally:
        backends.BACKENDS.pop("virtual", None)
        vb.uninstall()


# Tests of the test doubles' own features, not of the runtime: the NPU stand-in's argument checks, layouts, masks and
# sparse modes that backends/npu.py never calls, and the virtual device's mechanics. Marked `standin` here (one
# list, not a decorator per test): the fast tier (-m "not slow and not standin") leaves them out; the full suite
# runs them.
STANDIN = {
    "test_npu.py": (
        "test_standin_",
        "test_fusion_rejects",
        "test_fusion_says",
        "test_fusion_accepts",
        "test_fusion_returns",
        "test_fusion_mask",
        "test_fusion_sparse",
        "test_fused_infer_rejects",
        "test_fused_infer_says",
        "test_fused_infer_documented",
        "test_fused_infer_gqa",
        "test_fused_infer_sparse",
        "test_signatures_are_the_schemas",
        "test_ops_reject_tensors",
        "test_schema_excerpt",
    ),
    "test_virtual_device.py": (
        "test_install_registers",
        "test_tensors_left_on",
        "test_to_device_and_back",
        "test_ops_compute_exactly",
        "test_mixing_devices",
        "test_zero_dim_cpu",
        "test_cpu_indices",
        "test_factories_make",
        "test_host_conversions",
        "test_deepcopy_of",
        "test_generators_stay",
        "test_copies_are_recorded",
        "test_copy_regions",
        "test_memory_counts",
        "test_capacity_is_enforced",
        "test_device_module_answers",
        "test_module_to_device",
        "test_param_data_assignment",
        "test_autograd_runs",
        "test_device_type_is",
        "test_library_caches_forget",
    ),
}


def cpu_features() -> str:
    """The CPU features the run had (issue 18 §4): bitsandbytes and oneDNN pick kernels by them."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8", "asimd", "sve")
    shown = " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)
    return f"cpu: {platform.machine()}, torch capability {torch.backends.cpu.get_cpu_capability()}, flags: {shown}"


def pytest_report_header(config) -> list[str]:
    return [cpu_features(), 'tiers: fast = -m "not slow and not standin"; full = no -m']


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """-q (the project's addopts) hides the header: CI's log gets the CPU line at the end instead."""
    if config.get_verbosity() < 0:
        terminalreporter.write_line(cpu_features())


def pytest_collection_modifyitems(config, items):
    """Device tests skip cleanly where the device is absent; the test doubles' self-tests are marked `standin`."""
    has_cuda = torch.cuda.is_available()
    has_npu = importlib.util.find_spec("torch_npu") is not None
    for item in items:
        prefixes = STANDIN.get(Path(str(item.fspath)).name, ())
        if item.name.startswith(prefixes):
            item.add_marker(pytest.mark.standin)
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
        if "npu" in item.keywords and not has_npu:
            item.add_marker(pytest.mark.skip(reason="needs an Ascend NPU with torch_npu"))


@dataclass(frozen=True)
class CliRun:
    """A command-line run made as a user makes it: its folder, arguments, exit status, printed text, and the
    top-level modules the process had imported when it ended."""

    folder: Path
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    imported: frozenset[str]


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory, cache_dir) -> CliRun:
    """One tiny video through a real `python demo.py` process (output to files, as in a log or CI), shared by every
    test that only reads what it wrote or printed. Tests that add files copy the folder first."""
    import subprocess

    from tests.helpers import demo_env

    top = tmp_path_factory.mktemp("golden")
    folder, probe = top / "run", top / "imported.json"
    args = ("model=tiny_contentv", "backend=cpu", "sampling.prompt=a red fox walks in snow", f"hydra.run.dir={folder}")
    env = demo_env(cache_dir, faults={"CONTENTV_PROBE_IMPORTS": str(probe)})
    env = {k: v for k, v in env.items() if not k.startswith("PYTEST")}  # a user's shell, not pytest's
    cmd = [sys.executable, str(ROOT / "demo.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=top, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = frozenset(json.loads(probe.read_text()))
    return CliRun(folder, args, proc.returncode, proc.stdout, proc.stderr, imported)


@pytest.fixture(scope="session")
def cpu_frames(cache_dir):
    """`cpu_frames(cfg, key="", prepare=None)`: the frames of `cfg` run on the CPU with every weight resident, the
    reference a device run must match. Made once per config for the whole session; `prepare(pipeline)` is a step
    before the run that changes its output (e.g. smaller VAE tiles), named by `key`."""
    import dataclasses

    import backends
    from contentv.config import BackendConfig
    from contentv.runtime import Runtime

    made: dict[tuple[str, str], object] = {}

    def get(cfg, key: str = "", prepare=None):
        assert cfg.backend.name == "cpu", "the reference run is the CPU's"
        index = (json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str), key)
        if index not in made:
            runtime = Runtime(backends.build_backend(BackendConfig(name="cpu")), progress=False)
            if prepare is not None:
                prepare(runtime.pipeline(cfg))
            made[index] = runtime.generate(cfg).frames
            runtime.release()
        return made[index]

    return get
