"""Data parallelism: prompts x seeds shared among groups of ranks; one index.json for the launch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from contentv.config import ParallelConfig
from contentv.parallel import DIMS, Layout, World, layout

if TYPE_CHECKING:
    from contentv.resolve import ResolvedRun
    from contentv.runtime import RunResult, Runtime, StepCallback

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    index: int
    prompt: str
    seed: int


def work_items(prompts: list[str], seeds: list[int]) -> list[WorkItem]:
    """Every (prompt, seed) pair, prompt-major, numbered in the order a single process would run them."""
    return [WorkItem(i, p, s) for i, (p, s) in enumerate((p, s) for p in prompts for s in seeds)]


def split_evenly(items: list, index: int, count: int) -> list:
    """Contiguous shard `index` of `count`, the first shards one longer: accelerate's split_between_processes."""
    per, extra = divmod(len(items), count)
    start = index * per + min(index, extra)
    return items[start : start + per + (1 if index < extra else 0)]


def shard(items: list, world: World, lay: Layout) -> list:
    """This rank's items: every rank of a generation group gets the same ones, every item goes to one group."""
    if lay.dp == 1:
        return list(items)
    if lay.group_size == 1 and world.splitter is not None:
        with world.splitter().split_between_processes(list(items)) as mine:
            return list(mine)
    return split_evenly(list(items), world.rank // lay.group_size, lay.dp)


def run_all(
    runtime: Runtime,
    run: ResolvedRun,
    world: World,
    callback_on_step_end: StepCallback | None = None,
) -> list[RunResult]:
    """`Runtime.run_all` for a launch of `world.size` ranks: each group generates its share of the run's prompts
    x seeds; the first rank of each group writes its videos and sidecars (the others only compute); rank 0 writes
    `index.json` listing every output after all ranks are done. Returns this rank's results.
    """
    from contentv.video import slugify

    cfg = run.config()
    parallel: ParallelConfig = cfg.parallel
    lay = layout(parallel, world.size)
    s = cfg.sampling
    items = work_items(list(run.prompts), list(parallel.seeds or [s.seed]))
    mine = shard(items, world, lay)
    writer = world.is_writer(lay)
    log.info("rank %d: %d of %d generations%s", world.rank, len(mine), len(items), "" if writer else " (no files)")
    results, entries = [], []
    for item in mine:
        name = cfg.output.name
        if len(items) > 1 and name is None:  # ranks write side by side: names unique by item
            name = f"{item.index:04d}_{slugify(item.prompt)}_seed{item.seed}"
        one = run.item(item.prompt, item.seed, name)
        if writer:
            result = runtime.run(one, callback_on_step_end)
            entries.append(
                {
                    "index": item.index,
                    "prompt": item.prompt,
                    "seed": item.seed,
                    "video": result.video.name if result.video else None,
                    "sidecar": result.sidecar.name if result.sidecar else None,
                    "rank": world.rank,
                }
            )
        else:
            result = runtime.generate(one, callback_on_step_end)
        results.append(result)
    gathered = [e for part in world.gather(entries) for e in part]
    if world.rank == 0 and (world.size > 1 or len(items) > 1):
        write_index(sorted(gathered, key=lambda e: e["index"]), runtime.output_dir(cfg), world, lay)
    world.barrier()
    return results


def write_index(entries: list[dict], folder: Path, world: World, lay: Layout) -> Path:
    """`index.json` (or index-N.json if taken) listing every output of the launch."""
    from contentv.video import write_json

    data = {"world_size": world.size, "layout": dict(zip(DIMS, lay.shape, strict=True)), "outputs": entries}
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = folder / ("index.json" if n == 0 else f"index-{n}.json")
        if not path.exists():
            try:
                return write_json(data, path)
            except FileExistsError:
                continue
    raise FileExistsError(f"no free index-N.json name in {folder}")
