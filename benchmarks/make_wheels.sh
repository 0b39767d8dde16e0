#!/usr/bin/env bash
# Download (or build) the wheels a bare GPU machine lacks, for benchmarks/gpu_check.sh to install offline.
#
#   benchmarks/make_wheels.sh [--with-bitsandbytes] [DEST]    # DEST defaults to .whl/ at the repo root (git-ignored)
#
# The GPU image (Python 3.12, torch with CUDA, transformers, accelerate, safetensors, tokenizers,
# sentencepiece, protobuf, numpy, psutil, tqdm, PyYAML, Pillow, requests, huggingface-hub, pytest) lacks
# diffusers, hydra-core, omegaconf, antlr4-python3-runtime and imageio-ffmpeg. Each is pinned to the version
# installed in this environment, except imageio-ffmpeg: 0.8.1's only x86_64 wheel is 68 MB, over the 64 MiB
# that travels to the device machine, so it takes 0.7.0 (29.5 MB, ffmpeg 7.0.2, manylinux2014; the project
# needs >= 0.5). Their other needs are in that image; diffusers' importlib_metadata is only imported on
# Python < 3.8. Pure-Python packages are py3-none-any; antlr4-python3-runtime 4.9.3 exists only as a source
# archive, so its pure-Python wheel is built here.
#
# --with-bitsandbytes: bitsandbytes (43 MB; its CUDA 13 library included) instead of imageio-ffmpeg, for the
# `cuda` tests of bnb_int8/bnb_nf4/int8, which gpu_check.sh deselects where bitsandbytes is missing. Both don't fit
# in the 64 MiB that travels; the GPU check writes no video, so it never imports imageio-ffmpeg.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACKAGES=(diffusers hydra-core omegaconf antlr4-python3-runtime imageio-ffmpeg)
if [[ ${1:-} == --with-bitsandbytes ]]; then
    PACKAGES=(diffusers hydra-core omegaconf antlr4-python3-runtime bitsandbytes)
    shift
fi
DEST=${1:-.whl}
# Versions that differ from this environment's, with the reason above.
declare -A OVERRIDE=([imageio-ffmpeg]=0.7.0)
# What travels to the device machine (the working tree and the carried wheels) must stay under 64 MiB.
MAX_BYTES=$((64 * 1024 * 1024))
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)

log() { printf '[make_wheels] %s\n' "$*"; }

# Keep the folder out of git (the device tool carries it only when named in `carry`).
if [[ $DEST == .whl ]] && git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q "$DEST/x.whl"; then
    echo "/$DEST/" >>"$(git rev-parse --git-path info/exclude)"
    log "added /$DEST/ to $(git rev-parse --git-path info/exclude)"
fi

rm -rf "$DEST"
mkdir -p "$DEST"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

for name in "${PACKAGES[@]}"; do
    version=${OVERRIDE[$name]:-}
    if [[ -z $version ]]; then
        version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name") || {
            log "error: $name is not installed here: install the project first (pip install -e '.[test]')"
            exit 1
        }
    fi
    log "$name==$version"
    if ! out=$("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" -d "$DEST" "$name==$version" 2>&1); then
        log "no wheel for $name==$version on the index: building it from source here"
        "$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$DEST" "$name==$version" || {
            printf '%s\n' "$out"
            exit 1
        }
    fi
done

# Every wheel must install on CPython 3.12 / x86_64 Linux: pure Python or manylinux x86_64, nothing else.
bad=0
for f in "$DEST"/*.whl; do
    tags=$(basename "$f" .whl | awk -F- '{print $(NF-2)"-"$(NF-1)"-"$NF}')
    case $tags in
        py3-none-any | py2.py3-none-any | py3-none-manylinux*x86_64*) ;;
        *) log "error: $(basename "$f") is not for any Python 3 on x86_64 Linux ($tags)"; bad=1 ;;
    esac
done
((bad == 0)) || exit 1
count=$(find "$DEST" -type f -name '*.whl' | wc -l)
if ((count != ${#PACKAGES[@]})); then
    log "error: expected ${#PACKAGES[@]} wheels in $DEST, found $count"
    exit 1
fi
ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
log "total: $total bytes ($((total / 1024 / 1024)) MiB) in $DEST"
# The working tree that travels: tracked and untracked files git doesn't ignore.
tree=$(git ls-files -coz --exclude-standard 2>/dev/null | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {n += $1} END {print n + 0}')
log "with the working tree ($tree bytes): $(((total + tree) / 1024 / 1024)) MiB of the 64 MiB that travels"
if ((total + tree > MAX_BYTES)); then
    log "error: over 64 MiB: the device tool would refuse the call"
    exit 1
fi
