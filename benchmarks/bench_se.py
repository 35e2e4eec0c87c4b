"""SE microbenchmarks: FusedSE against eager, torch.compile, timm and torchvision, on real model shapes.

    python benchmarks/bench_se.py --out bench_out            # quick set on the available device
    python benchmarks/bench_se.py --full --out bench_out     # every shape, batch, dtype, layout, pass
    python benchmarks/bench_se.py --models seresnet50 --batches 128 --dtypes bfloat16
    python benchmarks/bench_se.py --device cpu --batches 8 32 --full --out bench_cpu   # the CPU table

Shapes are the SE inputs of docs/DESIGN.md §5 (se_fused/shapes.py), each with its model's R, act and gate.
Contenders run in the same process: eager SEBlock; torch.compile(SEBlock) in default and
max-autotune modes (compile time reported apart, in compile_s); timm SEModule and
torchvision SqueezeExcitation where installed; FusedSE with every backend available.
Passes: forward (no grad), forward+backward, backward alone.

torch.compile rows measure compiled code or nothing: Dynamo is reset for every configuration
(one module class compiled over many shapes otherwise hits the recompile limit and silently
runs eager), and each compiled contender must show a "Torch-Compiled Region" in a profiled
call; one that ran eagerly is reported as "not compiled", with no time.

GPU timing: triton.testing.do_bench (warm-up, then median with 20th/80th percentiles),
rotating over input buffers that together exceed the L2 cache. Achieved bandwidth counts
the floor's bytes (§2: forward 2B, backward 3B, forward+backward 5B, B = the bytes of x)
and is compared with a device-to-device copy measured in the same run. Kernel launches per
call come from torch.profiler; peak memory is that of forward+backward above the inputs.

CPU timing, for a shared, noisy machine: every contender and pass of a configuration is timed
in --rounds interleaved rounds of --calls single-call wall-clock samples; the reported time is
the minimum over rounds of the per-round medians (p20/p80 over all samples show the spread).
Inputs rotate over buffers exceeding the last-level cache; a copy of a large buffer is timed
the same way in the same run; the thread count is reported. By default (--malloc reuse) glibc is told
to keep freed memory for reuse: otherwise it returns a freed multi-megabyte output to the OS or keeps
it, depending on the heap's history, and a call whose outputs must be page-faulted in again takes up to
twice as long — a bimodal cost of the allocator, not of the code measured. The page_faults column
counts the minor page faults per timed call either way; --malloc default measures the untouched state.

Writes bench.csv, bench.md and bench.png (speedup over eager) into --out.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from se_fused import FusedSE, SEBlock  # noqa: E402
from se_fused.ops import cuda_kernels_available, extension_available  # noqa: E402
from se_fused.shapes import MODEL_SHAPES  # noqa: E402

QUICK_SHAPES = {"seresnet50": [0, 3], "efficientnet_b0": [1, 9], "mobilenetv3_large": [2], "regnety_1.6gf": [6]}
PASSES = ("forward", "forward+backward", "backward")
FLOOR_FACTOR = {"forward": 2, "backward": 3, "forward+backward": 5}
L2_ROTATION_BYTES = 256 * 1024 * 1024
CSV_FIELDS = ["device", "model", "shape", "batch", "dtype", "layout", "pass", "contender", "status", "median_ms",
              "p20_ms", "p80_ms", "speedup_vs_eager", "speedup_vs_best_compile", "floor_gbps", "copy_share",
              "launches", "peak_mem_mib", "eager_peak_mem_mib", "compile_s", "page_faults"]


# ----------------------------------------------------------------------------- contenders


def _timm_se(c, r, act, gate):
    import timm.layers

    act_layer = torch.nn.SiLU if act == "silu" else torch.nn.ReLU
    return timm.layers.SEModule(c, rd_channels=r, act_layer=act_layer, gate_layer=gate)


def _torchvision_se(c, r, act, gate):
    from torchvision.ops import SqueezeExcitation

    return SqueezeExcitation(c, r, activation=torch.nn.SiLU if act == "silu" else torch.nn.ReLU,
                             scale_activation=torch.nn.Hardsigmoid if gate == "hard_sigmoid" else torch.nn.Sigmoid)


def contenders(device: torch.device, compile_modes: list[str]):
    """[(name, factory or None, why unavailable)]; factory(c, r, act, gate, reference) -> module."""
    def eager(c, r, act, gate, ref):
        return ref

    def compiled(mode):
        def make(c, r, act, gate, ref):
            return torch.compile(ref, mode=None if mode == "default" else mode)
        return make

    def fused(backend):
        def make(c, r, act, gate, ref):
            block = FusedSE(c, rd_channels=r, act=act, gate=gate, backend=backend).to(ref.fc1.weight)
            block.load_state_dict(ref.state_dict())
            return block
        return make

    def third_party(build):
        def make(c, r, act, gate, ref):
            block = build(c, r, act, gate).to(ref.fc1.weight)
            block.load_state_dict(ref.state_dict())
            return block
        return make

    out = [("eager SEBlock", eager, "")]
    for mode in ("default", "max-autotune"):
        why = "" if mode in compile_modes else "not selected (--compile-modes)"
        out.append((f"torch.compile {mode}", None if why else compiled(mode), why))
    for label, module_name, build in (("timm SEModule", "timm", _timm_se),
                                      ("torchvision SqueezeExcitation", "torchvision", _torchvision_se)):
        try:
            __import__(module_name)
            out.append((label, third_party(build), ""))
        except ImportError:
            out.append((label, None, f"{module_name} not installed"))
    gpu = device.type == "cuda"
    for backend, ok, why in (("cuda", gpu and cuda_kernels_available(), "needs a GPU and the CUDA extension"),
                             ("triton", gpu, "GPU only (the CPU interpreter is no benchmark)"),
                             ("cpp", not gpu and extension_available(), "CPU only, needs the extension"),
                             ("torch", not gpu, "measured on CPU only")):
        out.append((f"FusedSE {backend}", fused(backend) if ok else None, "" if ok else why))
    return out


# ----------------------------------------------------------------------------- timing


def gpu_time_ms(fn) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds of triton.testing.do_bench."""
    import triton.testing

    return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))


def cpu_time_ms(runs: dict, rounds: int, calls: int, faults: dict | None = None) -> dict:
    """{key: (min of per-round medians, p20, p80)} in milliseconds; the runs interleave round by round,
    so drift on a shared machine reaches every contender alike. `faults`, when given, receives each
    key's minor page faults per timed call."""
    samples: dict = {key: [] for key in runs}
    medians: dict = {key: [] for key in runs}
    fault_counts = dict.fromkeys(runs, 0)
    for _ in range(rounds):
        for key, run in runs.items():
            round_samples = []
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(calls):
                start = time.perf_counter()
                run()
                round_samples.append((time.perf_counter() - start) * 1e3)
            fault_counts[key] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            samples[key] += round_samples
            medians[key].append(statistics.median(round_samples))
    if faults is not None:
        faults.update({key: count / (rounds * calls) for key, count in fault_counts.items()})
    out = {}
    for key in runs:
        q = statistics.quantiles(samples[key], n=10) if len(samples[key]) > 1 else samples[key] * 9
        out[key] = (min(medians[key]), q[1], q[7])
    return out


def time_ms(fn, device: torch.device, rounds: int = 5, calls: int = 10) -> tuple[float, float, float]:
    """(median, p20, p80) of one callable: do_bench on a GPU, the CPU protocol otherwise."""
    if device.type == "cuda":
        return gpu_time_ms(fn)
    for _ in range(3):
        fn()
    return cpu_time_ms({0: fn}, rounds, calls)[0]


MALLOC_CHOICES = ("reuse", "default")


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--malloc", choices=MALLOC_CHOICES, default="reuse",
                        help="CPU: 'reuse' makes glibc keep freed memory for reuse (module docstring of bench_se.py); "
                             "'default' leaves the allocator as it is")


def apply_malloc_option(choice: str, device: torch.device) -> str:
    """Applies --malloc on the CPU and says what the allocator does, for the run's header."""
    if device.type != "cpu":
        return ""
    if choice == "default":
        return "malloc as configured"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "malloc as configured (not glibc)"
    m_trim_threshold, m_mmap_threshold, limit = -1, -3, 2**30
    if not (libc.mallopt(m_mmap_threshold, limit) and libc.mallopt(m_trim_threshold, limit)):
        return "malloc as configured (mallopt refused)"
    return "glibc malloc keeps freed memory (mmap and trim thresholds 1 GiB)"


def copy_bandwidth(device: torch.device, rounds: int, calls: int) -> float:
    """Bytes read + written per second by a copy of a buffer larger than the caches."""
    src = torch.empty(rotation_bytes(device) // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_ms(lambda: dst.copy_(src), device, rounds, calls)[0] * 1e-3)


def rotation_bytes(device: torch.device) -> int:
    """Input bytes to rotate over so no input is still cached from its last use: twice the last-level cache."""
    if device.type == "cuda":
        return L2_ROTATION_BYTES
    try:
        llc = os.sysconf("SC_LEVEL3_CACHE_SIZE") or os.sysconf("SC_LEVEL2_CACHE_SIZE")
    except (ValueError, OSError):
        llc = 0
    return 2 * (llc if llc > 0 else 32 * 2**20)


def compiled_region_ran(fn) -> bool:
    """True when a call of `fn` runs code torch.compile produced (a "Torch-Compiled Region" in its profile)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name.startswith("Torch-Compiled Region") for e in prof.events())


def kernel_launches(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def peak_memory_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def pass_fn(block, pass_name, inputs, grad):
    """A callable running one pass on the next input buffer."""
    params = [p for p in block.parameters() if p.requires_grad]
    if pass_name == "forward":
        def run():
            with torch.no_grad():
                block(inputs.next()[0])
    elif pass_name == "forward+backward":
        def run():
            x = inputs.next()[0]
            torch.autograd.grad(block(x), [x] + params, grad)
    else:
        graphs = [(x, block(x)) for x, _ in inputs.items]  # forward once per buffer, graphs kept

        def run():
            x, y = graphs[inputs.next()[1]]
            torch.autograd.grad(y, [x] + params, grad, retain_graph=True)
    return run


class Rotation:
    """Input buffers handed out in turn, enough of them to exceed the last-level cache."""

    def __init__(self, make, nbytes: int, device: torch.device) -> None:
        count = max(2, math.ceil(rotation_bytes(device) / nbytes))
        self.items = [(make(), i) for i in range(min(count, 64))]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


# ----------------------------------------------------------------------------- run


def configurations(args):
    for model, (act, gate, shapes) in MODEL_SHAPES.items():
        if args.models and model not in args.models:
            continue
        picked = range(len(shapes)) if args.full else QUICK_SHAPES[model]
        for i in picked:
            for batch in args.batches:
                for dtype in args.dtypes:
                    for layout in args.layouts:
                        yield model, shapes[i], act, gate, batch, dtype, layout


def main() -> None:
    # The backward-alone pass reruns one graph (retain_graph=True), which donated buffers forbid.
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out", help="folder for bench.csv, bench.md, bench.png")
    parser.add_argument("--full", action="store_true", help="every shape of §5 (default: a quick subset)")
    parser.add_argument("--models", nargs="*", choices=list(MODEL_SHAPES))
    parser.add_argument("--batches", nargs="*", type=int)
    parser.add_argument("--dtypes", nargs="*", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--layouts", nargs="*", choices=["nchw", "channels_last"])
    parser.add_argument("--passes", nargs="*", choices=PASSES)
    parser.add_argument("--compile-modes", nargs="*", choices=["default", "max-autotune"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contenders", nargs="*", help="only contenders whose name contains one of these")
    parser.add_argument("--rounds", type=int, default=7, help="CPU: interleaved rounds per configuration")
    parser.add_argument("--calls", type=int, default=10, help="CPU: timed calls per contender and round")
    add_malloc_option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    malloc = apply_malloc_option(args.malloc, device)
    if gpu:
        default_batches, default_dtypes = ([1, 8, 128], ["float16", "bfloat16", "float32"]) if args.full else (
            [1, 128], ["float16"])
    else:
        default_batches, default_dtypes = [8], ["float32"]
    args.batches = args.batches or default_batches
    args.dtypes = [getattr(torch, d) for d in (args.dtypes or default_dtypes)]
    args.layouts = args.layouts or ["nchw", "channels_last"]
    args.passes = args.passes or list(PASSES)
    compile_modes = args.compile_modes if args.compile_modes is not None else (
        ["default", "max-autotune"] if gpu else ["default"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if gpu:
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; not a GPU result)"
    copy_bw = copy_bandwidth(device, args.rounds, args.calls)
    header = f"{card}; torch {torch.__version__}; copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)"
    if not gpu:
        header += f"; min over {args.rounds} interleaved rounds of the median of {args.calls} calls; {malloc}"
    print(header, flush=True)
    rows = []
    configs = list(configurations(args))
    try:
        from tqdm import tqdm

        configs = tqdm(configs, desc="shapes", file=sys.stderr)
    except ImportError:
        pass
    for model, (c, hw, r), act, gate, batch, dtype, layout in configs:
        rows += bench_config(device, copy_bw, compile_modes, args, model, c, hw, r, act, gate, batch, dtype, layout)
    write_outputs(out, rows, header)


def bench_config(device, copy_bw, compile_modes, args, model, c, hw, r, act, gate, batch, dtype, layout):
    torch._dynamo.reset()  # a fresh recompile budget: compiled contenders must really compile (module docstring)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    reference = SEBlock(c, rd_channels=r, act=act, gate=gate).to(device=device, dtype=dtype)
    nbytes = batch * c * hw * hw * dtype.itemsize
    inputs = Rotation(lambda: torch.randn(batch, c, hw, hw, device=device, dtype=dtype)
                      .to(memory_format=memory_format).requires_grad_(), nbytes, device)
    grad = torch.randn(batch, c, hw, hw, device=device, dtype=dtype).to(memory_format=memory_format)
    base = dict(device=device.type, model=model, shape=f"{c}x{hw}x{hw} r{r}", batch=batch,
                dtype=str(dtype).removeprefix("torch."), layout=layout)
    results, runs = [], {}
    for name, factory, why in contenders(device, compile_modes):
        if args.contenders and not any(part in name for part in args.contenders):
            continue
        if factory is None:
            results += [dict(base, **{"pass": p, "contender": name, "status": f"not available: {why}"})
                        for p in args.passes]
            continue
        block = factory(c, r, act, gate, reference)
        for pass_name in args.passes:
            row = dict(base, **{"pass": pass_name, "contender": name, "status": "ok"})
            results.append(row)
            try:
                start = time.perf_counter()
                run = pass_fn(block, pass_name, inputs, grad)
                run()  # compiles torch.compile contenders and Triton kernels outside the timing
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if name.startswith("torch.compile"):
                    row["compile_s"] = round(time.perf_counter() - start, 2)
                    # the backward pass reuses graphs its compiled forward built: probe that forward
                    probe = run if pass_name != "backward" else (lambda: block(inputs.items[0][0]))
                    if not compiled_region_ran(probe):
                        row["status"] = "not compiled: Dynamo ran it eagerly (no Torch-Compiled Region)"
                        continue
                runs[(name, pass_name)] = run
            except Exception as err:  # noqa: BLE001 - a contender that fails is reported, the run goes on
                row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    if device.type == "cuda":
        times = {key: gpu_time_ms(run) for key, run in runs.items()}
    else:
        faults = {}
        times = cpu_time_ms(runs, args.rounds, args.calls, faults)
    for row in results:
        key = (row["contender"], row["pass"])
        if key not in times:
            continue
        ms, p20, p80 = times[key]
        row.update(median_ms=ms, p20_ms=p20, p80_ms=p80)
        if device.type == "cpu":
            row["page_faults"] = round(faults[key])
        row["floor_gbps"] = FLOOR_FACTOR[row["pass"]] * nbytes / (ms * 1e-3) / 1e9
        row["copy_share"] = row["floor_gbps"] * 1e9 / copy_bw
        row["launches"] = kernel_launches(runs[key], device) or ""
        if row["pass"] == "forward+backward":
            row["peak_mem_mib"] = peak_memory_mib(runs[key], device) or ""
    for pass_name in args.passes:  # speedups within this configuration and pass
        same = [row for row in results if row["pass"] == pass_name and row.get("median_ms")]
        eager = next((row for row in same if row["contender"] == "eager SEBlock"), None)
        compiled = [row["median_ms"] for row in same if row["contender"].startswith("torch.compile")]
        for row in same:
            row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"] if eager else ""
            row["speedup_vs_best_compile"] = min(compiled) / row["median_ms"] if compiled else ""
            row["eager_peak_mem_mib"] = eager.get("peak_mem_mib", "") if eager else ""
    return results


def _fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else (value or "")


def write_outputs(out: Path, rows: list[dict], header: str) -> None:
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# SE microbenchmark\n\n{header}\n",
             "| model | shape | batch | dtype | layout | pass | contender | median ms (p20-p80) | vs eager | "
             "vs best compile | floor GB/s | share of copy | launches | peak MiB (eager) | page faults / call |",
             "| --- | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row["status"] != "ok":
            continue
        lines.append(
            f"| {row['model']} | {row['shape']} | {row['batch']} | {row['dtype']} | {row['layout']} | {row['pass']} | "
            f"{row['contender']} | {row['median_ms']:.4f} ({row['p20_ms']:.4f}-{row['p80_ms']:.4f}) | "
            f"{_fmt(row.get('speedup_vs_eager'), '.2f')}x | {_fmt(row.get('speedup_vs_best_compile'), '.2f')} | "
            f"{row['floor_gbps']:.0f} | {_fmt(row.get('copy_share'), '.0%')} | {row.get('launches', '')} | "
            f"{_fmt(row.get('peak_mem_mib'), '.1f')} ({_fmt(row.get('eager_peak_mem_mib'), '.1f')}) | "
            f"{row.get('page_faults', '')} |")
    missing = sorted({(row["contender"], row["status"]) for row in rows if row["status"] != "ok"})
    if missing:
        lines += ["", "Not measured:"] + [f"- {name}: {status}" for name, status in missing]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    plot(out / "bench.png", rows, header)
    print("\n".join(lines))


def plot(path: Path, rows: list[dict], header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["status"] == "ok" and row.get("speedup_vs_eager")]
    passes = [p for p in PASSES if any(row["pass"] == p for row in ok)]
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(dict.fromkeys(row["contender"] for row in ok))}
    fig, axes = plt.subplots(len(passes), 1, figsize=(12, 3.5 * max(1, len(passes))), squeeze=False)
    for ax, pass_name in zip(axes[:, 0], passes):
        these = [row for row in ok if row["pass"] == pass_name]
        labels = list(dict.fromkeys(f"{r['model']} {r['shape']} b{r['batch']} {r['dtype']} {r['layout']}"
                                    for r in these))
        for contender in dict.fromkeys(row["contender"] for row in these):
            points = {f"{r['model']} {r['shape']} b{r['batch']} {r['dtype']} {r['layout']}": r["speedup_vs_eager"]
                      for r in these if r["contender"] == contender}
            ax.plot(range(len(labels)), [points.get(label, float("nan")) for label in labels], marker="o",
                    label=contender, color=colors[contender])
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(pass_name)
        ax.set_ylabel("speedup over eager")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(header, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
