"""What SE costs, as the SENet paper measured it (§4, §6.3), with eager SE modules and with FusedSE.

    python benchmarks/senet_costs.py --out bench_out                      # GPU: batch 64, bf16 autocast, channels_last
    python benchmarks/senet_costs.py --device cpu --out bench_cpu         # CPU: inference at batch 1 (C++ kernel)
    python benchmarks/senet_costs.py --quick --no-ratios --out bench_out  # CI smoke run: 75x75 images, 1 model

For each SENet and its base network without SE (SE-ResNet-50 / ResNet-50, SE-ResNeXt-50 / ResNeXt-50,
SE-ResNet-101 / ResNet-101, SE-Inception-v3 / Inception-v3, SE-Inception-ResNet-v2 / Inception-ResNet-v2;
random weights, no downloads) it reports parameters (and, for the ResNet family, the paper's formula
(2/r)·Σ_s N_s·C_s² for the SE weights), multiply-adds (what the paper calls FLOPs), and the time of a
training step (SGD) and of inference for three variants timed in one process, interleaved:

    base        the network without SE
    SE eager    the SENet with its SE modules as built (timm's SEModule; se_fused.SEBlock for the
                Inception models of se_fused.models)
    SE fused    the same network, same weights, converted to FusedSE (convert_se_modules)

and the SE overhead, time(SE variant) / time(base) - 1, beside the paper's: +10% per training step
(SE-ResNet-50 209 ms vs ResNet-50 190 ms, 8 Titan X, batch 256) and +1.8% CPU inference (167 vs 164 ms,
one 224x224 image). The reduction-ratio study (§6.3) repeats SE-ResNet-50 for r in 2, 4, 8, 16, 32.

Timing as in bench_se.py: do_bench medians on a GPU; on the CPU, interleaved rounds and the minimum
of per-round medians; each SENet is timed beside its base network in the same rounds. Images are
224x224 (299x299 for the Inception models). Also reports each model's largest output error against
float64 math (eager SE and fused; deep random networks amplify float32 rounding alike in both).
Writes senet.md, senet.csv and senet.png into --out.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import se_fused  # noqa: E402
from bench_se import add_malloc_option, apply_malloc_option, cpu_time_ms, gpu_time_ms  # noqa: E402  (on sys.path)
from se_fused.debug import randomize_batch_norms  # noqa: E402
from se_fused.models import se_inception_resnet_v2, se_inception_v3  # noqa: E402

VARIANTS = ["base", "SE eager", "SE fused"]
RATIOS = [2, 4, 8, 16, 32]
# ResNet-50/101 stages as (blocks N_s, output channels C_s), for the paper's parameter formula.
STAGES = {
    "seresnet50": ((3, 256), (4, 512), (6, 1024), (3, 2048)),
    "seresnext50_32x4d": ((3, 256), (4, 512), (6, 1024), (3, 2048)),
    "seresnet101": ((3, 256), (4, 512), (23, 1024), (3, 2048)),
}
PAPER = {  # SENet paper §4: SE-ResNet-50 against ResNet-50
    "params_added_M": 2.5, "train_overhead": 209 / 190 - 1, "cpu_inference_overhead": 167 / 164 - 1,
}


def _timm(name: str, **kwargs) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def _timm_se(name: str, reduction: int) -> torch.nn.Module:
    from timm.layers import SEModule

    return _timm(name, block_args=dict(attn_layer=partial(SEModule, rd_ratio=1 / reduction)))


def _inception_v3() -> torch.nn.Module:
    from torchvision.models import inception_v3

    return inception_v3(weights=None, aux_logits=False, init_weights=True)


# name: (base name, base builder, SENet builder taking r, image size)
NETWORKS = {
    "seresnet50": ("resnet50", partial(_timm, "resnet50"), partial(_timm_se, "seresnet50"), 224),
    "seresnext50_32x4d": ("resnext50_32x4d", partial(_timm, "resnext50_32x4d"),
                          partial(_timm_se, "seresnext50_32x4d"), 224),
    "seresnet101": ("resnet101", partial(_timm, "resnet101"), partial(_timm_se, "seresnet101"), 224),
    "se_inception_v3": ("inception_v3", _inception_v3, lambda r: se_inception_v3(reduction=r, fused=False), 299),
    "se_inception_resnet_v2": ("inception_resnet_v2", partial(_timm, "inception_resnet_v2"),
                               lambda r: se_inception_resnet_v2(reduction=r, fused=False), 299),
}


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def multiply_adds(model: torch.nn.Module, size: int) -> float:
    """Multiply-adds of one image's inference (the paper's "GFLOPs"), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 2


def paper_formula(name: str, reduction: int) -> int | str:
    """(2/r)·Σ_s N_s·C_s²: the SE weights the paper counts (biases excluded)."""
    return sum(2 * n * c * c // reduction for n, c in STAGES[name]) if name in STAGES else ""


def main() -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", choices=list(NETWORKS), help="default: all (--quick: seresnet50)")
    parser.add_argument("--quick", action="store_true", help="75x75 images, batch 2, one round")
    parser.add_argument("--batch", type=int, help="default 64 on a GPU, 1 on the CPU (the paper's CPU measure)")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=None,
                        help="time training steps too (default: on a GPU, and with --quick)")
    parser.add_argument("--no-ratios", action="store_true", help="skip the reduction-ratio study")
    parser.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    parser.add_argument("--rounds", type=int, default=5, help="CPU: interleaved rounds")
    parser.add_argument("--calls", type=int, default=3, help="CPU: timed calls per variant and round")
    add_malloc_option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    malloc = apply_malloc_option(args.malloc, device)
    gpu = device.type == "cuda"
    models = args.models or (["seresnet50"] if args.quick else list(NETWORKS))
    batch = args.batch or (2 if args.quick else (64 if gpu else 1))
    train = args.train if args.train is not None else (gpu or args.quick)
    rounds, calls = (1, 1) if args.quick else (args.rounds, args.calls)
    memory_format = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    studies = [(name, 16) for name in models]
    if not args.no_ratios:
        studies += [("seresnet50", r) for r in RATIOS if r != 16 or "seresnet50" not in models]
    tasks = (["train step"] if train else []) + ["inference"]

    rows, bases = [], {}
    for name, r in tqdm(studies, desc="networks", file=sys.stdout):
        base_name, build_base, build_se, size = NETWORKS[name]
        size = 75 if args.quick else size
        torch.manual_seed(0)
        if base_name not in bases:
            bases[base_name] = build_base()
            randomize_batch_norms(bases[base_name], calibrate_with=torch.randn(2, 3, size, size))
        eager = build_se(r)
        randomize_batch_norms(eager, calibrate_with=torch.randn(2, 3, size, size))
        fused = copy.deepcopy(eager)
        converted = se_fused.convert_se_modules(fused)
        # the base is timed beside the SENet every time: the overhead compares times of one interleaved run
        variants = {"base": bases[base_name], "SE eager": eager, "SE fused": fused}
        for model in variants.values():
            model.to(device=device, memory_format=memory_format)
        eager_error, fused_error = output_errors(eager, fused, size, device, memory_format, amp)
        runs = _runs(variants, tasks, batch, size, device, memory_format, amp)
        for run in runs.values():
            run()  # warm-up (and the first-call work of every backend)
        if gpu:
            times = {key: gpu_time_ms(run)[0] for key, run in runs.items()}
        else:
            times = {key: value[0] for key, value in cpu_time_ms(runs, rounds, calls).items()}
        row = dict(network=name, reduction=r, base=base_name, image=size, batch=batch, se_modules=converted,
                   params_base=parameters(bases[base_name]), params_se=parameters(eager),
                   se_weights_paper_formula=paper_formula(name, r),
                   gmadds_base=multiply_adds(bases[base_name], size) / 1e9,
                   gmadds_se=multiply_adds(eager, size) / 1e9,
                   eager_output_error=eager_error, fused_output_error=fused_error)
        for task in tasks:
            base_ms = times[("base", task)]
            row[f"{task} base ms"] = base_ms
            for variant in ("SE eager", "SE fused"):
                row[f"{task} {variant} ms"] = times[(variant, task)]
                row[f"{task} {variant} overhead"] = times[(variant, task)] / base_ms - 1
        rows.append(row)
    card = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if gpu else "float32"
    write(Path(args.out), rows, tasks, f"{card}; torch {torch.__version__}; batch {batch}, {precision}, "
                                       f"{args.layout}; backend auto ({se_fused.functional.resolve_backend('auto', device.type)})"
                                       f"{'; ' + malloc if malloc else ''}")


def output_errors(eager, fused, size, device, memory_format, amp) -> tuple[float, float]:
    """Largest output error of the eager-SE and the fused model (as run: autocast on a GPU) against the
    eager-SE model in float64, relative to the largest output; measured before training changes weights."""
    x = torch.randn(2, 3, size, size, device=device).to(memory_format=memory_format)
    with torch.no_grad():
        exact = copy.deepcopy(eager).double().eval()(x.double())
        with amp:
            errors = [(model.eval()(x).double() - exact).abs().max() / exact.abs().max() for model in (eager, fused)]
    return errors[0].item(), errors[1].item()


def _runs(variants: dict, tasks: list, batch: int, size: int, device, memory_format, amp) -> dict:
    runs = {}
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
    target = torch.randint(0, 1000, (batch,), device=device)
    for variant, model in variants.items():
        if "train step" in tasks:
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

            def train_step(model=model, optimizer=optimizer):
                model.train()
                optimizer.zero_grad(set_to_none=True)
                with amp:
                    loss = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
                optimizer.step()

            runs[(variant, "train step")] = train_step

        def infer(model=model):
            with torch.no_grad(), amp:
                model.eval()(x)

        runs[(variant, "inference")] = infer
    return runs


def _pct(value) -> str:
    return f"{value * 100:+.1f}%"


def write(out: Path, rows: list[dict], tasks: list[str], header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "senet.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paper = (f"Paper (SE-ResNet-50 vs ResNet-50): +{PAPER['params_added_M']}M parameters, training step "
             f"{_pct(PAPER['train_overhead'])}, CPU inference {_pct(PAPER['cpu_inference_overhead'])}.")
    lines = [f"# What SE costs\n\n{header}\n\n{paper}\n",
             "| network | r | base | params base / SE (M) | SE weights, paper formula (M) | GMAdds base / SE | "
             + " | ".join(f"{t} base ms | {t} SE eager ms (overhead) | {t} SE fused ms (overhead)" for t in tasks)
             + " | output error eager / fused |",
             "| --- | ---: | --- | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---:" for _ in tasks) + " | ---: |"]
    for row in rows:
        formula = row["se_weights_paper_formula"]
        cells = [row["network"], str(row["reduction"]), row["base"],
                 f"{row['params_base'] / 1e6:.2f} / {row['params_se'] / 1e6:.2f}",
                 f"{formula / 1e6:.2f}" if formula != "" else "",
                 f"{row['gmadds_base']:.2f} / {row['gmadds_se']:.2f}"]
        for t in tasks:
            cells.append(f"{row[f'{t} base ms']:.2f}")
            for variant in ("SE eager", "SE fused"):
                cells.append(f"{row[f'{t} {variant} ms']:.2f} ({_pct(row[f'{t} {variant} overhead'])})")
        cells.append(f"{row['eager_output_error']:.1e} / {row['fused_output_error']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    (out / "senet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out / "senet.png", rows, tasks, header)


def plot(path: Path, rows: list[dict], tasks: list[str], header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    labels = [f"{r['network']} r{r['reduction']}" for r in rows]
    for ax, task in zip(axes[0], tasks):
        for k, variant in enumerate(("SE eager", "SE fused")):
            values = [100 * r[f"{task} {variant} overhead"] for r in rows]
            ax.barh([i + 0.4 * k for i in range(len(rows))], values, height=0.4, label=variant)
        paper = PAPER["train_overhead" if task == "train step" else "cpu_inference_overhead"]
        ax.axvline(100 * paper, color="gray", linestyle="--", label="paper, SE-ResNet-50")
        ax.set_yticks([i + 0.2 for i in range(len(rows))], labels, fontsize=7)
        ax.set_xlabel(f"{task}: SE overhead over the base network (%)")
        ax.legend(fontsize=7)
    fig.suptitle(header, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
