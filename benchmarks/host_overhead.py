"""Host time per call: CPU microseconds spent launching one SE block on a tiny input.

    python benchmarks/host_overhead.py                 # the available device
    python benchmarks/host_overhead.py --device cpu --calls 20000 --out bench_out

On a tiny input (1×64×4×4, R = 16) the device work is a few microseconds, so the time per call
is the host path: Python, argument checks, the dispatcher, allocation and the launch itself.
For each contender (eager SEBlock and every FusedSE backend that runs on the device) it times
`--calls` back-to-back calls (then one synchronisation), in `--rounds` interleaved rounds, and
reports the median µs per call of: inference forward (no_grad), training forward (autograd
recording) and forward+backward. Writes host.csv and host.md into --out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from se_fused import FusedSE, SEBlock  # noqa: E402
from se_fused.functional import resolve_backend  # noqa: E402

PASSES = ("inference forward", "training forward", "forward+backward")


def contenders(device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    reference = SEBlock(64, rd_channels=16).to(device)
    blocks = {"eager SEBlock": reference}
    backends = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    for backend in backends:
        try:
            resolve_backend(backend, device.type)
        except RuntimeError as why:
            print(f"FusedSE {backend}: not measured ({why})", file=sys.stderr)
            continue
        block = FusedSE(64, rd_channels=16, backend=backend).to(device)
        block.load_state_dict(reference.state_dict())
        blocks[f"FusedSE {backend}"] = block
    return blocks


def runner(block: torch.nn.Module, pass_name: str, x: torch.Tensor, g: torch.Tensor):
    if pass_name == "inference forward":
        def run():
            with torch.no_grad():
                block(x)
    elif pass_name == "training forward":
        def run():
            block(x)
    else:
        def run():
            block(x).backward(g)
    return run


def time_per_call_us(run, device: torch.device, calls: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.randn(1, 64, 4, 4, device=device, requires_grad=True)
    g = torch.randn_like(x)
    blocks = contenders(device)
    runs = {(name, p): runner(block, p, x, g) for name, block in blocks.items() for p in PASSES}
    for run in runs.values():  # warm-up: kernels compiled, workspaces allocated
        for _ in range(20):
            run()
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits every contender alike
        for key, run in runs.items():
            samples[key].append(time_per_call_us(run, device, args.calls))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    header = f"{card}; torch {torch.__version__}; x 1x64x4x4, R 16; median of {args.rounds} rounds of {args.calls} calls"
    rows = []
    for name in blocks:
        row = {"contender": name}
        for p in PASSES:
            row[p] = statistics.median(samples[(name, p)])
        rows.append(row)
    eager = rows[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "host.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["contender", *PASSES])
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Host time per call (µs)\n\n{header}\n",
             "| contender | " + " | ".join(PASSES) + " |", "| --- |" + " ---: |" * len(PASSES)]
    for row in rows:
        cells = [f"{row[p]:.1f} ({row[p] / eager[p]:.2f}x eager's)" if row is not eager else f"{row[p]:.1f}"
                 for p in PASSES]
        lines.append(f"| {row['contender']} | " + " | ".join(cells) + " |")
    (out / "host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
