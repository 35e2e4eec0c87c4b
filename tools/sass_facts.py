"""What one architecture's SASS does with memory, a line per kernel (tools/cuda_resource_report.sh
feeds it `cuobjdump -sass` of the built extension): 16-byte global loads and stores (the streaming
passes' width), local-memory accesses (spills, the stack), how many of those sit inside a
streaming loop (an innermost loop with a 16-byte global load), where they would cost bandwidth, and
the fewest 16-byte loads any streaming loop issues an iteration (`loads_per_iteration`; the loops
issue their loads before their stores, so that is what a thread has in flight at least).

    python3 tools/sass_facts.py sm_90 < sass.txt
"""

import bisect
import re
import sys

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
BACKWARD_BRANCH = re.compile(r"BRA\s+0x([0-9a-f]+)")
WIDE_LOAD = re.compile(r"LDG[.A-Z]*\.128")
WIDE_STORE = re.compile(r"STG[.A-Z]*\.128")
LOCAL = re.compile(r"\b(LDL|STL)")


def facts(name: str, body: list[tuple[int, str]], arch: str) -> str:
    loads = [a for a, i in body if WIDE_LOAD.search(i)]
    local = [a for a, i in body if LOCAL.search(i)]
    stores = sum(bool(WIDE_STORE.search(i)) for _, i in body)

    def count(addrs: list[int], lo: int, hi: int) -> int:
        return bisect.bisect_right(addrs, hi) - bisect.bisect_left(addrs, lo)

    loops = []
    for addr, ins in body:
        m = BACKWARD_BRANCH.search(ins)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    streaming = [(lo, hi) for lo, hi in loops if count(loads, lo, hi)]
    innermost = [(lo, hi) for lo, hi in streaming
                 if not any(lo < l2 and h2 < hi for l2, h2 in streaming if (l2, h2) != (lo, hi))]
    in_loops = sum(any(lo <= a <= hi for lo, hi in innermost) for a in local)
    per_iteration = min((count(loads, lo, hi) for lo, hi in innermost), default=0)
    return (f"{arch} {name} SASS: LDG.128={len(loads)} STG.128={stores} local={len(local)} "
            f"loads_per_iteration={per_iteration} local_in_streaming_loops={in_loops}")


def main() -> None:
    want = sys.argv[1]
    arch, name, body = None, None, []

    def flush() -> None:
        if name and body:
            print(facts(name, body, want))

    for line in sys.stdin:
        if line.startswith("arch = "):
            flush()
            arch, name, body = line.split()[2], None, []
        elif "Function :" in line:
            flush()
            name, body = (line.split()[2] if arch == want else None), []
        elif name:
            m = INSTRUCTION.search(line)
            if m:
                body.append((int(m.group(1), 16), m.group(2)))
    flush()


if __name__ == "__main__":
    main()
