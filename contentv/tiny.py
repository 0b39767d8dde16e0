"""Offline building blocks for tiny random-weight checkpoints: tokenizers made in memory, a disk cache.

Tiny checkpoints are written in the real folder layout and loaded back through the same
`from_pretrained` code as the real models, so tests exercise the real loading path without network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from contentv.errors import ConfigError

if TYPE_CHECKING:  # transformers loads when a tiny checkpoint is built
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase, T5EncoderModel, T5TokenizerFast

# A few frequent English words, so tiny tokenizers give realistic (not one-token-per-letter) lengths.
_WORDS = (
    "the a an of in on at and with to is are by for from cat dog man woman young old sits walks runs "
    "room light dark slow fast camera video scene wooden stool guitar acoustic musician cozy low quality "
    "overexposed deformation poor composition bad hands teeth eyes limbs distortion rustic dimly lit "
    "strumming worn sunburst finish red fox snow"
).split()
_PUNCT = string.punctuation
# A build's hidden temporary folder: .<name>-<host>.<pid>.<random> (older versions: .<name>-<random>).
_BUILD = re.compile(r"^\.[a-z0-9_]+-(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?[\w]+$")


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over letters, digits, punctuation and a few whole words."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for ch in string.ascii_lowercase + string.digits + _PUNCT:
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    for word in _WORDS:  # merge each word left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            rule = (parts[0], parts[1])
            if rule not in merges:
                merges.append(rule)
            add(merged)
            parts = [merged] + parts[2:]
    add("<|startoftext|>")
    add("<|endoftext|>")
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok


def tiny_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """A T5-style Unigram (SentencePiece-like) tokenizer: <pad>=0, </s>=1, <unk>=2, no extra ids."""
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    for word in _WORDS:
        pieces.append(("\u2581" + word, -2.0))
        seen.add("\u2581" + word)
    for ch in string.ascii_letters + string.digits + _PUNCT:
        for piece, score in ((ch, -6.0), ("\u2581" + ch, -5.0)):
            if piece not in seen:
                pieces.append((piece, score))
                seen.add(piece)
    pieces.append(("\u2581", -4.0))
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.model_max_length = model_max_length
    return tok


def tiny_t5_encoder(tok: PreTrainedTokenizerBase, **dims: int) -> T5EncoderModel:
    """A random T5 encoder (gated-GELU, like T5-v1.1) whose vocabulary and special ids match `tok`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tok),
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        **dims,
    )
    return T5EncoderModel(config)


def save_seeded(builders: dict[str, Callable[[], object]], out: Path, seed: int) -> None:
    """Build and save each component under out/<name>, each from its own seed (independent inits)."""
    import torch

    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed * 1000 + i)
        build().eval().save_pretrained(Path(out) / name)


def cache_root() -> Path:
    """Where tiny checkpoints are cached: $CONTENTV_CACHE, else $XDG_CACHE_HOME/contentv, else ~/.cache/contentv."""
    if os.environ.get("CONTENTV_CACHE"):
        return Path(os.environ["CONTENTV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / __name__.split(".")[0]  # the package's name


def _cache_error(root: Path, problem: str) -> ConfigError:
    return ConfigError(
        "CONTENTV_CACHE",
        str(root),
        f"a writable folder for the tiny checkpoints ({problem}); point CONTENTV_CACHE at another folder, or fix "
        "this one and run again to rebuild",
    )


def _build_error(exc: BaseException, root: Path, final: Path) -> ConfigError:
    """A failed build in one line: the cause (a full disk, a read-only mount) and the cache."""
    from contentv.video import _cause

    num, words = _cause(getattr(exc, "errno", None), str(exc))
    if words is None:
        return _cache_error(root, f"building {final.name} failed: {type(exc).__name__}: {str(exc)[:200]}")
    return _cache_error(root, f"{words} while building {final.name}")


def _clean_stale_builds(folder: Path, now: float | None = None) -> None:
    """Remove the hidden build folders of builders that are gone (kill -9 skips their cleanup): this host's
    dead processes, or older than a day (other hosts sharing the cache). Errors are ignored."""
    from contentv.video import STALE_AFTER_S, _alive, _host

    now = time.time() if now is None else now
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _BUILD.match(entry.name)
            if m is None or not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if m["host"] == _host() and m["pid"]:
                    stale = not _alive(int(m["pid"]))
                else:
                    stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
                if stale:
                    shutil.rmtree(entry.path, ignore_errors=True)


def missing_parts(folder: Path) -> list[str]:
    """Components a cached tiny checkpoint lacks: what model_index.json names, each a non-empty folder."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return ["model_index.json"]
    if not (folder / "tiny_spec.json").is_file():  # written last: a build that did not finish
        return ["tiny_spec.json"]
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    return [f"{n}/" for n in names if not (folder / n).is_dir() or not any((folder / n).iterdir())]


def cached_build(name: str, spec: dict, build: Callable[[Path], None], root: Path | None = None) -> Path:
    """Build a checkpoint once into `<root>/tiny/<name>-<hash(spec)>` and return its path.

    The build goes to a hidden temporary folder (named after this host and process) that is renamed into
    place, so a crash never leaves a half-written checkpoint under the final name and concurrent builders don't
    collide; the next build removes the temporaries of builders that are gone. A cache that can't be written
    (a file, a read-only mount, a full disk) or a cached checkpoint missing a component is one ConfigError line
    naming CONTENTV_CACHE and how to rebuild.
    """
    from contentv.video import _host

    root = Path(root) if root else cache_root()
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    final = root / "tiny" / f"{name}-{key}"
    if final.exists():
        missing = missing_parts(final)
        if missing:
            raise _cache_error(
                root, f"the cached {final.name} is incomplete ({', '.join(missing)} missing): remove {final} to rebuild"
            )
        return final
    if root.exists() and not root.is_dir():
        raise _cache_error(root, "it is a file")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_builds(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{_host()}.{os.getpid()}.", dir=final.parent))
    except OSError as exc:
        raise _build_error(exc, root, final) from exc
    try:
        from contentv.progress import library_bars_off

        with library_bars_off():  # a build is seconds: no per-shard bars from transformers
            build(tmp)
        (tmp / "tiny_spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; keep theirs
            if not (final / "model_index.json").is_file():
                raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, or a library's wrapper of one (safetensors' full disk)
        raise _build_error(exc, root, final) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_checkpoint(name: str = "tiny_contentv", seed: int = 0) -> str:
    """The folder of a tiny random-weight checkpoint, built on first use and cached; for `from_pretrained`.

    >>> pipe = ContentVPipeline.from_pretrained(tiny_checkpoint("tiny_contentv"))

    `name` is a tiny preset (tiny_contentv, tiny_cogvideox, tiny_cogvideox_5b); `seed` seeds its random weights
    (the CLI's model.tiny_seed). The same folder the command line uses: under $CONTENTV_CACHE, else
    ~/.cache/contentv. Raises ValueError for an unknown name, listing the valid ones.
    """
    from contentv.config import ModelConfig
    from contentv.registry import FAMILIES, get_spec

    specs = [get_spec(family) for family in FAMILIES]
    for spec in specs:
        if name in spec.tiny_names:
            return spec.resolve_path(ModelConfig(name=name, family=spec.family, path=None, tiny=True, tiny_seed=seed))
    valid = [n for spec in specs for n in spec.tiny_names]
    raise ValueError(f"tiny_checkpoint({name!r}): no such tiny model; one of: {', '.join(valid)}")
