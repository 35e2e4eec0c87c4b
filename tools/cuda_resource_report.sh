#!/usr/bin/env bash
# Compiles csrc/cuda/se_cuda.cu for each architecture and prints one line per kernel:
# registers, spill stores/loads and shared memory, from ptxas. Needs nvcc only (no GPU).
#   tools/cuda_resource_report.sh [arch ...]      default: 80 90
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc_bin="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
command -v "$nvcc_bin" >/dev/null || nvcc_bin=nvcc
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90)
for arch in "${archs[@]}"; do
    "$nvcc_bin" -std=c++17 -O3 --resource-usage -gencode "arch=compute_${arch},code=sm_${arch}" \
        -c csrc/cuda/se_cuda.cu -o /dev/null 2>&1 |
    awk -v arch="sm_${arch}" '
        /Compiling entry function/ { split($0, q, "'\''"); name = q[2] }
        /spill stores/ { spills = $5 "/" $9 }
        /Used [0-9]+ registers/ {
            regs = $5; smem = "0"
            for (i = 1; i <= NF; i++) if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i
            printf "%s %s regs=%s spills(st/ld bytes)=%s smem=%s\n", arch, name, regs, spills, smem
        }' | c++filt | sed -E 's/se_fused::\(anonymous namespace\):://g; s/\(se_fused::[^)]*\)//'
done
