"""What a video's sidecar records: the config that ran, library versions, the device, what was applied, timings and
peak memory, and where the weights came from."""

from __future__ import annotations

import dataclasses
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contentv.config import ModelConfig, RunConfig
    from contentv.runtime import RunResult


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    this = __name__.split(".")[0]  # this distribution
    for name in (this, "torch", "diffusers", "transformers", "accelerate", "hydra-core", "imageio-ffmpeg"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def process_start() -> float:
    """When this process started running the runtime (epoch seconds): the first `import contentv` (demo.py does it
    before anything heavy). The OS's process start would count a shell's time when the shell exec'd Python."""
    import contentv

    return contentv.IMPORTED_AT


def checkpoint_record(model: ModelConfig, path: str) -> dict:
    """Where the weights came from: the configured path, the local folder it resolved to (a hub id's snapshot in the
    local cache), and for a tiny model its build hash (the folder name's suffix)."""
    from contentv.models.common import local_config_folder
    from contentv.paddle_format import detect_layout

    folder = local_config_folder(path, "model_index.json", model.revision)
    out = {"path": model.path, "folder": str(Path(folder).absolute()) if folder else None}
    out["layout"] = detect_layout(folder)  # "diffusers", or "paddle" for PaddleNLP's copies (None: not local)
    if model.tiny:
        out["tiny_hash"] = Path(path).name.rsplit("-", 1)[-1]
    return out


def project_record() -> dict:
    """This runtime's version and, in a git checkout, its commit (read from .git without running git)."""
    import importlib.metadata as md

    from contentv import DISTRIBUTION

    try:
        version = md.version(DISTRIBUTION)
    except md.PackageNotFoundError:
        version = None
    return {"version": version, "git_commit": git_commit(Path(__file__).resolve().parents[1])}


def git_commit(root: Path) -> str | None:
    """The commit checked out in `root` (a repository's work tree), or None outside one."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        common = Path((git / "commondir").read_text().strip()) if (git / "commondir").is_file() else Path(".")
        for base in (git, git / common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        return None
    return None


def invocation_record(invocation: dict | None) -> dict:
    """How the run was started: the entry point's record (the command line's arguments and Hydra overrides), else
    this process's arguments; with the working folder, absolute."""
    import os
    import sys

    out = dict(invocation or {"argv": list(sys.argv)})
    out.setdefault("cwd", os.getcwd())
    return out


def sidecar_record(cfg: RunConfig, result: RunResult, device: dict) -> dict:
    """The sidecar: what was asked, what ran, how long it took and how much memory it used."""
    s = result.sampling
    resolved = dataclasses.replace(cfg, sampling=s)
    stages = result.stages
    dev = [v["peak_device_bytes"] for v in stages.values() if v.get("peak_device_bytes") is not None]
    rss = [v["peak_host_rss_bytes"] for v in stages.values() if v.get("peak_host_rss_bytes") is not None]
    return {
        "video": result.video.name if result.video else None,
        "prompt": s.prompt,
        "negative_prompt": s.negative_prompt,
        "seed": s.seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(resolved),
        "versions": library_versions(),
        "project": project_record(),
        "invocation": invocation_record(result.run.invocation if result.run is not None else None),
        "device": device,
        "prepared": result.prepared,
        **result.ran,
        # stage times; startup = process start -> this run (imports, checks; first run only), total = wall time
        "timings_s": {
            **({"startup": round(result.wall["startup"], 4)} if "startup" in result.wall else {}),
            **{k: round(v["seconds"], 4) for k, v in stages.items()},
            **({"total": round(result.wall["total"], 4)} if "total" in result.wall else {}),
        },
        "seconds_per_step": round(stages["denoising"]["seconds"] / s.num_inference_steps, 4),
        "peak_memory": {
            "device_bytes": max(dev) if dev else None,
            "host_rss_bytes": max(rss) if rss else None,
        },
        "stages": stages,
    }


def describe_result(record: dict, reused: bool, video: Path | None, sidecar: Path | None) -> str:
    """Markdown for the page: what ran, per-stage time, peak memory, where the files are."""
    cfg = record.get("config", {})
    s, m = cfg.get("sampling", {}), cfg.get("model", {})
    prepared = record.get("prepared", {})
    peak = record.get("peak_memory", {})
    device = record.get("device", {})
    timings = record.get("timings_s", {})
    stages = " · ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in timings.items())
    lines = [
        f"**{m.get('name')}** on **{device.get('backend')}** ({device.get('device')}) · seed **{record.get('seed')}**"
        f" · {s.get('width')}×{s.get('height')}, {s.get('num_frames')} frames at {s.get('fps')} fps"
        f" · {s.get('num_inference_steps')} steps, guidance {s.get('guidance_scale')}",
        f"**time:** {timings.get('total', sum(timings.values())):.2f} s ({stages};"
        f" {record.get('seconds_per_step', 0):.3f} s/step)",
        f"**peak memory:** device {_gib(peak.get('device_bytes'))} · host RSS {_gib(peak.get('host_rss_bytes'))}",
        f"**pipeline:** {'reused (no weights loaded)' if reused else 'loaded'} · memory preset"
        f" {prepared.get('memory_preset')} · placement {prepared.get('placement')} · attention"
        f" {prepared.get('attention_kernel')} · quantization {prepared.get('quantization')}",
    ]
    changes = prepared.get("output_changes") or []
    if changes:
        lines.append("**changes the output:** " + "; ".join(changes))
    if video is not None:
        lines.append(f"**video:** `{video.name}`" + (f" · **sidecar:** `{sidecar.name}`" if sidecar else ""))
    return "\n\n".join(lines)


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"
