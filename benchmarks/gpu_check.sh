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
    MIN_RUN_S=10
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
    MIN_RUN_S=40 # imports, random weights and 3 steps of ContentV-8B take about that
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

    # 2. the machine and the versions
    run_step env 30 5 write_env

    # 3. the planner's predictions, on the CPU in the background while the tests use the GPU
    local models
    models=$(tr ';' '\n' <<<"$RUNS" | awk 'NF {print $1}' | tr ',' '\n' | sort -u | paste -sd, -)
    local plan_t0=$SECONDS plan_rc=0 plan_pid="" left=$((BUDGET_S - (SECONDS - START)))
    if ((left >= 20)); then
        timeout --kill-after=10 "$((left < 240 ? left : 240))" "$PY" benchmarks/gpu_presets.py \
            --predict "$OUT/predictions.json" --model "$models" --backend "$BACKEND" "${SIZE_ARGS[@]}" &
        plan_pid=$!
    fi

    # 4. the cuda-marked tests (they skip without a GPU)
    run_step cuda_tests "$TESTS_S" 20 boxed "$PY" -m pytest -m cuda -q -p no:cacheprovider --timeout=120 \
        --junitxml="$OUT/cuda_tests.xml" tests

    if [[ -z $plan_pid ]]; then
        FAILED=1
        record plan out_of_time 0 "${left} s of the ${BUDGET_S} s budget left, needs 20 s"
    elif wait "$plan_pid" || plan_rc=$?; ((plan_rc == 0)); then
        record plan ok "$((SECONDS - plan_t0))" "predictions.json: $models"
    else
        FAILED=1
        record plan failed "$((SECONDS - plan_t0))" "exit status $plan_rc: each benchmark plans for itself"
    fi

    # 5. the benchmark runs, one process each
    local run model presets box decode
    while IFS= read -r run; do
        read -r model presets box decode <<<"$run" || true
        [[ -n ${model:-} ]] || continue
        run_step "bench $model $presets" "$box" "$MIN_RUN_S" bench "$model" "$presets" "${decode:-decode}"
    done < <(tr ';' '\n' <<<"$RUNS")

    # 6. the summary: steps, tests, results and targets
    "$PY" benchmarks/gpu_tables.py --summary "$OUT" || FAILED=1
    local results=("$OUT"/gpu_*.jsonl)
    log "done in $((SECONDS - START)) s; results in ${results[*]}"
    return "$FAILED"
}

: >"$OUT/gpu_check.log"
main "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
