"""Beyond one GPU: the parallel modes under torchrun on the CPU (gloo), and their contracts without it.

The torchrun tests launch tests/parallel_worker.py once per world size (2 and 4 ranks) and check each scenario
it ran: every parallel mode's output equals the single-process output (fp32), data-parallel sharding generates
every prompt x seed exactly once, and only the writing ranks write files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import backends
from backends import distributed
from backends.cpu import cpu_flash_forward_op
from contentv import parallel
from contentv.config import BackendConfig, MemoryConfig, SpeedupConfig
from contentv.errors import ConfigError
from contentv.parallel import Layout, ParallelConfig, World
from contentv.parallel.context import apply
from contentv.parallel.data import shard, split_evenly, work_items
from contentv.registry import get_spec

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "parallel_worker.py"
# fp32 on the CPU: parallel and single-process differ only by summation order (observed <= 5e-6)
TOLERANCE = 5e-5

SCENARIOS = {
    2: [
        "sd3:ulysses",
        "sd3:ring",
        "sd3:cfg",
        "control:ulysses",
        "npu:ulysses",
        "cog5b:ulysses",
        "cog5b:ring",
        "cog2b:ulysses",
        "pipe:ulysses",
        "pipe:ring",
        "pipe:cfg",
        "pipecog:ulysses",
        "runtime:ulysses",
        "runtime:cfg",
        "model_offload:ulysses",
        "group_offload:ring",
        "data",
    ],
    4: [
        "sd3:ulysses",
        "sd3:ring",
        "sd3:cfg+ulysses",
        "sd3:cfg+ring",
        "sd3even:ulysses_even",
        "sd3even:ring_even",
        "cog5b:ulysses",
        "cog5b:cfg+ring",
        "cog2b:ring",
        "pipe:cfg+ulysses",
        "pipecog:ring",
        "runtime:ring",
        "group_offload:cfg+ulysses",
        "data:cfg",
        "data:ulysses",
    ],
}
NUMERIC = [(n, s) for n, names in SCENARIOS.items() for s in names if not s.startswith(("data", "control"))]
DATA = [(n, s) for n, names in SCENARIOS.items() for s in names if s.startswith("data")]


# ------------------------------------------------------------------------------------------ torchrun


def _launch(nproc: int, out: Path) -> list[dict]:
    """Run the worker under torchrun; every rank's results (a failed or hung launch fails every test)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(WORKER), str(out), *SCENARIOS[nproc]]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        log, _ = proc.communicate()
        pytest.fail(f"torchrun --nproc_per_node={nproc} hung:\n{log[-4000:]}")
    if proc.returncode:
        pytest.fail(f"torchrun --nproc_per_node={nproc} exited {proc.returncode}:\n{log[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_ckpt, cache_dir) -> dict:
    """Each world size launched once per module, lazily; the tiny checkpoints are built before (not by 4 ranks)."""
    from contentv.config import ModelConfig
    from contentv.models.cogvideox import SPEC as COG

    COG.resolve_path(ModelConfig(name="tiny_cogvideox_5b", family="cogvideox", path=None, tiny=True))
    done: dict = {}

    def get(nproc: int) -> list[dict]:
        if nproc not in done:
            done[nproc] = _launch(nproc, tmp_path_factory.mktemp(f"torchrun{nproc}"))
        return done[nproc]

    return get


def _scenario(ranks: list[dict], name: str) -> list[dict]:
    results = [r["scenarios"][name] for r in ranks]
    errors = [
        f"rank {r['rank']}: {s['error']}\n{s.get('traceback', '')}"
        for r, s in zip(ranks, results, strict=True)
        if "error" in s
    ]
    assert not errors, "\n".join(errors)
    return results


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "scenario"), NUMERIC, ids=[f"{n}ranks-{s}" for n, s in NUMERIC])
def test_parallel_output_equals_single_process(launches, nproc: int, scenario: str):
    results = _scenario(launches(nproc), scenario)
    for rank, r in enumerate(results):
        assert r["max_abs"] <= r.get("tolerance", TOLERANCE) * max(1.0, r["ref_abs"]), f"rank {rank}: {r}"
    if scenario.startswith("npu"):
        # every attention call went to npu_fusion_attention, BSND, on this rank's (padded) share of 7 heads
        assert all(r["npu_calls"] == 2 for r in results), results  # 2 layers, one forward
        call = results[0]["npu_call"]
        assert call["input_layout"] == "BSND" and call["head_num"] == 4 and call["dtype"] == "torch.bfloat16", call
    if scenario.startswith(("runtime", "model_offload", "group_offload")):
        # one generation: only rank 0 writes (video, sidecar, index.json), and every rank's frames agree
        assert [r["wrote"] for r in results] == [True] + [False] * (nproc - 1)
        files = results[0]["files"]
        assert len([f for f in files if f.endswith(".mp4")]) == 1 and "index.json" in files, files
        assert not any(r["stray"] for r in results)  # every rank used rank 0's folder
        prepared = results[0]["prepared"]
        assert "cfg" in scenario or prepared["attention_kernel"].startswith(scenario.split(":")[1]), prepared
        if "offload" in scenario:  # the memory strategy really ran on top of the parallel hooks
            assert "offload" in prepared["placement"], prepared


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2])
def test_wrong_plan_is_caught(launches, nproc: int):
    """Control: with the text tokens replicated instead of split, the comparison fails (the test can fail)."""
    for r in _scenario(launches(nproc), "control:ulysses"):
        assert r["max_abs"] > 1e-3, r


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "scenario"), DATA, ids=[f"{n}ranks-{s}" for n, s in DATA])
def test_data_parallel_generates_every_prompt_and_seed_once(launches, nproc: int, scenario: str):
    results = _scenario(launches(nproc), scenario)
    group = 1 if scenario == "data" else 2  # ranks per generation: data = pure data parallel
    expected = {(p, s) for p in ("a red fox", "a blue whale", "a green frog") for s in (1, 2)}
    written = [(p, s) for r in results[::group] for p, s, video in r["mine"] if video]
    assert sorted(written) == sorted(expected)  # every item once, by the first rank of its group
    for rank, r in enumerate(results):
        leader = results[rank - rank % group]
        assert [m[:2] for m in r["mine"]] == [m[:2] for m in leader["mine"]]  # a group works on the same items
        assert all(video is None for *_, video in r["mine"]) == (rank % group != 0)
    assert not any(r["stray"] for r in results)
    files = results[0]["files"]  # one folder for the launch (rank 0's), whatever folder the others were given
    assert len([f for f in files if f.endswith(".mp4")]) == 6 and "index.json" in files, files
    index = results[0]["index"]
    assert index["world_size"] == nproc and [e["index"] for e in index["outputs"]] == list(range(6))
    assert {(e["prompt"], e["seed"]) for e in index["outputs"]} == expected
    assert all(e["video"] in files and e["sidecar"] in files and e["rank"] % group == 0 for e in index["outputs"])


def _free_port_for_slurm_job_id() -> int:
    """A free port in 20000..39999, the range backends.distributed derives MASTER_PORT from SLURM_JOB_ID in."""
    import random
    import socket

    for port in random.sample(range(20000, 40000), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 20000..39999")


@pytest.mark.slow
def test_slurm_tasks_without_torchrun_join_one_process_group(tmp_path: Path):
    """Two plain processes with only SLURM's variables (how submitit starts tasks) find each other and run."""
    port = _free_port_for_slurm_job_id()
    torchrun_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in torchrun_vars and not k.startswith("SLURM_")}
    procs = []
    for rank in range(2):
        env = {
            **base,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_ID": str(port - 20000),  # MASTER_PORT = 20000 + job id % 20000
        }
        cmd = [sys.executable, str(WORKER), str(tmp_path), "sd3:cfg"]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("SLURM-style launch hung")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    for r in _scenario(ranks, "sd3:cfg"):
        assert r["max_abs"] <= TOLERANCE * max(1.0, r["ref_abs"]), r


# ------------------------------------------------------------------------------------------ layout and checks


def test_layout_multiplies_to_the_world():
    assert parallel.layout(ParallelConfig(), 1) == Layout()
    assert parallel.layout(ParallelConfig(), 8) == Layout(dp=8)
    assert parallel.layout(ParallelConfig(ulysses_degree=4), 8) == Layout(dp=2, ulysses=4)
    assert parallel.layout(ParallelConfig(ring_degree=2, cfg_parallel=True), 8) == Layout(dp=2, cfg=2, ring=2)
    assert parallel.layout(ParallelConfig(ulysses_degree=8, cfg_parallel=True), 16).group_size == 16
    with pytest.raises(ConfigError, match=r"parallel.ulysses_degree=2 .*torchrun --nproc_per_node=2"):
        parallel.layout(ParallelConfig(ulysses_degree=2), 1)
    with pytest.raises(ConfigError, match=r"parallel.cfg_parallel=True .*torchrun --nproc_per_node=2"):
        parallel.layout(ParallelConfig(cfg_parallel=True), 1)
    with pytest.raises(ConfigError, match=r"parallel.ring_degree=3 .*divide the 4 ranks"):
        parallel.layout(ParallelConfig(ring_degree=3), 4)
    with pytest.raises(ConfigError, match=r"parallel.data_parallel_degree=3 .*null or 2"):
        parallel.layout(ParallelConfig(ulysses_degree=2, data_parallel_degree=3), 4)


@pytest.mark.parametrize(
    ("cfg", "memory", "speedup", "match"),
    [
        (ParallelConfig(ulysses_degree=2, ring_degree=2), None, None, r"parallel.ring_degree=2 .*pick Ulysses or ring"),
        (ParallelConfig(ulysses_degree=0), None, None, r"parallel.ulysses_degree=0 .*>= 1"),
        (ParallelConfig(seeds=[]), None, None, r"parallel.seeds=\[\]"),
        (ParallelConfig(cfg_parallel=True), MemoryConfig(guidance_mode="sequential"), None, "memory.guidance_mode"),
        (ParallelConfig(ring_degree=2), MemoryConfig(attention_slicing=1024), None, "memory.attention_slicing"),
        (ParallelConfig(cfg_parallel=True), None, SpeedupConfig(cache="first_block"), "speedup.cache"),
    ],
)
def test_check_rejects_what_cannot_run(cfg, memory, speedup, match):
    with pytest.raises(ConfigError, match=match):
        parallel.check(cfg, memory, speedup)


def test_data_parallel_alone_accepts_any_memory_and_speedup():
    parallel.check(ParallelConfig(seeds=[1, 2]), MemoryConfig(attention_slicing=64), SpeedupConfig(cache="first_block"))


def test_world_coordinates_are_row_major_and_the_group_leader_writes():
    lay = Layout(dp=2, cfg=2, ring=1, ulysses=2)  # 8 ranks, groups of 4
    coords = [World(rank=r, size=8).coords(lay) for r in range(8)]
    assert coords[0] == {"dp": 0, "cfg": 0, "ring": 0, "ulysses": 0}
    assert coords[1] == {"dp": 0, "cfg": 0, "ring": 0, "ulysses": 1}
    assert coords[2] == {"dp": 0, "cfg": 1, "ring": 0, "ulysses": 0}
    assert coords[7] == {"dp": 1, "cfg": 1, "ring": 0, "ulysses": 1}
    assert [World(rank=r, size=8).is_writer(lay) for r in range(8)] == [r in (0, 4) for r in range(8)]
    # the same layout as torch's init_device_mesh: arange(world).view(shape)
    grid = torch.arange(8).view(lay.shape)
    assert all(grid[tuple(c.values())] == r for r, c in enumerate(coords))


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 8, 13])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 8])
def test_split_evenly_is_accelerates_split_between_processes(n: int, count: int):
    from accelerate import PartialState

    items = list(range(n))
    shards = []
    for index in range(count):
        state = SimpleNamespace(num_processes=count, process_index=index)  # duck-typed PartialState
        with PartialState.split_between_processes(state, items) as theirs:
            assert split_evenly(items, index, count) == list(theirs)
        shards += split_evenly(items, index, count)
    assert shards == items  # contiguous, complete, no repeats


def test_shard_gives_a_group_the_same_items_and_each_item_one_group():
    items = work_items(["a", "b", "c"], [1, 2])
    assert [(i.index, i.prompt, i.seed) for i in items[:3]] == [(0, "a", 1), (1, "a", 2), (2, "b", 1)]
    lay = Layout(dp=2, ulysses=2)
    mine = [shard(items, World(rank=r, size=4), lay) for r in range(4)]
    assert mine[0] == mine[1] and mine[2] == mine[3]
    assert sorted(mine[0] + mine[2], key=lambda i: i.index) == items
    assert shard(items, World(), Layout()) == items


def test_single_process_apply_changes_nothing(tiny_pipe):
    processors = {k: type(v) for k, v in tiny_pipe.transformer.attn_processors.items()}
    applied = apply(tiny_pipe, ParallelConfig(), get_spec("contentv"), World())
    assert applied.kernel is None and applied.layout == Layout()
    assert applied.record["parallel"]["layout"] == {"dp": 1, "cfg": 1, "ring": 1, "ulysses": 1}
    assert not hasattr(tiny_pipe.transformer, "_diffusers_hook")
    assert {k: type(v) for k, v in tiny_pipe.transformer.attn_processors.items()} == processors


def test_plans_name_real_modules(tiny_pipe):
    """Every module a plan hooks exists (a renamed module would silently stop splitting)."""
    from diffusers import CogVideoXTransformer3DModel

    cog = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, time_embed_dim=8, text_embed_dim=8, num_layers=1
    )
    for family, model in (("contentv", tiny_pipe.transformer), ("cogvideox", cog)):
        for module_id in get_spec(family).cp_plan():
            assert module_id == "" or model.get_submodule(module_id) is not None


@pytest.mark.parametrize("yaml_name", sorted(p.stem for p in (ROOT / "conf" / "parallel").glob("*.yaml")))
def test_parallel_presets_are_typed_configs(yaml_name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    node = OmegaConf.merge(
        OmegaConf.structured(ParallelConfig), OmegaConf.load(ROOT / "conf/parallel" / f"{yaml_name}.yaml")
    )
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, ParallelConfig)
    parallel.layout(cfg, 4)  # each preset runs on 4 ranks
    if yaml_name in ("ulysses", "ring"):
        assert getattr(cfg, f"{yaml_name}_degree") == 4  # the whole launch


# ------------------------------------------------------------------------------------------ backends/distributed


def test_launch_env_from_torchrun_slurm_or_nothing():
    assert distributed.launch_env({}) == distributed.LaunchEnv()
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}
    assert distributed.launch_env(env) == distributed.LaunchEnv(3, 8, 3, 4, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8(x2)"}
    assert distributed.launch_env(slurm) == distributed.LaunchEnv(5, 16, 5, 8, "slurm")
    assert distributed.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1


def test_slurm_variables_become_torchrun_variables():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "123456",
    }
    launch = distributed.export_slurm_env(env)
    assert launch.source == "slurm"
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07",
    }
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    # torchrun's own variables win
    torchrun = {**env, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}
    assert distributed.export_slurm_env(torchrun).source == "torchrun" and torchrun["MASTER_ADDR"] == "x"


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node1", "node1"), ("gpu[03-05,09],cpu1", "gpu03"), ("a-b[1,4]", "a-b1"), ("x[007-010]", "x007")],
)
def test_first_host_of_a_slurm_nodelist(nodelist: str, host: str):
    assert distributed.first_host(nodelist) == host


def test_configure_points_the_device_at_local_rank(monkeypatch: pytest.MonkeyPatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    cfg = BackendConfig(name="cuda", device_index=0)
    assert distributed.configure(cfg).world_size == 1 and cfg.device_index == 0
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 4)
    assert distributed.configure(cfg).rank == 6 and cfg.device_index == 2
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)  # one device visible per task
    assert distributed.configure(cfg).local_rank == 2 and cfg.device_index == 0


def test_process_group_backend_per_device():
    """Each backend names its own collective library; host tensors go through gloo beside it."""
    assert backends.backend_class("cpu").process_group_backend == "gloo"
    assert backends.backend_class("cuda").process_group_backend == "cpu:gloo,cuda:nccl"
    assert "npu:hccl" in backends.backend_class("npu").process_group_backend


def test_npu_backend_asks_for_hccl(monkeypatch: pytest.MonkeyPatch):
    """Contract on the strict torch_npu stand-in: the NPU backend's process group is HCCL on its own device."""
    from backends.npu import NPUBackend
    from tests.npu_standin import install, uninstall

    install(monkeypatch, device_count=8)
    try:
        monkeypatch.setenv("RANK", "3")
        monkeypatch.setenv("WORLD_SIZE", "8")
        monkeypatch.setenv("LOCAL_RANK", "3")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as torchrun sets it
        monkeypatch.setenv("MASTER_PORT", "29500")
        cfg = BackendConfig(name="npu")
        distributed.configure(cfg)
        backend = NPUBackend(cfg)
        calls = []
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(calls))
        monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
        assert distributed.init_process_group(backend) == (3, 8)
        assert calls == [{"backend": "cpu:gloo,npu:hccl"}] and backend.device == torch.device("npu", 3)
    finally:
        uninstall()


def chooser(backend: str, attention: str):
    """The backend class's context-parallel attention choice, bound to a config (it needs no device)."""
    cls = backends.backend_class(backend)
    return cls.context_parallel_attention.__get__(SimpleNamespace(cfg=BackendConfig(name=backend, attention=attention)))


@pytest.mark.parametrize(
    ("backend", "attention", "dtype", "ring", "expected"),
    [
        ("cpu", "auto", torch.float32, False, "native"),
        ("cpu", "sdpa", torch.float32, True, cpu_flash_forward_op),
        ("cuda", "auto", torch.bfloat16, False, "native"),
        ("cuda", "auto", torch.bfloat16, True, "_native_cudnn"),
        ("cuda", "flash", torch.float16, True, "flash"),
        ("npu", "npu_fusion", torch.bfloat16, False, "_native_npu"),
        ("npu", "npu_fusion", torch.float32, False, "native"),
    ],
)
def test_context_parallel_attention_per_device(backend, attention, dtype, ring, expected, monkeypatch):
    from diffusers.models import attention_dispatch

    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", True)  # as with a usable flash-attn installed
    assert chooser(backend, attention)(dtype, ring) == expected


def test_context_parallel_with_an_unusable_kernel_is_refused(monkeypatch):
    from diffusers.models import attention_dispatch

    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", False)
    with pytest.raises(ConfigError, match=r"backend.attention='flash' is not valid: a usable kernel"):
        chooser("cuda", "flash")(torch.bfloat16, True)


@pytest.mark.parametrize(
    ("backend", "attention", "dtype", "ring", "match"),
    [
        ("cuda", "auto", torch.float32, True, "model.dtype='float32'"),
        ("cuda", "flash3", torch.bfloat16, False, "backend.attention='flash3'"),
        ("npu", "auto", torch.bfloat16, True, "parallel.ring_degree"),
    ],
)
def test_context_parallel_attention_gaps_are_config_errors(backend, attention, dtype, ring, match):
    with pytest.raises(ConfigError, match=match):
        chooser(backend, attention)(dtype, ring)


def test_cpu_forward_op_returns_attention_and_its_log_sum_exp():
    q, k, v = (torch.randn(2, 7, 3, 16) for _ in range(3))  # (B, S, H, D), diffusers' layout
    out, lse = cpu_flash_forward_op(None, q, k, v, return_lse=True)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2))
    scores = qt @ kt.transpose(-1, -2) / 16**0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).transpose(1, 2))  # (B, S, H)


def test_single_process_world_without_a_launcher(monkeypatch: pytest.MonkeyPatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    backend = SimpleNamespace(name="cpu", device=torch.device("cpu"))
    world = distributed.init_world(backend)
    assert (world.rank, world.size) == (0, 1) and world.gather("x") == ["x"] and world.broadcast("y") == "y"
    assert distributed.is_main_process()
    world.barrier(), distributed.barrier()


def test_even_splits_are_checked_against_the_model_before_loading():
    """parallel.uneven=false with ContentV: 333 text tokens (and 38 heads) divide by no degree > 1; diffusers would
    assert at the first forward. It is a one-line error before any weights load, naming the counts."""
    from contentv.config import RunConfig
    from contentv.validation import check_settings as validate_run  # the settings phase of the pre-flight check

    cfg = RunConfig()  # ContentV-8B, sized from its built-in configs (nothing is downloaded or loaded)
    cfg.sampling.prompt = "a cat"
    cfg.parallel = ParallelConfig(ulysses_degree=2, uneven=False)
    with pytest.raises(ConfigError, match=r"parallel.uneven=False .* 333 text tokens don't divide by the ulysses"):
        validate_run(cfg, world_size=2)
    cfg.parallel = ParallelConfig(ulysses_degree=4, uneven=False)
    with pytest.raises(ConfigError, match="38 attention heads, 333 text tokens"):
        validate_run(cfg, world_size=4)
    cfg.parallel = ParallelConfig(ulysses_degree=2, uneven=True)  # the default: uneven splits work
    validate_run(cfg, world_size=2)


def test_rank_variables_without_a_rendezvous_address_are_one_line():
    env = {"RANK": "0", "WORLD_SIZE": "2"}
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 is not valid: 1 without a launcher: .* MASTER_ADDR and"):
        distributed.check_launch(env)
    assert distributed.check_launch({**env, "MASTER_ADDR": "h", "MASTER_PORT": "1"}).world_size == 2
    assert distributed.check_launch({"WORLD_SIZE": "2"}).world_size == 1  # no RANK: not a launch


@pytest.mark.slow
def test_ranks_that_never_join_time_out_with_one_line(tmp_path):
    """RANK/WORLD_SIZE/MASTER_* left set without a launcher: rank 0 would wait for rank 1 forever."""
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29_000 + os.getpid() % 1000),
        "CONTENTV_JOIN_TIMEOUT": "1",
        "PYTHONPATH": str(ROOT),
    }
    code = "from backends import build_backend, distributed; from contentv.config import BackendConfig; "
    code += "distributed.init_process_group(build_backend(BackendConfig(name='cpu')))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error: rank 0 of 2: the other ranks did not join within 1 s" in proc.stderr
    assert "Traceback" not in proc.stderr
