"""`python -m contentv.checkpoint convert <PaddleNLP folder> [<new folder>]`: the diffusers-layout copy of a
PaddleNLP/ppdiffusers checkpoint (contentv.paddle_format's rules), so later loads are zero-copy safetensors reads.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contentv import checkpoint
from contentv.checkpoint import OPTION, CheckpointError, Part
from contentv.paddle_format import (
    check_part,
    library_of,
    meta_module,
    part_source,
    read_config,
    torch_tensors,
    weight_files,
)


def _check_present(path: str, part: Part, module: Any, shapes: dict[str, dict]) -> None:
    """The tensors read so far have the config's shapes (the same line as checkpoint.compare_shapes)."""
    expected = module.state_dict()
    for name, info in shapes.items():
        if name in expected and list(info["shape"]) != list(expected[name].shape):
            raise CheckpointError(
                path, part.name, f"{part.name}: weights don't match {part.name}/config.json: tensor {name!r} has "
                f"shape {info['shape']} in the weights, {list(expected[name].shape)} from the config",
            )  # fmt: skip


def _part_of(sub: Path) -> Part | None:
    """A model part from a subfolder's own config: ppdiffusers' _class_name, else PaddleNLP's architectures."""
    try:
        config = json.loads((sub / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("_class_name"):
        return checkpoint.model(sub.name, sub.name, ("diffusers", str(config["_class_name"])))
    archs = config.get("architectures") or []
    return checkpoint.model(sub.name, sub.name, ("transformers", str(archs[0]))) if archs else None


LIBRARIES = {"ppdiffusers": "diffusers", "paddlenlp.transformers": "transformers", "paddlenlp": "transformers"}


def _rewrite_json(src: Path, dst: Path) -> None:
    """Copy a JSON file with Paddle's library names and version keys replaced by diffusers'/transformers'."""
    data = json.loads(src.read_text())
    if isinstance(data, dict):
        if "_ppdiffusers_version" in data:
            data["_diffusers_version"] = data.pop("_ppdiffusers_version")
        data.pop("paddlenlp_version", None)
        for key, value in data.items():
            if isinstance(value, list) and len(value) == 2 and value[0] in LIBRARIES:
                data[key] = [LIBRARIES[value[0]], value[1]]
    dst.write_text(json.dumps(data, indent=2) + "\n")


def convert(src: str | Path, dst: str | Path) -> list[Path]:
    """Write the diffusers-layout copy of the PaddleNLP-layout folder `src` to `dst` (new or empty): safetensors in
    torch's names and conventions, configs with diffusers' keys, other files copied. Checks the Paddle folder first
    (CheckpointError on damage). Returns the weight files written."""
    import shutil

    from safetensors.torch import save_file

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(str(dst), None, f"{dst} is not empty (the converted copy needs a new folder)", "convert")
    subs = sorted(p for p in src.iterdir() if p.is_dir())
    parts = {s.name: _part_of(s) for s in subs}
    paddle = {n: p for n, p in parts.items() if p is not None and part_source(src, p)}
    for part in paddle.values():
        check_part(str(src), part)
    dst.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for file in src.iterdir():
        if file.is_file():
            (_rewrite_json if file.suffix == ".json" else shutil.copy2)(file, dst / file.name)
    for sub in subs:
        (dst / sub.name).mkdir()
        part = paddle.get(sub.name)
        weights = set(weight_files(str(src), part, part_source(src, part) or "", OPTION)) if part else set()
        for file in sub.iterdir():
            if not file.is_file() or file in weights or (part and file.name.endswith(".index.json")):
                continue
            (_rewrite_json if file.suffix == ".json" else shutil.copy2)(file, dst / sub.name / file.name)
        if part is None:
            continue
        module = meta_module(str(src), part, read_config(str(src), part, OPTION), OPTION)
        stem = "model" if library_of(part) == "transformers" else "diffusion_pytorch_model"
        files = sorted(weights)
        weight_map: dict[str, str] = {}
        shapes: dict[str, dict] = {}
        for i, file in enumerate(files):
            name = f"{stem}.safetensors" if len(files) == 1 else f"{stem}-{i + 1:05d}-of-{len(files):05d}.safetensors"
            state = torch_tensors(str(src), part, module, files=[file])
            shapes.update({k: {"shape": list(v.shape)} for k, v in state.items()})
            _check_present(str(src), part, module, shapes)
            save_file({k: v.contiguous() for k, v in state.items()}, str(dst / sub.name / name), {"format": "pt"})
            weight_map.update(dict.fromkeys(state, name))
            written.append(dst / sub.name / name)
        if len(files) > 1:
            total = sum(f.stat().st_size for f in written[-len(files) :])
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (dst / sub.name / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        checkpoint.compare_shapes(str(src), part, read_config(str(src), part, OPTION), shapes)  # none missing
    return written


def convert_main(args: Sequence[str]) -> int:
    """`python -m contentv.checkpoint convert <PaddleNLP folder> [<new folder>]` (default: <folder>-diffusers)."""
    if len(args) > 2:
        print("usage: python -m contentv.checkpoint convert <PaddleNLP-layout folder> [<new folder>]", file=sys.stderr)
        return 2
    src = Path(args[0])
    dst = Path(args[1]) if len(args) > 1 else src.with_name(f"{src.name}-diffusers")
    existed = dst.exists()
    try:
        written = convert(src, dst)
    except CheckpointError as exc:
        if not existed:  # a pickle found damaged halfway: no half-written copy left behind
            import shutil

            shutil.rmtree(dst, ignore_errors=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for file in written:
        print(f"wrote {file}")
    print(f"converted {src} (PaddleNLP layout) -> {dst} (diffusers layout): model.path={dst}")
    return 0
