#!/usr/bin/env bash
# The GPU check, in one go and within 8 minutes: install the carried wheels, run the
# `cuda`-marked tests, then benchmark full-size random-weight ContentV-8B (432x768x125) under none,
# low_vram_24g, low_vram_16g, low_vram_8g and model_offload, and CogVideoX-5B (720x480x49) under none and
# low_vram_24g, each preset in its own time-boxed process. Every result is written the moment it is measured.
#
#   benchmarks/make_wheels.sh          # once, on a machine with PyPI: the wheels a bare GPU image lacks, in .whl/
#   benchmarks/gpu_check.sh            # on the GPU machine (the device tool: carry .whl, timeout_s 540)
#   benchmarks/gpu_check.sh --smoke    # the same steps on the CPU with the tiny models, 1 step, tiny size
#
# Steps: wheels, a ~10 s pre-flight that imports everything the check needs (the check stops there if anything is
# missing: no device time spent on runs that can't start), env, the planner, the cuda tests (bitsandbytes' ones
# deselected unless it is installed or carried), then the benchmark runs, each skipped rather than started when
# less than its realistic minimum is left (ContentV-8B: ~60 s per preset, its load included).
#
# Writes under $OUT (default ./gpu_check_out; at most 8 files, as the device tool brings back):
#   gpu_check.log  everything printed          steps.jsonl      each step: ok | failed | timeout | skipped | out_of_time
#   env.txt        nvidia-smi, versions        cuda_tests.xml   the cuda tests (junit)
#   predictions.json  the memory planner's     gpu_<device>.jsonl  one row per model and preset (gpu_presets.py)
#   summary.md     steps, tests, results table and targets (gpu_tables.py)
# and, on a GPU, appends the rows to benchmarks/results/gpu_<device>.jsonl too.
#
# Exit status: 0 when every step ran and passed; 1 when a step failed, timed out or ran out of time (the
# summary says which); 2 for a bad command line.
#
# Settings (environment, all optional):
#   GPU_CHECK_BUDGET_S  the whole run's budget in seconds (480; --smoke 600): later steps are cut to fit
#   GPU_CHECK_WHEELS    wheels to install first (.whl; --smoke: none); GPU_CHECK_SITE where (/tmp/site)
#   GPU_CHECK_TESTS_S   time box of the cuda tests (90; 0 skips them, e.g. to rerun one preset)
#   GPU_CHECK_RUNS      benchmark runs, ';'-separated "MODELS PRESETS BOX_S DECODE", one process each (MODELS and
#                       PRESETS comma-separated; DECODE: decode | from:PRESET)
#   GPU_CHECK_STEPS / GPU_CHECK_WARMUP   timed / warm-up denoising steps per preset (2 / 1; --smoke 1 / 0)
#   GPU_CHECK_SIZE      HxWxF for every model (the models' own; --smoke 32x48x9)
#   GPU_CHECK_RECORD    1: also append rows to benchmarks/results/ (1; --smoke 0)
#   PYTHON              the interpreter (python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SMOKE=0
case ${1:-} in
    "") ;;
    --smoke) SMOKE=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac

OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
START=$SECONDS
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
if ((SMOKE)); then
    BACKEND=cpu
    BUDGET_S=${GPU_CHECK_BUDGET_S:-600}
    WHEELS=${GPU_CHECK_WHEELS:-}
    STEPS=${GPU_CHECK_STEPS:-1}
    WARMUP=${GPU_CHECK_WARMUP:-0}
    SIZE=${GPU_CHECK_SIZE:-32x48x9}
    RECORD=${GPU_CHECK_RECORD:-0}
    # One process for both tiny models (imports cost more than the runs here).
    RUNS=${GPU_CHECK_RUNS:-"tiny_contentv,tiny_cogvideox_5b none,low_vram_24g,low_vram_8g 400 decode"}
else
    BACKEND=cuda
    BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
    WHEELS=${GPU_CHECK_WHEELS:-.whl}
    STEPS=${GPU_CHECK_STEPS:-2}
    WARMUP=${GPU_CHECK_WARMUP:-1}
    SIZE=${GPU_CHECK_SIZE:-}
    RECORD=${GPU_CHECK_RECORD:-1}
    # Box per run: a cap, not a plan; the budget cuts the later ones. The decode (125 frames in fp32) is
    # measured where a preset changes it (untiled: none; tiled: low_vram_24g); the others reuse that time.
    RUNS=${GPU_CHECK_RUNS:-"contentv_8b none 110 decode; contentv_8b low_vram_24g 120 decode;
        contentv_8b low_vram_16g 80 from:low_vram_24g; contentv_8b low_vram_8g 90 from:low_vram_24g;
        contentv_8b model_offload 75 from:none; cogvideox_5b none 90 decode; cogvideox_5b low_vram_24g 90 decode"}
fi
TESTS_S=${GPU_CHECK_TESTS_S:-90}
SITE=${GPU_CHECK_SITE:-/tmp/site}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
SIZE_ARGS=()
if [[ -n $SIZE ]]; then
    IFS=x read -r H W F <<<"$SIZE"
    SIZE_ARGS=(--height "$H" --width "$W" --frames "$F")
fi

log() { printf '[gpu_check %4ds] %s\n' "$((SECONDS - START))" "$*"; }

# Seconds one preset needs at the least in a benchmark process, its share of the imports and the load included
# (ContentV-8B: imports ~10 s, 27 GB of random bf16 weights ~25 s, placement, 3 steps of 3-15 s: 50-80 s). A run
# starts only when its presets' minimum is left, so a late run is skipped ("out_of_time") rather than killed by
# its box halfway with nothing recorded.
min_run_s() { # min_run_s MODELS PRESETS
    local model n total=0
    n=$(tr ',' '\n' <<<"$2" | grep -c .)
    for model in ${1//,/ }; do
        case $model in
            contentv_8b) total=$((total + 60 * n)) ;;
            cogvideox_5b) total=$((total + 45 * n)) ;;
            *) total=$((total + 10)) ;; # the tiny models: seconds for all their presets together
        esac
    done
    echo "$total"
}

record() { # record STEP STATUS SECONDS NOTE: one line of steps.jsonl
    local note=${4//\\/\\\\}
    note=${note//\"/\\\"}
    printf '{"step": "%s", "status": "%s", "seconds": %s, "note": "%s"}\n' "$1" "$2" "$3" "$note" >>"$OUT/steps.jsonl"
}

FAILED=0
STEP_BOX=0
boxed() { # boxed CMD...: a command in the current step's time box (TERM, then KILL 10 s later)
    timeout --kill-after=10 "$STEP_BOX" "$@"
}

run_step() { # run_step NAME BOX_S MIN_S FUNCTION ARGS...: the box cut to the budget left; never stops the script
    local name=$1 box=$2 min=$3 left rc=0 t0 status note=""
    shift 3
    left=$((BUDGET_S - (SECONDS - START)))
    if ((box <= 0)); then # `timeout 0` would mean no limit: a 0 s box switches the step off
        log "$name: skipped (time box 0)"
        record "$name" skipped 0 "switched off: time box 0"
        return 0
    fi
    if ((left < min)); then
        log "$name: out of time (${left} s of ${BUDGET_S} s left, needs ${min} s)"
        record "$name" out_of_time 0 "${left} s of the ${BUDGET_S} s budget left, needs ${min} s"
        FAILED=1
        return 0
    fi
    if ((box > left)); then box=$left; fi
    log "$name: start (time box ${box} s, ${left} s of the budget left)"
    t0=$SECONDS
    STEP_BOX=$box
    "$@" || rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout note="killed by its ${box} s time box" ;;
        *) status=failed note="exit status $rc" ;;
    esac
    if [[ $status != ok ]]; then FAILED=1; fi
    log "$name: $status after $((SECONDS - t0)) s${note:+ ($note)}"
    record "$name" "$status" "$((SECONDS - t0))" "$note"
}

write_env() {
    {
        echo "run $RUN_ID, $(date -u), $(uname -srm), $(nproc) cores"
        free -g 2>/dev/null | head -2 || true
        if command -v nvidia-smi >/dev/null; then boxed nvidia-smi || true; else echo "nvidia-smi: not found"; fi
        boxed "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "diffusers", "transformers", "accelerate", "hydra-core", "omegaconf", "imageio-ffmpeg",
             "safetensors", "tokenizers", "huggingface-hub", "numpy", "pytest", "flash-attn", "sageattention"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} (not installed)")
EOF
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

preflight() { # everything the check imports, before any device time goes into runs that could not start
    boxed "$PY" - "$BACKEND" <<'EOF'
import importlib, sys, time
t0 = time.perf_counter()
modules = ["torch", "numpy", "PIL", "psutil", "yaml", "safetensors", "tokenizers", "sentencepiece", "transformers",
           "accelerate", "huggingface_hub", "diffusers", "hydra", "omegaconf", "pytest", "pytest_timeout", "demo",
           "backends", "backends.cuda", "contentv.runtime", "contentv.planner", "contentv.models.contentv.pipeline",
           "contentv.models.cogvideox.pipeline", "benchmarks.gpu_presets", "benchmarks.gpu_tables",
           "benchmarks.random_weights"]
missing = []
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as exc:  # each failure is reported, then the check stops
        missing.append(f"{name}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
import torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    missing.append("torch.cuda.is_available() is False")
for line in missing:
    print("preflight:", line)
print(f"preflight: {len(modules) - len(missing)} of {len(modules)} imports in {time.perf_counter() - t0:.1f} s")
sys.exit(1 if missing else 0)
EOF
}

install_wheels() {
    boxed "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
}

bench() { # bench MODEL PRESETS DECODE: one gpu_presets.py process
    local decode_args=()
    case $3 in
        decode) ;;
        from:*) decode_args=(--no-decode --decode-from "${3#from:}") ;;
        *) decode_args=(--no-decode) ;;
    esac
    local outs=(--out "$OUT")
    if ((RECORD)); then outs+=(--out "$ROOT/benchmarks/results"); fi
    boxed "$PY" benchmarks/gpu_presets.py --model "$1" --presets "$2" --backend "$BACKEND" --steps "$STEPS" \
        --warmup "$WARMUP" "${SIZE_ARGS[@]}" "${decode_args[@]}" "${outs[@]}" --run-id "$RUN_ID" \
        --predictions "$OUT/predictions.json"
}

main() {
    log "run $RUN_ID: $([[ $SMOKE == 1 ]] && echo "smoke (CPU, tiny models)" || echo GPU), budget ${BUDGET_S} s, out $OUT"
    rm -f "$OUT/steps.jsonl" "$OUT/cuda_tests.xml" "$OUT/predictions.json" "$OUT/summary.md"

    # 1. wheels: the GPU image lacks diffusers, hydra-core, omegaconf, antlr4 and imageio-ffmpeg
    if [[ -n $WHEELS ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        run_step wheels 120 10 install_wheels
        export PYTHONPATH=$SITE:$PYTHONPATH
    else
        log "wheels: skipped (no ${WHEELS:-wheels folder}/*.whl: using the installed packages)"
        record wheels skipped 0 "no ${WHEELS:-wheels folder}/*.whl: the installed packages are used"
    fi

    # 2. pre-flight: stop here when the check can't import what it needs
    run_step preflight 30 5 preflight
    if ! tail -1 "$OUT/steps.jsonl" | grep -q '"status": "ok"'; then
        log "pre-flight failed: stopping before any run (see the lines above)"
        "$PY" benchmarks/gpu_tables.py --summary "$OUT" || true
        return 1
    fi

    # 3. the machine and the versions
    run_step env 30 5 write_env

    # 4. the planner's predictions, on the CPU in the background while the tests use the GPU
    local models
    models=$(tr ';' '\n' <<<"$RUNS" | awk 'NF {print $1}' | tr ',' '\n' | sort -u | paste -sd, -)
    local plan_t0=$SECONDS plan_rc=0 plan_pid="" left=$((BUDGET_S - (SECONDS - START)))
    if ((left >= 20)); then
        timeout --kill-after=10 "$((left < 240 ? left : 240))" "$PY" benchmarks/gpu_presets.py \
            --predict "$OUT/predictions.json" --model "$models" --backend "$BACKEND" "${SIZE_ARGS[@]}" &
        plan_pid=$!
    fi

    # 5. the cuda-marked tests (they skip without a GPU); bitsandbytes' only where it is installed or carried
    local select=()
    if ! "$PY" -c 'import bitsandbytes' >/dev/null 2>&1; then
        select=(-k "not bnb and not int8")
        log "cuda_tests: no bitsandbytes here: its tests deselected (make_wheels.sh --with-bitsandbytes carries it)"
    fi
    run_step cuda_tests "$TESTS_S" 20 boxed "$PY" -m pytest -m cuda -q -p no:cacheprovider --timeout=120 \
        "${select[@]}" --junitxml="$OUT/cuda_tests.xml" tests

    if [[ -z $plan_pid ]]; then
        FAILED=1
        record plan out_of_time 0 "${left} s of the ${BUDGET_S} s budget left, needs 20 s"
    elif wait "$plan_pid" || plan_rc=$?; ((plan_rc == 0)); then
        record plan ok "$((SECONDS - plan_t0))" "predictions.json: $models"
    else
        FAILED=1
        record plan failed "$((SECONDS - plan_t0))" "exit status $plan_rc: each benchmark plans for itself"
    fi

    # 6. the benchmark runs, one process each
    local run model presets box decode
    while IFS= read -r run; do
        read -r model presets box decode <<<"$run" || true
        [[ -n ${model:-} ]] || continue
        run_step "bench $model $presets" "$box" "$(min_run_s "$model" "$presets")" bench "$model" "$presets" \
            "${decode:-decode}"
    done < <(tr ';' '\n' <<<"$RUNS")

    # 7. the summary: steps, tests, results and targets
    "$PY" benchmarks/gpu_tables.py --summary "$OUT" || FAILED=1
    local results=("$OUT"/gpu_*.jsonl)
    log "done in $((SECONDS - START)) s; results in ${results[*]}"
    return "$FAILED"
}

: >"$OUT/gpu_check.log"
main "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
