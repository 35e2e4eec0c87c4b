"""End to end: timm models with their SE modules as they are and swapped for FusedSE, eager and compiled.

    python benchmarks/end_to_end.py --out bench_out                  # the available device, every default
    python benchmarks/end_to_end.py --quick --out bench_out          # small images and batches (CI smoke run)
    python benchmarks/end_to_end.py --device cpu --models seresnet50 efficientnet_b0 --batches 1 8 \
        --layouts channels_last nchw --no-train --out bench_cpu       # the CPU inference table

Builds each timm model with random weights (no downloads; BatchNorm weights randomised so every SE
module shapes the output) and times these variants of it in one process:

    eager            the model as timm builds it
    FusedSE          convert_se_modules(model): every SE module swapped for FusedSE
    FusedSE+tail     convert_se_modules(model, fuse_residual=True): SE-ResNet(X) blocks compute
                     relu(se(x) + shortcut) in the SE's pass (models that have such blocks)
    compile          torch.compile(model)
    compile+FusedSE  torch.compile of the converted model

on inference (batch per --batches) and a training step (SGD; float16 autocast on a GPU), per layout.
Compiled variants are checked to have compiled (a "Torch-Compiled Region" in a profiled call);
one that ran eagerly is reported as not compiled, with no time. Timing as in bench_se.py:
do_bench medians on a GPU, interleaved rounds (min of per-round medians) on the CPU. Also reports
the largest output difference FusedSE makes, relative to the largest output. Writes e2e.md and
e2e.csv into --out.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import se_fused  # noqa: E402
from se_fused.debug import randomize_batch_norms  # noqa: E402
from bench_se import (add_malloc_option, apply_malloc_option, compiled_region_ran,  # noqa: E402  (on sys.path)
                      cpu_time_ms, gpu_time_ms)

MODELS = ["seresnet50", "efficientnet_b0", "mobilenetv3_large_100"]
OTHER_MODELS = ["seresnext50_32x4d"]
COMPILED_FROM = {"compile": "eager", "compile+FusedSE": "FusedSE"}


def build(name: str, device: torch.device, memory_format: torch.memory_format, size: int, compile_models: bool):
    """{variant: model} and how many SE modules were converted."""
    import timm

    torch.manual_seed(0)
    eager = timm.create_model(name, pretrained=False).to(device).to(memory_format=memory_format)
    randomize_batch_norms(eager, calibrate_with=torch.randn(2, 3, size, size, device=device))
    fused = copy.deepcopy(eager)
    converted = se_fused.convert_se_modules(fused)
    models = {"eager": eager, "FusedSE": fused}
    tail = copy.deepcopy(fused)
    if se_fused.convert.fuse_residual_tails(tail):
        models["FusedSE+tail"] = tail
    if compile_models:
        models["compile"] = torch.compile(eager)
        models["compile+FusedSE"] = torch.compile(fused)
    return models, converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--quick", action="store_true", help="64x64 images, batches 1 and 2, few repeats")
    parser.add_argument("--models", nargs="*", default=MODELS, choices=MODELS + OTHER_MODELS)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", nargs="*", type=int, help="inference batches (default: 1 and 64 on a GPU, 1 and 8 "
                                                                 "on the CPU)")
    parser.add_argument("--train-batch", type=int, help="training-step batch (default 64 on a GPU, 8 on the CPU)")
    parser.add_argument("--layouts", nargs="*", default=["channels_last"], choices=["channels_last", "nchw"])
    parser.add_argument("--size", type=int, help="image size (default 224, 64 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-train", action="store_true", help="inference only")
    parser.add_argument("--rounds", type=int, default=5, help="CPU: interleaved rounds")
    parser.add_argument("--calls", type=int, default=3, help="CPU: timed calls per variant and round")
    add_malloc_option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    malloc = apply_malloc_option(args.malloc, device)
    gpu = device.type == "cuda"
    size = args.size or (64 if args.quick else 224)
    batches = args.batches or ([1, 2] if args.quick else ([1, 64] if gpu else [1, 8]))
    train_batch = args.train_batch or (2 if args.quick else (64 if gpu else 8))
    amp = torch.autocast("cuda", dtype=torch.float16) if gpu else torch.autocast("cpu", enabled=False)
    if gpu:
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU ({torch.get_num_threads()} threads, C++ kernel build {se_fused.ops._C.cpu_kernel_isa()})" \
            if se_fused.ops.extension_available() else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    for name in args.models:
        for layout in args.layouts:
            memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            torch._dynamo.reset()
            models, converted = build(name, device, memory_format, size, not args.no_compile)
            x = torch.randn(2, 3, size, size, device=device).to(memory_format=memory_format)
            with torch.no_grad():
                reference = models["eager"].eval()(x)
                diffs = {variant: ((models[variant].eval()(x) - reference).abs().max() / reference.abs().max()).item()
                         for variant in models if not variant.startswith("compile")}
            runs, tasks = {}, {}
            for batch in batches:
                xb = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
                tasks[f"inference b{batch}"] = batch
                for variant, model in models.items():
                    def infer(model=model, xb=xb):
                        with torch.no_grad(), amp:
                            model.eval()(xb)

                    runs[(variant, f"inference b{batch}")] = infer
            if not args.no_train:
                xt = torch.randn(train_batch, 3, size, size, device=device).to(memory_format=memory_format)
                target = torch.randint(0, 1000, (train_batch,), device=device)
                tasks[f"train step b{train_batch}"] = train_batch
                for variant, model in models.items():
                    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
                    scaler = torch.amp.GradScaler(enabled=gpu)

                    def train_step(model=model, optimizer=optimizer, scaler=scaler):
                        model.train()
                        optimizer.zero_grad(set_to_none=True)
                        with amp:
                            loss = torch.nn.functional.cross_entropy(model(xt), target)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()

                    runs[(variant, f"train step b{train_batch}")] = train_step
            status = {}
            for key, run in list(runs.items()):
                run()  # compiles and warms up
                if key[0].startswith("compile") and not compiled_region_ran(run):
                    status[key] = "not compiled: Dynamo ran it eagerly"
                    del runs[key]
            if gpu:
                times = {key: gpu_time_ms(run) for key, run in runs.items()}
            else:
                times = cpu_time_ms(runs, args.rounds, args.calls)
            for task, batch in tasks.items():
                eager_ms = times.get(("eager", task), (None,))[0]
                compile_ms = times.get(("compile", task), (None,))[0]
                for variant in models:
                    key = (variant, task)
                    row = dict(model=name, layout=layout, task=task, variant=variant, status=status.get(key, "ok"),
                               se_modules_converted=converted,
                               max_relative_output_diff=diffs[COMPILED_FROM.get(variant, variant)])
                    if key in times:
                        ms = times[key][0]
                        row.update(ms=ms, images_per_s=batch / (ms / 1e3),
                                   speedup_vs_eager=eager_ms / ms if eager_ms else "",
                                   speedup_vs_compile=compile_ms / ms if compile_ms else "")
                    rows.append(row)
    write(Path(args.out), rows, f"{card}; torch {torch.__version__}; images {size}x{size}{'; ' + malloc if malloc else ''}")


def _fmt(value, spec):
    """A speedup as "1.234x"; empty where there is none (no compiled variant)."""
    return format(value, spec) + "x" if isinstance(value, (int, float)) else (value or "")


def write(out: Path, rows: list[dict], header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["model", "layout", "task", "variant", "status", "ms", "images_per_s", "speedup_vs_eager",
              "speedup_vs_compile", "se_modules_converted", "max_relative_output_diff"]
    with open(out / "e2e.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# End to end\n\n{header}\n",
             "| model | layout | task | variant | ms | images/s | vs eager | vs compile | SE modules | "
             "max output diff / max output |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['layout']} | {row['task']} | {row['variant']} | "
                         f"{row['status']} | | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['layout']} | {row['task']} | {row['variant']} | {row['ms']:.2f} | "
                     f"{row['images_per_s']:.1f} | {_fmt(row['speedup_vs_eager'], '.3f')} | "
                     f"{_fmt(row['speedup_vs_compile'], '.3f')} | {row['se_modules_converted']} | "
                     f"{row['max_relative_output_diff']:.2e} |")
    (out / "e2e.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
