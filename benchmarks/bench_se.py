"""First microbenchmark: eager SEBlock vs FusedSE on the available device.

    python benchmarks/bench_se.py                 # GPU if there is one, else CPU
    python benchmarks/bench_se.py --batch 128 --dtype bfloat16 --channels-last --shapes seresnet50

GPU timings use triton.testing.do_bench (median with 20th/80th percentiles, after
warm-up), rotating over several input buffers so small shapes are not served from
L2. Achieved bandwidth counts the floor's bytes (shared/DESIGN.md §2: 2B forward,
5B forward+backward) and is compared with a device-to-device copy measured in the
same run. CPU timings are wall-clock medians and say so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from se_fused import FusedSE, SEBlock
from se_fused.ops import cuda_kernels_available, extension_available

# (label, C, H, R, act, gate) from shared/DESIGN.md §5
SHAPES = [
    ("seresnet50 s1", 256, 56, 16, "relu", "sigmoid"),
    ("seresnet50 s4", 2048, 7, 128, "relu", "sigmoid"),
    ("efficientnet_b0 b2", 96, 56, 4, "silu", "sigmoid"),
    ("efficientnet_b0 b7", 1152, 7, 48, "silu", "sigmoid"),
    ("mobilenetv3 b4", 72, 28, 24, "relu", "hard_sigmoid"),
]
L2_FLUSH_BYTES = 256 * 1024 * 1024  # rotate inputs until this many bytes are live: far above any L2


def time_ms(fn, device: torch.device) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8]))
    for _ in range(3):
        fn()
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10)
    return statistics.median(samples), q[1], q[7]


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes read + written per second by a large device-to-device copy."""
    if device.type != "cuda":
        return None
    src = torch.empty(L2_FLUSH_BYTES // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (ms * 1e-3)


def rotating(make, count: int):
    """A callable that hands out `count` pre-made inputs in turn."""
    items = [make() for _ in range(count)]
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % count
        return items[state["i"]]

    return next_item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 8 on CPU")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default: float16 on GPU, float32 on CPU")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--shapes", nargs="*", default=None, help="model prefixes to keep, e.g. seresnet50")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (64 if device.type == "cuda" else 8)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (timings are not GPU results)"
    copy_bw = copy_bandwidth(device)
    print(f"# {card}; torch {torch.__version__}; batch {batch}; {dtype}; "
          f"{'channels_last' if args.channels_last else 'NCHW'}")
    if copy_bw:
        print(f"# copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    if device.type == "cuda":
        backends = ["triton"] + (["cuda"] if cuda_kernels_available() else [])
    else:
        backends = ["torch"] + (["cpp"] if extension_available() else [])
    print("| shape | pass | contender | median ms (p20-p80) | speedup vs eager | floor GB/s | share of copy |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    shapes = [s for s in SHAPES if not args.shapes or any(s[0].startswith(k) for k in args.shapes)]
    for label, c, hw, r, act, gate in shapes:
        eager = SEBlock(c, rd_channels=r, act=act, gate=gate).to(device=device, dtype=dtype)
        contenders = {"eager": eager}
        for backend in backends:
            fused = FusedSE(c, rd_channels=r, act=act, gate=gate, backend=backend).to(device=device, dtype=dtype)
            fused.load_state_dict(eager.state_dict())
            contenders[f"FusedSE {backend}"] = fused
        nbytes = batch * c * hw * hw * dtype.itemsize
        buffers = max(2, L2_FLUSH_BYTES // nbytes) if device.type == "cuda" else 2
        inputs = rotating(lambda: torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
                          .to(memory_format=memory_format).requires_grad_(), buffers)
        grad = torch.randn(batch, c, hw, hw, device=device, dtype=dtype).to(memory_format=memory_format)
        for pass_name, floor_bytes in (("forward", 2 * nbytes), ("forward+backward", 5 * nbytes)):
            eager_ms = None
            for name, block in contenders.items():
                if pass_name == "forward":
                    def run(block=block):
                        with torch.no_grad():
                            block(inputs())
                else:
                    def run(block=block):
                        block(inputs()).backward(grad)
                ms, p20, p80 = time_ms(run, device)
                eager_ms = eager_ms or ms
                bandwidth = floor_bytes / (ms * 1e-3)
                share = f"{bandwidth / copy_bw:.0%}" if copy_bw else "n/a"
                print(f"| {label} {c}x{hw}x{hw} r{r} | {pass_name} | {name} | {ms:.4f} ({p20:.4f}-{p80:.4f}) | "
                      f"{eager_ms / ms:.2f}x | {bandwidth / 1e9:.0f} | {share} |", flush=True)


if __name__ == "__main__":
    main()
