#!/usr/bin/env bash
# The GPU check in one device call, sized for a 15-minute slot (machine start included): a correctness gate
# first, then the default pair's benchmark, then whatever the budget leaves. Every part tees its log to $OUT
# (the device tool's output folder) as it runs and the benchmarks rewrite their JSON after each table, so a
# part killed at its limit keeps what it measured; a part that fails does not stop the others.
#
#   bash bench/gpu_check.sh              # from the repository root, on a machine with a CUDA GPU
#   GPU_CHECK_BUDGET_S=300 GPU_CHECK_PARTS="gate quick_bench" bash bench/gpu_check.sh   # a rerun
#   GPU_CHECK_QUICK_TABLES=verify,pairs bash bench/gpu_check.sh   # quick_bench without the tables already measured
#
# Parts, each under min(its limit, the time left of the budget; default 460 s):
#   gate         pytest -m gpu_gate tests/test_gpu.py: kernel == reference at K=16 V=151936 (bf16/fp32,
#                greedy/sampling, judge), seeded lossless sampling (chi-square, 50k trials), graph replay ==
#                eager, graphed speculative == target (fp32)                                  ~1 min
#   quick_bench  bench/gpu_bench.py --part quick: fused verify (device-only and host-inclusive) vs eager,
#                0.5B/1.5B steps graph vs eager, the 0.5B -> 1.5B cycle, transformers assisted  ~2-3 min
#   batched_bench  bench/gpu_bench.py --part quick --tables batched: continuous batching 0.5B -> 1.5B at batch
#                1/8/32, target and speculative, graphs on and off                            ~2 min
#   rest_tests   the other GPU tests (other K and V, real-shape fp32 pairs, flash-attn if installed)
#   rest_bench   bench/gpu_bench.py --part rest: Llama 1B/8B, Qwen 7B, windows to 64, V=128256
# The CPU kernel tests are not here: CI runs them. Installs nothing: the device machine has no network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=0
PY="${PYTHON:-python3}"
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-460}))
parts="${GPU_CHECK_PARTS:-gate quick_bench batched_bench rest_tests rest_bench}"
failed=()

log() { echo "$*" | tee -a "$OUT/summary.log"; }

part() {  # part NAME LIMIT COMMAND...: COMMAND under min(LIMIT, time left), its output teed to $OUT/$LOG.log
    # (LOG defaults to NAME; the benchmarks share one log since the tool brings back at most 8 files)
    local name=$1 limit=$2 start=$SECONDS left=$((deadline - SECONDS)) logfile="$OUT/${LOG:-$1}.log"
    shift 2
    [[ " $parts " == *" $name "* ]] || return 0
    if ((left < 20)); then
        log "=== $name: skipped, ${left} s of the budget left"
        failed+=("$name(skipped)")
        return
    fi
    ((limit > left)) && limit=$left
    log "=== $name (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$logfile"
    local rc=$?
    ((rc != 0)) && failed+=("$name(rc=$rc)")
    log "=== $name: rc=$rc, $((SECONDS - start)) s"
}

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| triton', triton.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/summary.log"

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --durations=8 tests/test_gpu.py)
part gate 150 "${PYTEST[@]}" -m gpu_gate
LOG=bench part quick_bench 240 "$PY" bench/gpu_bench.py --part quick --tables "${GPU_CHECK_QUICK_TABLES:-verify,steps,pairs}" --json "$OUT/quick_bench.json"
LOG=bench part batched_bench 120 "$PY" bench/gpu_bench.py --part quick --tables batched --json "$OUT/batched_bench.json"
part rest_tests 120 "${PYTEST[@]}" -m "not gpu_gate and not slow"
LOG=bench part rest_bench 240 "$PY" bench/gpu_bench.py --part rest --json "$OUT/rest_bench.json"

if ((${#failed[@]})); then
    log "NOT ALL PASSED: ${failed[*]} (logs in $OUT)"
    exit 1
fi
log "all parts passed (logs in $OUT)"
