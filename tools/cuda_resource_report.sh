#!/usr/bin/env bash
# Compiles csrc/cuda/se_cuda.cu for each architecture and prints one line per kernel:
# registers, spill stores/loads and shared memory, from ptxas; and, where a cuobjdump is found
# ($CUOBJDUMP, CUDA's, or the one Triton ships), what its SASS does with memory: 16-byte global
# loads and stores (the streaming passes' width) and local-memory accesses (spills). Needs nvcc
# only (no GPU).
#   tools/cuda_resource_report.sh [arch ...]      default: 80 90
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc_bin="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
command -v "$nvcc_bin" >/dev/null || nvcc_bin=nvcc
cuobjdump="${CUOBJDUMP:-${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump}"
if [ ! -x "$cuobjdump" ]; then
    cuobjdump=$(python3 -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null || true)
fi
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for arch in "${archs[@]}"; do
    "$nvcc_bin" -std=c++17 -O3 --resource-usage -gencode "arch=compute_${arch},code=sm_${arch}" \
        -cubin csrc/cuda/se_cuda.cu -o "$scratch/sm_${arch}.cubin" 2>&1 |
    awk -v arch="sm_${arch}" '
        /Compiling entry function/ { split($0, q, "'\''"); name = q[2] }
        /spill stores/ { spills = $5 "/" $9 }
        /Used [0-9]+ registers/ {
            regs = $5; smem = "0"
            for (i = 1; i <= NF; i++) if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i
            printf "%s %s regs=%s spills(st/ld bytes)=%s smem=%s\n", arch, name, regs, spills, smem
        }' | c++filt | sed -E 's/se_fused::\(anonymous namespace\):://g; s/\(se_fused::[^)]*\)//'
    if [ -x "$cuobjdump" ]; then
        "$cuobjdump" -sass "$scratch/sm_${arch}.cubin" |
        awk -v arch="sm_${arch}" '
            function report() { if (name != "") printf "%s %s SASS: LDG.128=%d STG.128=%d local=%d\n", arch, name, ld, st, lcl }
            /Function :/ { report(); name = $3; ld = st = lcl = 0 }
            /LDG[.A-Z]*\.128/ { ld++ }
            /STG[.A-Z]*\.128/ { st++ }
            /(LDL|STL)/ { lcl++ }
            END { report() }' | c++filt | sed -E 's/se_fused::\(anonymous namespace\):://g; s/\(se_fused::[^)]*\)//'
    else
        echo "sm_${arch}: no cuobjdump found (set CUOBJDUMP): SASS summary skipped"
    fi
done
