"""Checkpoints in the PaddleNLP / ppdiffusers layout, read as ordinary torch modules.

PaddleNLP's mirrors (e.g. its copy of THUDM/CogVideoX-2b) keep the diffusers folder layout and configs but save
weights the Paddle way:

- ppdiffusers models (transformer, VAE) as `diffusion_paddle_model.safetensors` (+ `.index.json` and shards;
  safetensors metadata format "pd") or `model_state.pdparams` (ppdiffusers utils/constants.py);
- PaddleNLP models (the T5 encoder) as `model_state.pdparams` (+ index and shards, paddle.save pickles) or
  `model.safetensors` with metadata format "np" (paddlenlp/transformers/model_utils.py save_pretrained).

The rules, from the sources: parameter names are diffusers'/transformers' (ppdiffusers' CogVideoX modules mirror
diffusers' tree; PaddleNLP T5PretrainedModel._get_name_mappings maps every T5 name to itself, with a "t5." prefix its
loader also accepts); `paddle.nn.Linear` stores its weight [in, out], torch [out, in], so every weight owned by an
nn.Linear is transposed (ppdiffusers models/modeling_pytorch_paddle_utils.py convert_paddle_state_dict_to_pytorch:
"transpose linear"; a safetensors file whose metadata says "pt", or has none, is already torch's and is not
transposed, as ppdiffusers' load_state_dict decides); bfloat16 arrays are stored as uint16 (numpy has no bfloat16)
and are reinterpreted. Which modules are nn.Linear is read from the torch module built from the config.

Every tensor's shape is compared with the module built from the config (checkpoint.compare_shapes) before anything
is assigned: from safetensors headers when the folder is checked, from the arrays for pickles when they load (a
pickle has no header; reading a 9 GB one only to check it would double the load).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contentv import checkpoint
from contentv.checkpoint import OPTION, CheckpointError, Part

PICKLE = "model_state.pdparams"
PADDLE_FORMATS = ("pd", "np")  # safetensors metadata "format" of Paddle-convention files; "pt" is torch's
LAYOUT_DIFFUSERS, LAYOUT_PADDLE = "diffusers", "paddle"


@dataclasses.dataclass(frozen=True)
class PaddlePart(Part):
    """A model part whose safetensors weights have Paddle's file stem (read by checkpoint.read_weights)."""

    stem: str = "diffusion_paddle_model"

    @property
    def weights_stem(self) -> str:  # type: ignore[override]
        return self.stem


def library_of(part: Part) -> str:
    """The part's library: "transformers" (PaddleNLP's models) or "diffusers" (ppdiffusers')."""
    return part.cls[0] if part.cls else ""


def _safetensors_format(file: Path) -> str:
    """The "format" in a safetensors file's metadata ("pt" when absent, as ppdiffusers reads it)."""
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            meta = json.loads(fh.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return "pt"
    return str(meta.get("format", "pt"))


def _first_file(sub: Path, stem: str) -> Path | None:
    """The single file `<stem>.safetensors`, else the first shard its index names."""
    if (sub / f"{stem}.safetensors").is_file():
        return sub / f"{stem}.safetensors"
    index = sub / f"{stem}.safetensors.index.json"
    try:
        shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return sub / shard


def part_source(folder: Path, part: Part) -> str | None:
    """How a model part's weights are stored: "paddle-safetensors", "pdparams", or None (diffusers/transformers
    files, or nothing at all). The library's own safetensors win when both kinds are present."""
    sub = folder / part.name
    if library_of(part) == "transformers":
        first = _first_file(sub, "model")
        if first is not None and first.is_file():
            return "paddle-safetensors" if _safetensors_format(first) in PADDLE_FORMATS else None
    else:
        if any((sub / f"diffusion_pytorch_model.safetensors{x}").is_file() for x in ("", ".index.json")):
            return None
        if any((sub / f"diffusion_paddle_model.safetensors{x}").is_file() for x in ("", ".index.json")):
            return "paddle-safetensors"
    if any((sub / f"{PICKLE}{x}").is_file() for x in ("", ".index.json")):
        return "pdparams"
    return None


def detect_layout(path: str | Path | None, parts: Sequence[Part] | None = None) -> str | None:
    """ "paddle" if any model subfolder holds Paddle weights (PaddleNLP/ppdiffusers), else "diffusers"; None when
    `path` is not a local folder. Without `parts`, every subfolder with a config.json is looked at."""
    folder = Path(path).expanduser() if path else None
    if folder is None or not folder.is_dir():
        return None
    if parts is None:
        parts = []
        for sub in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
            try:  # ppdiffusers' (and diffusers') configs name their class; PaddleNLP's (transformers') don't
                library = (
                    "diffusers" if "_class_name" in json.loads((sub / "config.json").read_text()) else "transformers"
                )
            except (OSError, ValueError, TypeError):
                continue
            parts.append(checkpoint.model(sub.name, sub.name, (library, "")))
    found = any(part.kind == "model" and part_source(folder, part) for part in parts)
    return LAYOUT_PADDLE if found else LAYOUT_DIFFUSERS


# ------------------------------------------------------------------------------------------ reading


def _pickle_files(path: str, part: Part, option: str) -> list[Path]:
    """The .pdparams files of a part: the single file, or every shard its index names (each must exist)."""
    sub = Path(path).expanduser() / part.name
    index = sub / f"{PICKLE}.index.json"
    if index.is_file():
        data = checkpoint.read_json(path, part.name, index.name, option) or {}
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(path, part.name, f"{part.name}/{index.name} has no weight_map", option)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (sub / shard).is_file():
                raise CheckpointError(
                    path, part.name, f"{part.name}/{shard} is missing (named in {index.name})", option
                )
        return [sub / s for s in shards]
    return [sub / PICKLE]


def read_pdparams(path: str, part: Part, file: Path, option: str = OPTION) -> dict:
    """A .pdparams file's arrays through the restricted unpickler; anything else is one line naming the file."""
    import pickle

    from contentv.paddle_pickle import UnsafePickle, load_pdparams

    rel = f"{part.name}/{file.name}"
    try:
        return load_pdparams(file)
    except UnsafePickle as exc:
        raise CheckpointError(
            path, part.name, f"{rel} is refused: its pickle asks for {exc} (only arrays are read; unpickling "
            "anything else could run code)", option,
        ) from exc  # fmt: skip
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CheckpointError(
            path, part.name, f"{rel} is truncated or not a Paddle state dict ({exc})", option
        ) from exc
    except OSError as exc:
        raise CheckpointError(path, part.name, f"{rel} can't be read ({exc.strerror})", option) from exc


def linear_weights(module: Any) -> set[str]:
    """Names of the weights owned by torch nn.Linear modules (stored transposed by Paddle)."""
    import torch

    return {f"{n}.weight" if n else "weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def torch_name(name: str, expected: Any) -> str:
    """The torch state-dict name of a Paddle tensor: the same, less PaddleNLP's "t5." base-model prefix."""
    if name not in expected and name.startswith("t5.") and name[3:] in expected:
        return name[3:]
    return name


def mapped_infos(tensors: dict[str, dict], module: Any, paddle_convention: bool) -> dict[str, dict]:
    """Safetensors header entries renamed to torch names, Linear weights' shapes in torch's [out, in] order."""
    expected = module.state_dict()
    linear = linear_weights(module) if paddle_convention else set()
    out = {}
    for name, info in tensors.items():
        tname = torch_name(name, expected)
        shape = list(info["shape"])
        out[tname] = {**info, "shape": shape[::-1] if tname in linear and len(shape) == 2 else shape}
    return out


def read_config(path: str, part: Part, option: str) -> dict:
    """The part's config.json without PaddleNLP's/ppdiffusers' version keys."""
    config = checkpoint.read_json(path, part.name, "config.json", option, required=True)
    # PaddleNLP's own keys; transformers' T5Config takes the same names for the rest (and the same aliases).
    return {k: v for k, v in config.items() if k not in ("paddlenlp_version", "_ppdiffusers_version")}


def meta_module(path: str, part: Part, config: dict, option: str) -> Any:
    """The part's torch class built from `config` on the meta device (a bad config is one line)."""
    import torch

    from contentv.errors import first_line
    from contentv.models.common import build_on_meta

    assert part.cls is not None
    try:
        return build_on_meta(*part.cls, config, torch.float32)
    except Exception as exc:  # noqa: BLE001 - any constructor error means the config doesn't describe the class
        raise CheckpointError(
            path, part.name, f"{part.name}/config.json does not describe a {part.cls[1]} ({first_line(exc)})", option
        ) from exc


def check_part(path: str, part: Part, option: str = OPTION) -> None:
    """A Paddle model part: config, every weight file the index names, safetensors headers (truncation) and their
    shapes against the config, as checkpoint.check_folder does for diffusers folders. Pickles are read at load."""
    folder = Path(path).expanduser()
    source = part_source(folder, part)
    config = read_config(path, part, option)
    if source == "pdparams":
        for file in _pickle_files(path, part, option):
            if not file.is_file():
                raise CheckpointError(path, part.name, f"{part.name}/ has no weights ({file.name} is missing)", option)
        meta_module(path, part, config, option)
        return
    stem = "model" if library_of(part) == "transformers" else "diffusion_paddle_model"
    tensors = checkpoint.read_weights(path, PaddlePart(**_fields(part), stem=stem), option)
    if "quantization_config" in config:
        return
    module = meta_module(path, part, config, option)
    first = _first_file(folder / part.name, stem)
    paddle_convention = first is not None and _safetensors_format(first) in PADDLE_FORMATS
    checkpoint.compare_shapes(path, part, config, mapped_infos(tensors, module, paddle_convention), option)


def _fields(part: Part) -> dict:
    return {f.name: getattr(part, f.name) for f in dataclasses.fields(Part)}


_PASSED: set[tuple] = set()  # folders that passed, with their files' sizes and times (validation runs several times)


def check_folder(path: str, parts: Sequence[Part], option: str = OPTION) -> None:
    """checkpoint.check_folder for a folder where some model parts hold Paddle weights."""
    folder = Path(path).expanduser()
    paddle = [p for p in parts if p.kind == "model" and part_source(folder, p)]
    checkpoint.check_folder(path, [p for p in parts if p not in paddle], option)
    stamp = [(str(folder.resolve()), option)]
    for part in paddle:
        stamp += sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in (folder / part.name).iterdir())
    if tuple(stamp) in _PASSED:
        return
    for part in paddle:
        check_part(path, part, option)
    if len(_PASSED) > 32:
        _PASSED.clear()
    _PASSED.add(tuple(stamp))


# ------------------------------------------------------------------------------------------ loading


def weight_files(path: str, part: Part, source: str, option: str) -> list[Path]:
    """Every weight file of a Paddle part: the pickle or safetensors file, or the shards its index names."""
    if source == "pdparams":
        return _pickle_files(path, part, option)
    stem = "model" if library_of(part) == "transformers" else "diffusion_paddle_model"
    sub = Path(path).expanduser() / part.name
    single, index = sub / f"{stem}.safetensors", sub / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = (checkpoint.read_json(path, part.name, index.name, option) or {}).get("weight_map") or {}
        return [sub / s for s in sorted(set(weight_map.values()))]
    return [single]


def _read_file(path: str, part: Part, file: Path, option: str) -> tuple[dict, bool]:
    """(name -> torch tensor as stored, whether the file is in Paddle's convention)."""
    import torch

    if file.suffix == ".pdparams":
        return {k: torch.from_numpy(v) for k, v in read_pdparams(path, part, file, option).items()}, True
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, _safetensors_format(file) in PADDLE_FORMATS


def torch_tensors(
    path: str, part: Part, module: Any, files: Sequence[Path] | None = None, option: str = OPTION
) -> dict[str, Any]:
    """The part's tensors (or those of `files`) under torch names, Linear weights transposed to [out, in],
    bfloat16 stored as uint16 reinterpreted. Shapes are not checked here (see load_model)."""
    import torch

    if files is None:
        files = weight_files(path, part, part_source(Path(path).expanduser(), part) or "", option)
    expected = module.state_dict()
    linear = linear_weights(module)
    out = {}
    for file in files:
        tensors, paddle_convention = _read_file(path, part, file, option)
        for name, t in tensors.items():
            tname = torch_name(name, expected)
            ref = expected.get(tname)
            if t.dtype == torch.uint16 and ref is not None and ref.is_floating_point():
                t = t.view(torch.bfloat16)  # Paddle hands bfloat16 to numpy as uint16 bits
            if paddle_convention and tname in linear and t.ndim == 2:
                t = t.t().contiguous()
            out[tname] = t
    return out


_DTYPE_KEYS = ("dtype", "torch_dtype")


def _kept_in_fp32(model: Any, is_transformers: bool, dtype: Any) -> set[str]:
    """Module names the class's own loader keeps in float32 at this dtype: transformers' _keep_in_fp32_modules
    only for float16 (T5's "wo"), its _strict list and diffusers' list for any lower precision."""
    import torch

    if dtype == torch.float32:
        return set()
    strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    loose = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return strict | loose if not is_transformers or dtype == torch.float16 else strict


def load_model(path: str, part: Part, dtype: Any, option: str = OPTION) -> Any:
    """The torch module of a Paddle model part, in `dtype` (modules the class keeps in float32 stay so, as in its
    from_pretrained), every tensor's shape checked against the config before it is assigned."""
    import importlib

    import torch
    from accelerate import init_empty_weights

    assert part.cls is not None
    config = read_config(path, part, option)
    module = meta_module(path, part, config, option)  # names, Linear modules and shapes from the config
    state = torch_tensors(path, part, module, option=option)
    checkpoint.compare_shapes(path, part, config, {k: {"shape": list(v.shape)} for k, v in state.items()}, option)
    cls = getattr(importlib.import_module(part.cls[0]), part.cls[1])
    is_transformers = part.cls[0] == "transformers"
    old = torch.get_default_dtype()
    try:  # parameters on meta, buffers real: transformers' under the load dtype, diffusers' in float32 (their loaders)
        if is_transformers:
            torch.set_default_dtype(dtype)
        with init_empty_weights(include_buffers=False):
            if is_transformers:
                model = cls(cls.config_class.from_dict({k: v for k, v in config.items() if k not in _DTYPE_KEYS}))
            else:
                model = cls.from_config(config)
    finally:
        torch.set_default_dtype(old)
    keep = _kept_in_fp32(model, is_transformers, dtype)
    own = model.state_dict()
    state = {
        k: v.to(torch.float32 if any(m in k.split(".") for m in keep) else dtype) if v.is_floating_point() else v
        for k, v in state.items()
        if k in own
    }
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # T5: encoder.embed_tokens is shared
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(path, part.name, f"{part.name}: tensor {left[0]!r} is missing from the weights", option)
    return model.eval()


def load_paddle_parts(path: str, parts: Sequence[Part], load_kwargs: dict) -> dict[str, Any]:
    """{part name: torch module} for the Paddle model parts of a local folder ({} for a diffusers folder or a hub
    id), in the dtypes of `load_kwargs` (torch_dtype; vae_dtype / text_encoder_dtype where given), each failure one
    line naming the component (checkpoint.load_component)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return {}
    import torch

    dtype = load_kwargs.get("torch_dtype") or torch.float32
    out = {}
    for part in parts:
        if part.kind == "model" and part_source(folder, part):
            own = load_kwargs.get(f"{part.name}_dtype") or dtype
            out[part.name] = checkpoint.load_component(path, part.name, lambda p=part, d=own: load_model(path, p, d))
    return out
