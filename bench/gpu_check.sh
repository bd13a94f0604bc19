#!/usr/bin/env bash
# Issue 6 in one device call: GPU tests, the CPU kernel tests, the verify-kernel table and the hot-path
# benchmarks, each under its own time limit, every log under $OUT (the device tool's output folder).
#
#   bash bench/gpu_check.sh        # from the repository root, on a machine with a CUDA GPU
#
# Installs nothing: the device machine has no network, and its image already holds torch with CUDA, triton,
# transformers, pytest, pytest-xdist and hypothesis (/work/.library/device/KINDS.md). flash-attn is not in
# that image, so the flash tests skip; to run them, carry a flash-attn wheel built for the image's torch and
# CUDA as /work/.library/device/README.md describes and install it before this script.
#
# Budget, 9 minutes in all on an H100: GPU tests 180 s, CPU kernel tests 60 s, verify table 60 s,
# benchmarks 240 s. A part that fails or runs out of time is reported at the end; the others still run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
failed=()

part() {  # part NAME SECONDS COMMAND...: COMMAND under a time limit, its output teed to $OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    if ! timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
        failed+=("$name")
    fi
    echo "=== $name: $((SECONDS - start)) s"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| triton', triton.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())" || true
} 2>&1 | tee "$OUT/env.log"

# Compiled kernels here (conftest would otherwise turn the Triton interpreter on for the CPU suite).
part gpu_tests 180 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs tests/test_gpu.py
# The CPU suite's kernel tests run the interpreter on CPU tensors: a process of their own.
part kernel_tests_cpu 60 env TRITON_INTERPRET=1 "$PY" -m pytest -q -n 8 tests/test_verify_kernel.py
# torch.compile's per-shape compiles would take minutes: the fused kernel against eager only.
part verify_table 60 env TRITON_INTERPRET=0 "$PY" bench/bench_verify.py --table --impls triton,eager
part gpu_bench 240 env TRITON_INTERPRET=0 "$PY" bench/gpu_bench.py --json "$OUT/gpu_bench.json"

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (logs in $OUT)"
    exit 1
fi
echo "all parts passed (logs in $OUT)"
