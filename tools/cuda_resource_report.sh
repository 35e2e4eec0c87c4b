#!/usr/bin/env bash
# One line per CUDA kernel and architecture of the *built* extension (se_fused/_C*.so, the cubins
# nvcc put in it; nothing is recompiled): registers, stack frame (spills live there) and shared
# memory, then what its SASS does with memory (tools/sass_facts.py): 16-byte global loads and
# stores (the streaming passes' width), local-memory accesses (spills, the stack around calls) and
# how many of those sit in a streaming loop (none may: the script fails), and the fewest 16-byte loads
# a streaming loop issues an iteration (at least 2, or the script fails). Needs cuobjdump only (no
# GPU): $CUOBJDUMP, CUDA's, or the one Triton ships.
#   tools/cuda_resource_report.sh [arch ...]      default: 80 90
set -euo pipefail
cd "$(dirname "$0")/.."
lib=$(python3 -c 'import se_fused._C as m; print(m.__file__)' 2>/dev/null || ls se_fused/_C*.so 2>/dev/null | head -1 || true)
[ -n "$lib" ] && [ -f "$lib" ] || { echo "no built se_fused._C extension found" >&2; exit 1; }
cuobjdump="${CUOBJDUMP:-${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump}"
if [ ! -x "$cuobjdump" ]; then
    cuobjdump=$(python3 -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null || true)
fi
[ -x "$cuobjdump" ] || { echo "no cuobjdump found (set CUOBJDUMP)" >&2; exit 1; }
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90)
demangle() { c++filt | sed -E 's/se_fused::\(anonymous namespace\):://g; s/\(se_fused::[^)]*\)//; s/ void / /'; }
resources=$("$cuobjdump" --dump-resource-usage "$lib")
sass=$("$cuobjdump" -sass "$lib")
facts=$(mktemp)
trap 'rm -f "$facts"' EXIT
for arch in "${archs[@]}"; do
    grep -q "arch = sm_${arch}\$" <<<"$resources" || { echo "sm_${arch}: not in $lib"; continue; }
    awk -v want="sm_${arch}" '
        /^arch = / { arch = $3 }
        arch == want && /^ Function / { name = $2; sub(/:$/, "", name) }
        arch == want && /REG:/ {
            for (i = 1; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] }
            printf "%s %s regs=%s stack=%s smem=%s\n", arch, name, v["REG"], v["STACK"], v["SHARED"]
        }' <<<"$resources" | demangle
    python3 tools/sass_facts.py "sm_${arch}" <<<"$sass" | demangle | tee -a "$facts"
done
# A spill inside a streaming loop costs bandwidth on every element, and a loop with one 16-byte load
# an iteration has too few bytes in flight to stream at the copy bandwidth: fail (CI runs this script).
if grep -v "local_in_streaming_loops=0\$" "$facts" | grep -q SASS; then
    echo "FAIL: local-memory accesses inside a streaming loop (above)" >&2
    exit 1
fi
if grep -q "loads_per_iteration=1 " "$facts"; then
    echo "FAIL: a streaming loop with one 16-byte load an iteration (above)" >&2
    exit 1
fi
