"""The residual tail of an SE-ResNet block, y = relu(se(x) + shortcut): fused against unfused.

    python benchmarks/bench_tail.py --out bench_out                    # the available device
    python benchmarks/bench_tail.py --device cpu --out bench_cpu       # CPU: float32, batch 8
    python benchmarks/bench_tail.py --quick --device cpu --out DIR     # CI smoke run

SE-ResNet-50's four stage shapes (se_fused/shapes.py), both layouts; contenders in one process:

    eager                   SEBlock(out_act="relu")(x, shortcut): SE, add and ReLU as eager ops
    torch.compile           torch.compile of that module (Dynamo reset per shape; a call that
                            did not run compiled code is reported as "not compiled")
    FusedSE + eager tail    FusedSE, then eager add and ReLU (what convert_se_modules alone gives)
    FusedSE tail <backend>  FusedSE(out_act="relu")(x, shortcut): the tail in the SE's own pass

Passes: forward (no grad) and forward+backward (gradients of x, the shortcut and the parameters).
Floor (B = bytes of x): forward 3B (read x and the shortcut, write y), forward+backward 8B (and read
the gradient, y and x, write dx and the shortcut's gradient); achieved bandwidth is that over the
time, against a copy measured in the same run. Timing as bench_se.py: do_bench medians on a GPU,
interleaved rounds (minimum of per-round medians) on the CPU. Writes tail.csv and tail.md into --out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_se import (Rotation, add_malloc_option, apply_malloc_option, compiled_region_ran,  # noqa: E402
                      copy_bandwidth, cpu_time_ms, gpu_time_ms)
from se_fused import FusedSE, SEBlock  # noqa: E402
from se_fused.functional import resolve_backend  # noqa: E402
from se_fused.ops import cuda_kernels_available, extension_available, triton_available  # noqa: E402
from se_fused.shapes import MODEL_SHAPES  # noqa: E402

FLOOR_FACTOR = {"forward": 3, "forward+backward": 8}
FIELDS = ["shape", "batch", "dtype", "layout", "pass", "contender", "status", "ms", "speedup_vs_eager",
          "speedup_vs_compile", "floor_gbps", "copy_share"]


def backends(device: torch.device) -> list[str]:
    """The fused backends that run the tail here."""
    names = ["torch"]
    if device.type == "cpu" and extension_available():
        names.append("cpp")
    if device.type == "cuda" and triton_available():
        names.append("triton")
    if device.type == "cuda" and cuda_kernels_available():
        names.append("cuda")
    runnable = []
    for name in names:
        try:
            resolve_backend(name, device.type, tail=True)
            runnable.append(name)
        except RuntimeError:
            pass
    return runnable


class UnfusedTail(torch.nn.Module):
    """FusedSE followed by eager add and ReLU."""

    def __init__(self, se: FusedSE) -> None:
        super().__init__()
        self.se = se

    def forward(self, x, shortcut):
        return torch.relu(self.se(x) + shortcut)


def contenders(c: int, r: int, device, dtype) -> dict:
    torch.manual_seed(0)
    eager = SEBlock(c, rd_channels=r, out_act="relu").to(device=device, dtype=dtype)
    out = {"eager": eager, "torch.compile": torch.compile(eager)}
    plain = FusedSE(c, rd_channels=r).to(device=device, dtype=dtype)
    plain.load_state_dict(eager.state_dict())
    out["FusedSE + eager tail"] = UnfusedTail(plain)
    for backend in backends(device):
        fused = FusedSE(c, rd_channels=r, out_act="relu", backend=backend).to(device=device, dtype=dtype)
        fused.load_state_dict(eager.state_dict())
        out[f"FusedSE tail {backend}"] = fused
    return out


def run_fn(block, pass_name: str, inputs: Rotation, grad: torch.Tensor):
    params = list(block.parameters())
    if pass_name == "forward":
        def run():
            with torch.no_grad():
                block(*inputs.next()[0])
    else:
        def run():
            x, shortcut = inputs.next()[0]
            torch.autograd.grad(block(x, shortcut), [x, shortcut] + params, grad)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="default 64 on a GPU, 8 on the CPU")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--layouts", nargs="*", default=["channels_last", "nchw"], choices=["channels_last", "nchw"])
    parser.add_argument("--quick", action="store_true", help="the first stage at batch 2, one round")
    parser.add_argument("--rounds", type=int, default=7, help="CPU: interleaved rounds")
    parser.add_argument("--calls", type=int, default=8, help="CPU: timed calls per contender and round")
    add_malloc_option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    malloc = apply_malloc_option(args.malloc, device)
    gpu = device.type == "cuda"
    batch = args.batch or (2 if args.quick else (64 if gpu else 8))
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    rounds, calls = (1, 2) if args.quick else (args.rounds, args.calls)
    shapes = MODEL_SHAPES["seresnet50"][2][: 1 if args.quick else None]
    copy_bw = copy_bandwidth(device, rounds, calls)
    rows = []
    for c, hw, r in shapes:
        for layout in args.layouts:
            memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            torch._dynamo.reset()
            blocks = contenders(c, r, device, dtype)

            def make():
                return tuple(torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
                             .to(memory_format=memory_format).requires_grad_() for _ in range(2))

            nbytes = batch * c * hw * hw * dtype.itemsize
            inputs = Rotation(make, 2 * nbytes, device)
            grad = torch.randn(batch, c, hw, hw, device=device, dtype=dtype).to(memory_format=memory_format)
            runs, status = {}, {}
            for name, block in blocks.items():
                for pass_name in FLOOR_FACTOR:
                    run = run_fn(block, pass_name, inputs, grad)
                    run()  # compiles, warms up
                    if name == "torch.compile" and not compiled_region_ran(run):
                        status[(name, pass_name)] = "not compiled: Dynamo ran it eagerly"
                        continue
                    runs[(name, pass_name)] = run
            times = ({key: gpu_time_ms(run)[0] for key, run in runs.items()} if gpu
                     else {key: value[0] for key, value in cpu_time_ms(runs, rounds, calls).items()})
            for pass_name, factor in FLOOR_FACTOR.items():
                eager_ms = times.get(("eager", pass_name))
                compile_ms = times.get(("torch.compile", pass_name))
                for name in blocks:
                    key = (name, pass_name)
                    row = dict(shape=f"{c}x{hw}x{hw} r{r}", batch=batch, dtype=str(dtype).replace("torch.", ""),
                               layout=layout, contender=name, status=status.get(key, "ok"), **{"pass": pass_name})
                    if key in times:
                        ms = times[key]
                        gbps = factor * nbytes / (ms * 1e-3) / 1e9
                        row.update(ms=ms, speedup_vs_eager=eager_ms / ms if eager_ms else "",
                                   speedup_vs_compile=compile_ms / ms if compile_ms else "",
                                   floor_gbps=gbps, copy_share=gbps * 1e9 / copy_bw)
                    rows.append(row)
    card = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads; not a GPU result)"
    write(Path(args.out), rows, f"{card}; torch {torch.__version__}; copy bandwidth {copy_bw / 1e9:.1f} GB/s "
                                f"(read + write){'; ' + malloc if malloc else ''}")


def write(out: Path, rows: list[dict], header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tail.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# SE + residual add + ReLU\n\n{header}\n",
             "| shape | batch | dtype | layout | pass | contender | ms | vs eager | vs compile | floor GB/s | "
             "share of copy |",
             "| --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        cells = [row["shape"], str(row["batch"]), row["dtype"], row["layout"], row["pass"], row["contender"]]
        if row["status"] != "ok":
            cells += [row["status"], "", "", "", ""]
        else:
            cells += [f"{row['ms']:.3f}", _ratio(row["speedup_vs_eager"]), _ratio(row["speedup_vs_compile"]),
                      f"{row['floor_gbps']:.0f}", f"{row['copy_share']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "tail.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ratio(value) -> str:
    return f"{value:.2f}x" if isinstance(value, float) else ""


if __name__ == "__main__":
    main()
