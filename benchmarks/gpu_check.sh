#!/usr/bin/env bash
# Everything a GPU can tell us, in one run of under 10 minutes (docs/DESIGN.md §7):
# versions, build against this machine's torch, the test suite on CUDA (compile, export and CUDA
# graph tests included), compute-sanitizer memcheck + racecheck + synccheck on a small case, a quick eager /
# torch.compile / triton / cuda timing with host time per call, and a quick end to end.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     (default: $OUT, else ./gpu_check_out)
#   bash benchmarks/gpu_check.sh --dry-run     on a CPU machine: every step, shrunk, so typos surface here
#   GPU_CHECK_STEPS="build tests" bash benchmarks/gpu_check.sh   only some steps (build tests sanitizer bench e2e
#                                              compile), e.g. to finish a run that hit the device's time limit;
#                                              "compile" (whole models under torch.compile) is not in the default
#
# Writes 8 files into OUT_DIR: summary.txt (versions, step results, tables, host time) build.log
# tests.log sanitizer.log bench.csv bench.md bench.png e2e.md
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
summary="$out/summary.txt"
scratch=$(mktemp -d)
steps=" ${GPU_CHECK_STEPS:-build tests sanitizer bench e2e} "
step() {  # step KEY NAME TIMEOUT_S LOG COMMAND...: run, log, and record pass/fail with the time taken
    local key=$1 name=$2 limit=$3 log=$4; shift 4
    case "$steps" in *" $key "*) ;; *) return 0 ;; esac
    local start=$SECONDS
    echo "== $name"
    timeout "$limit" "$@" > "$log" 2>&1
    local rc=$?
    printf '%-28s %-5s %4ss  (%s)\n' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL:$rc)" $((SECONDS - start)) \
        "$(basename "$log")" | tee -a "$summary"
    tail -n 3 "$log"
}

{
    date -u
    git log -1 --format='commit %H %s' 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
} > "$summary" 2>&1
cat "$summary"

if [ $dry_run = 1 ]; then
    # The extension is built by the install here; re-running pip would take minutes for nothing.
    step build "build (dry: import only)" 120 "$out/build.log" python -c "import se_fused.ops as o; assert o.extension_available(), o.EXTENSION_ERROR; print('se_fused._C loads')"
    step tests "tests (dry: a subset)" 600 "$out/tests.log" env TRITON_INTERPRET=1 python -m pytest -x -q -k "edge_shapes and 3x3x7x7" tests/test_accuracy.py
    step sanitizer "sanitizer (dry: no GPU)" 300 "$out/sanitizer.log" python benchmarks/sanitizer_case.py
    step bench "bench (dry: CPU)" 300 "$scratch/bench.log" python benchmarks/bench_se.py --out "$out" --models mobilenetv3_large --layouts nchw --dtypes float32 --compile-modes --rounds 2
    step bench "host time (dry: CPU)" 120 "$scratch/host.log" python benchmarks/host_overhead.py --calls 200 --rounds 2 --out "$scratch"
    step e2e "end to end (dry: CPU)" 300 "$scratch/e2e.log" python benchmarks/end_to_end.py --quick --no-compile --no-train --out "$scratch" --models mobilenetv3_large_100
else
    export MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" SE_FUSED_REQUIRE_CUDA=1
    step build "build" 420 "$out/build.log" pip install --no-build-isolation --no-deps -e .
    # pytest-xdist where installed: the suite is ~850 tests
    step tests "tests on CUDA" 300 "$out/tests.log" python -m pytest -x -q -p no:cacheprovider $(python -c "import xdist" 2>/dev/null && echo "-n 12")
    step sanitizer "sanitizer memcheck" 150 "$out/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitizer_case.py
    step sanitizer "sanitizer racecheck" 150 "$scratch/racecheck.log" compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitizer_case.py
    cat "$scratch/racecheck.log" >> "$out/sanitizer.log" 2>/dev/null
    step sanitizer "sanitizer synccheck" 150 "$scratch/synccheck.log" compute-sanitizer --tool synccheck --error-exitcode 1 python benchmarks/sanitizer_case.py
    cat "$scratch/synccheck.log" >> "$out/sanitizer.log" 2>/dev/null
    step bench "bench (quick, fp16)" 300 "$scratch/bench.log" python benchmarks/bench_se.py --out "$out" --models seresnet50 efficientnet_b0 --batches 1 64 128 --compile-modes default
    step bench "host time per call" 120 "$scratch/host.log" python benchmarks/host_overhead.py --out "$scratch"
    step e2e "end to end (quick)" 120 "$scratch/e2e.log" python benchmarks/end_to_end.py --quick --no-compile --out "$scratch"
    step compile "whole model, torch.compile" 300 "$scratch/compile.log" python benchmarks/end_to_end.py --models mobilenetv3_large_100 --batches 64 --no-train --out "$scratch/compile"
fi
cp "$scratch/e2e.md" "$out/e2e.md" 2>/dev/null
{ echo; cat "$scratch/host.md" 2>/dev/null; echo; cat "$out/e2e.md" "$scratch/compile/e2e.md" 2>/dev/null; echo
  grep -h '^|' "$out/bench.md" 2>/dev/null | head -60; } >> "$summary"

echo
echo "== summary ($out)"
cat "$summary"
