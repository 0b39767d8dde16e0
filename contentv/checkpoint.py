"""Checkpoint folders checked before any weights load, and component loads that fail in one line.

`check_folder(path, parts)` reads a local diffusers-layout folder the way the families' loaders will, but only
its small files: every component folder with its config, the tokenizer files, JSON that parses, safetensors
weights only (pickle is refused: unpickling runs code), and each safetensors header. The header says where
every tensor's bytes lie, so a truncated file is caught by comparing the offsets with the file size, and
the tensor names and shapes are compared with the component built on the meta device from its config,
without reading any tensor data. Headers are parsed here (8-byte length + JSON, the safetensors format)
rather than with `safe_open`, so each failure gets its own plain words and no file is mapped.

Each failure is one `CheckpointError` line: "model.path='<path>' is not valid: <component>...".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from contentv import untrusted
from contentv.checkpoint_limits import check_counts, unused
from contentv.errors import ConfigError

T = TypeVar("T")
OPTION = "model.path"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Bytes per element of each safetensors dtype (the format's spec); unknown dtypes skip the size check.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
    "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8,
}  # fmt: skip
# A safetensors header is JSON of a few hundred bytes per tensor; anything far larger is not a header.
MAX_HEADER_BYTES = 100 * 2**20
_CACHE: dict[tuple, bool] = {}  # fingerprints of folders that passed (validation runs several times a run)


@dataclass(frozen=True)
class Part:
    """One subfolder a family's loader reads.

    kind: "model" (config.json + weights, built as `cls` = (module, class)), "tokenizer" (one of `files`:
    alternative sets of files, one of which must be complete) or "scheduler" (scheduler_config.json).
    """

    name: str
    what: str
    kind: str
    cls: tuple[str, str] | None = None
    files: tuple[tuple[str, ...], ...] = ()

    @property
    def weights_stem(self) -> str:
        """transformers saves model.safetensors; diffusers (and our diffusers models) diffusion_pytorch_model."""
        return "model" if self.cls and self.cls[0] == "transformers" else "diffusion_pytorch_model"


# Tokenizer files: a tokenizer.json (what tokenizers' fast classes save) or the slow files it is built from.
CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
T5_TOKENIZER_FILES = (("tokenizer.json",), ("spiece.model",))


def model(name: str, what: str, cls: tuple[str, str]) -> Part:
    return Part(name, what, "model", cls=cls)


def tokenizer(name: str, what: str, files: tuple[tuple[str, ...], ...]) -> Part:
    return Part(name, what, "tokenizer", files=files)


def scheduler(name: str = "scheduler", what: str = "scheduler") -> Part:
    return Part(name, what, "scheduler")


class CheckpointError(ConfigError):
    """A checkpoint folder that can't be loaded as asked: names the path, the component and the problem."""

    def __init__(self, path: str, component: str | None, problem: str, option: str = OPTION):
        self.path, self.component, self.problem = path, component, problem
        super().__init__(option, path, problem)


# A component's files are missing or unreadable: an OSError too, as diffusers' loaders raise it.
class CheckpointFileError(CheckpointError, OSError):
    pass


# ------------------------------------------------------------------------------------------ the check


def check_folder(path: str, parts: Sequence[Part], option: str = OPTION) -> None:
    """Raise CheckpointError unless the local folder `path` holds every part, loadable as described above."""
    folder = Path(path).expanduser()
    key = (str(folder.resolve()), tuple(parts), _fingerprint(folder, parts))
    if key in _CACHE:
        return
    for part in parts:
        try:
            _check_part(path, folder, part, option)
        except OSError as exc:  # a folder or file we may not read: still one line, never a traceback
            where = Path(exc.filename).name if exc.filename else f"{part.name}/"
            raise CheckpointError(
                path, part.name, f"{part.name}: {where} can't be read ({exc.strerror})", option
            ) from exc
    if len(_CACHE) > 32:
        _CACHE.clear()
    _CACHE[key] = True


def _fingerprint(folder: Path, parts: Sequence[Part]) -> tuple:
    """Names, sizes and modification times of the files the check reads (a changed file is checked again)."""
    out = []
    for sub in ("", *(p.name for p in parts)):
        with contextlib.suppress(OSError), os.scandir(folder / sub) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    out.append((sub, entry.name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def _check_part(path: str, folder: Path, part: Part, option: str) -> None:
    def fail(problem: str) -> CheckpointError:
        return CheckpointError(path, part.name, problem, option)

    sub = folder / part.name
    if not sub.is_dir():
        raise fail(f"{part.name}/ is missing (the {part.what})")
    if part.kind == "scheduler":
        read_json(path, part.name, "scheduler_config.json", option, required=True)
        return
    if part.kind == "tokenizer":
        parsed = {name: read_json(path, part.name, name, option) for name in sorted(_json_files(sub))}
        check_file_sizes(path, part, sub, option)
        if not any(all((sub / f).is_file() for f in files) for files in part.files):
            wanted = " or ".join("+".join(files) for files in part.files)
            raise fail(f"{part.name}/ has no vocabulary: the {part.what} needs {wanted}")
        # An empty vocabulary loads without complaint and turns every prompt into <unk>.
        model = (parsed.get("tokenizer.json") or {}).get("model")
        if "tokenizer.json" in parsed and not (isinstance(model, dict) and model.get("vocab")):
            raise fail(f"{part.name}/tokenizer.json has no vocabulary (model.vocab is missing or empty)")
        return
    config = read_json(path, part.name, "config.json", option, required=True)
    tensors = read_weights(path, part, option)
    check_counts(config, tensors, fail, f"{part.name}/config.json")  # before anything is built from it
    if "quantization_config" not in config:  # quantized weights are packed: their shapes are not the config's
        compare_shapes(path, part, config, tensors, option)


def check_file_sizes(path: str, part: Part, sub: Path, option: str = OPTION) -> None:
    """Tokenizer files within untrusted.MAX_JSON_BYTES (the tokenizer libraries read them whole)."""
    for file in sorted(sub.iterdir()):
        with contextlib.suppress(OSError):
            size = file.stat().st_size
            if file.is_file() and size > untrusted.MAX_JSON_BYTES:
                raise CheckpointError(
                    path,
                    part.name,
                    f"{part.name}/{file.name} is too large for a {part.what} file ({untrusted.size_words(size)}, "
                    f"over the {untrusted.size_words(untrusted.MAX_JSON_BYTES)} limit)",
                    option,
                )


def _json_files(sub: Path) -> list[str]:
    return [p.name for p in sub.iterdir() if p.suffix == ".json" and p.is_file()]


def read_json(path: str, component: str, name: str, option: str = OPTION, required: bool = False) -> Any:
    """Parse `<path>/<component>/<name>`; a missing (if required), unreadable or invalid file is one line."""
    file = Path(path).expanduser() / component / name
    rel = f"{component}/{name}" if component else name
    if not file.is_file():
        if required:
            raise CheckpointError(path, component, f"{rel} is missing", option)
        return None
    try:
        data = untrusted.load_file(file)
    except (OSError, ValueError) as exc:  # too large, too deep, not JSON, not UTF-8, unreadable
        raise CheckpointError(path, component, f"{rel} {untrusted.why(exc)}", option) from exc
    if not isinstance(data, dict):  # every JSON file of a checkpoint (configs, vocabularies, indexes) is an object
        raise CheckpointError(path, component, f"{rel} is not a JSON object", option)
    return data


# ------------------------------------------------------------------------------------------ weights


def weight_files(folder: Path, part: Part) -> list[Path]:
    """The safetensors files the loader reads for `part`: the single file or the shards of the index.

    diffusers reads the index first, transformers the single file first; both are checked when both exist.
    Variant files (`*.fp16.safetensors`) are only read when a variant is asked for, which the runtime doesn't.
    """
    sub = folder / part.name
    single = sub / f"{part.weights_stem}.safetensors"
    index = sub / f"{part.weights_stem}.safetensors.index.json"
    return [f for f in (index, single) if f.is_file()]


def read_weights(path: str, part: Part, option: str = OPTION) -> dict[str, dict]:
    """Every tensor the loader would read for `part`: {name: {"dtype", "shape", "data_offsets"}} from headers."""
    folder = Path(path).expanduser()
    sub = folder / part.name

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(path, part.name, problem, option)

    files = weight_files(folder, part)
    if not files:
        names = sorted(p.name for p in sub.iterdir() if p.is_file())
        variants = [n for n in names if n.endswith(".safetensors") or n.endswith(".safetensors.index.json")]
        pickles = pickle_only(sub)
        if pickles:
            raise fail(f"safetensors weights; {pickles}")
        if variants:
            raise fail(
                f"{part.name}/{part.weights_stem}.safetensors (or its .index.json); found only "
                f"{', '.join(variants[:3])}: rename the variant you want to that name"
            )
        raise fail(f"{part.name}/ has no weights ({part.weights_stem}.safetensors is missing)")
    tensors: dict[str, dict] = {}
    for file in files:
        if file.name.endswith(".index.json"):
            index = read_json(path, part.name, file.name, option) or {}
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise fail(f"{part.name}/{file.name} has no weight_map")
            shards: dict[str, dict] = {}
            for shard in sorted(set(weight_map.values())):
                if not (sub / shard).is_file():
                    raise fail(f"{part.name}/{shard} is missing (named in {file.name})")
                shards[shard] = read_header(path, part.name, sub / shard, option)
            for name, shard in weight_map.items():
                if name not in shards[shard]:
                    raise fail(f"{part.name}/{file.name} puts tensor {name!r} in {shard}, which doesn't hold it")
                tensors[name] = shards[shard][name]
        else:
            tensors.update(read_header(path, part.name, file, option))
    return tensors


def pickle_only(sub: Path) -> str | None:
    """If the component folder `sub` has pickle weights and no safetensors: what it has and how to convert them."""
    names = sorted(p.name for p in sub.iterdir() if p.is_file()) if sub.is_dir() else []
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not pickles or any(n.endswith(".safetensors") for n in names):
        return None
    convertible = any(n in ("pytorch_model.bin", "diffusion_pytorch_model.bin") or ".bin.index" in n for n in names)
    how = f"python -m contentv.checkpoint convert {sub}" if convertible else "save_pretrained(safe_serialization=True)"
    return f"{sub.name} has only pickle weights ({', '.join(pickles[:3])}; unsafe to load: unpickling runs code): " + (
        f"convert them with: {how}"
    )


def read_header(path: str, component: str, file: Path, option: str = OPTION) -> dict[str, dict]:
    """The tensors a safetensors file describes, after checking the header against the file's size."""
    rel = f"{component}/{file.name}"

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(path, component, f"{rel} {problem}", option)

    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise fail(f"is not a safetensors file ({size} bytes: truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise fail(f"is not a safetensors file or is truncated (header of {n} bytes, file of {size})")
            raw = fh.read(n)
    except OSError as exc:
        raise fail(f"can't be read ({exc.strerror})") from exc
    try:
        header = untrusted.loads(raw)
    except untrusted.TooDeep as exc:
        raise fail(f"has a damaged header ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail("has a damaged header (not valid JSON)") from exc
    if not isinstance(header, dict):
        raise fail("has a damaged header")
    header.pop("__metadata__", None)
    end = _data_end(header, fail)
    data = size - 8 - n
    if end > data:
        raise fail(f"is truncated: its header needs {end + 8 + n} bytes, the file has {size}")
    if end < data:
        raise fail(f"has {data - end} bytes after its last tensor (damaged or not a safetensors file)")
    return header


def _data_end(header: dict, fail: Callable[[str], CheckpointError]) -> int:
    """Where the last tensor's data ends (bytes after the header), each tensor's entry checked against its shape."""
    end = 0
    for name, info in header.items():
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise fail(f"has a damaged header (tensor {name!r})") from exc
        count = 1
        for d in shape:
            count *= d
        width = DTYPE_BYTES.get(info.get("dtype"))
        if stop < begin or (width is not None and stop - begin != count * width):
            raise fail(f"has a damaged header (tensor {name!r}: {stop - begin} bytes for shape {shape})")
        end = max(end, stop)
    return end


def compare_shapes(path: str, part: Part, config: dict, tensors: dict[str, dict], option: str = OPTION) -> None:
    """The weights hold every tensor of `part` built from `config` on the meta device, in the same shape."""
    import torch

    from contentv.errors import first_line
    from contentv.models.common import build_on_meta

    assert part.cls is not None
    try:
        module = build_on_meta(*part.cls, config, torch.float32)
    except Exception as exc:  # noqa: BLE001 - any constructor error means the config doesn't describe the class
        raise CheckpointError(
            path, part.name, f"{part.name}/config.json does not describe a {part.cls[1]} ({first_line(exc)})", option
        ) from exc
    expected = {k: list(v.shape) for k, v in module.state_dict().items()}
    # transformers ties some weights (T5's encoder.embed_tokens = shared): a checkpoint holds either name.
    tied = getattr(module, "all_tied_weights_keys", None) or {}
    tied = tied if isinstance(tied, dict) else {}
    prefix = getattr(module, "base_model_prefix", "") or ""

    def found(name: str) -> dict | None:
        for alias in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if alias in tensors:
                return tensors[alias]
        return None

    missing, used = [], set()
    for name, shape in expected.items():
        info = found(name)
        if info is None:
            other = tied.get(name) or next((t for t, s in tied.items() if s == name), None)
            if other is None or found(other) is None:
                missing.append((name, shape))
            else:
                used.update(_aliases(other, prefix))
            continue
        used.update(_aliases(name, prefix))
        if list(info["shape"]) != shape:
            raise CheckpointError(
                path,
                part.name,
                f"{part.name}: weights don't match {part.name}/config.json: tensor {name!r} has shape "
                f"{list(info['shape'])} in the weights, {shape} from the config",
                option,
            )
    if missing:
        name, shape = missing[0]
        raise CheckpointError(
            path,
            part.name,
            f"{part.name}: weights don't match {part.name}/config.json: tensor {name!r} (shape {shape}) is missing "
            f"from the weights ({len(missing)} of {len(expected)} tensors missing)",
            option,
        )
    check_unused(path, part, module, tensors, used, option)


def _aliases(name: str, prefix: str) -> tuple[str, ...]:
    return (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if prefix else (name,)


def check_unused(path: str, part: Part, module: Any, tensors: dict, used: set[str], option: str = OPTION) -> None:
    """Every tensor in the weights is one the model built from config.json reads (else the config describes a
    smaller model, e.g. fewer layers, and the rest of the weights would be silently dropped)."""
    ignore = getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ()
    extra = unused(tensors, used, ignore)
    if extra:
        raise CheckpointError(
            path,
            part.name,
            f"{part.name}: weights don't match {part.name}/config.json: {len(extra)} of {len(tensors)} tensors in the "
            f"weights are not used by the model it describes (e.g. {extra[0]!r})",
            option,
        )


# ------------------------------------------------------------------------------------------ loading


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _summary(exc: BaseException, limit: int = 300) -> str:
    """A library's message in one line: its first line, plus the next if the first only introduces it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    text = lines[0] + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def component_errors(path: str, component: str, option: str = OPTION) -> Iterator[None]:
    """Turn a library's error while loading `component` of the local folder `path` into one CheckpointError
    line. Out-of-memory errors, interrupts and our own ConfigErrors pass unchanged; so does everything for hub
    ids (the runtime explains download failures itself)."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        if _is_out_of_memory(exc) or not Path(path).expanduser().is_dir():
            raise
        # KeyError('added_tokens') prints as 'added_tokens': name the type where the message alone is cryptic.
        kind = "" if isinstance(exc, (OSError, ValueError, RuntimeError)) else f"{type(exc).__name__}: "
        problem = pickle_only(Path(path).expanduser() / component) or f"{kind}{_summary(exc)}"
        # A missing or unreadable file stays an OSError, as diffusers raises it (and a ValueError, as ours are).
        error = CheckpointFileError if isinstance(exc, OSError) else CheckpointError
        raise error(path, component, f"{component}: {problem}", option) from exc


def load_component(path: str, component: str, load: Callable[[], T]) -> T:
    """`load()`, with its failures reported as one line naming `path` and `component` (component_errors); the
    loading stage's progress bar advances by one component."""
    from contentv import progress

    with component_errors(str(path), component):
        loaded = load()
    progress.tick()
    return loaded


# ------------------------------------------------------------------------------------------ conversion


def convert_to_safetensors(component: str | os.PathLike) -> list[Path]:
    """Write safetensors copies of a component folder's pickle weights (pytorch_model.bin, shards and index;
    diffusion_pytorch_model.bin). Unpickled with `weights_only=True` (tensors only, no code). Returns the
    files written; the pickle files are left for you to delete."""
    import torch
    from safetensors.torch import save_file

    sub = Path(component)
    written = []
    renames = {"pytorch_model": "model", "diffusion_pytorch_model": "diffusion_pytorch_model"}
    for old, new in renames.items():
        index = sub / f"{old}.bin.index.json"
        shards = {}
        if index.is_file():
            data = json.loads(index.read_text())
            shards = {
                s: re.sub(r"\.bin$", ".safetensors", s.replace(old, new, 1)) for s in set(data["weight_map"].values())
            }
            data["weight_map"] = {k: shards[v] for k, v in data["weight_map"].items()}
        elif (sub / f"{old}.bin").is_file():
            shards = {f"{old}.bin": f"{new}.safetensors"}
        for src, dst in sorted(shards.items()):
            state = torch.load(sub / src, map_location="cpu", weights_only=True)
            # safetensors refuses tensors that share memory (tied weights): store each as its own copy.
            save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(sub / dst))
            written.append(sub / dst)
        if index.is_file():
            out = sub / f"{new}.safetensors.index.json"
            out.write_text(json.dumps(data, indent=2))
            written.append(out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """python -m contentv.checkpoint convert <folder>...: safetensors copies of each component's pickle weights."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "convert":
        print("usage: python -m contentv.checkpoint convert <checkpoint or component folder>...", file=sys.stderr)
        print("       python -m contentv.checkpoint convert <PaddleNLP-layout folder> [<new folder>]", file=sys.stderr)
        return 2
    # --- PaddleNLP/ppdiffusers folders: a diffusers-layout copy (contentv.paddle_format) ---
    from contentv import paddle_convert, paddle_format

    if paddle_format.detect_layout(args[1]) == paddle_format.LAYOUT_PADDLE:
        return paddle_convert.convert_main(args[1:])
    # --- end PaddleNLP ---
    for arg in args[1:]:
        root = Path(arg)
        for sub in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
            for file in convert_to_safetensors(sub):
                print(f"wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
