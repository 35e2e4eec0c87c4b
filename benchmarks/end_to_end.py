"""End to end: timm models before and after swapping their SE modules for FusedSE.

    python benchmarks/end_to_end.py --out bench_out            # full on a GPU
    python benchmarks/end_to_end.py --quick --out bench_out    # small images and batches (CPU smoke run)

Builds timm seresnet50, efficientnet_b0 and mobilenetv3_large_100 with random weights (no
downloads), converts a copy with se_fused.convert_se_modules, and reports images per second
for inference (batch 1 and 64) and a training step (batch 64, SGD; on a GPU with float16
autocast), all channels_last, before and after, plus the largest output difference relative to
the largest output (BatchNorm weights randomised first, so every SE module shapes the output).
Writes e2e.md and e2e.csv into --out.
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
from bench_se import time_ms  # noqa: E402  (this folder is on sys.path when run as a script)

MODELS = ["seresnet50", "efficientnet_b0", "mobilenetv3_large_100"]


def randomise_norms(model: torch.nn.Module) -> None:
    """timm zero-initialises the last norm of residual blocks, which would hide the SE path from the
    output comparison; give every BatchNorm random but tame affine weights and statistics instead."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for t, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.1, 0.1), (m.running_mean, -0.1, 0.1),
                                     (m.running_var, 0.5, 1.5)):
                    t.copy_(torch.empty(t.shape).uniform_(low, high, generator=gen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--quick", action="store_true", help="64x64 images, batches 1 and 2, few repeats")
    parser.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    args = parser.parse_args()
    import timm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    size, batches, train_batch, repeats = (64, [1, 2], 2, 3) if args.quick else (224, [1, 64], 64, 20)
    amp = torch.autocast("cuda", dtype=torch.float16) if gpu else torch.autocast("cpu", enabled=False)
    card = torch.cuda.get_device_name(device) if gpu else "CPU (not a GPU result)"
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        before = timm.create_model(name, pretrained=False).to(device).to(memory_format=torch.channels_last)
        randomise_norms(before)
        after = copy.deepcopy(before)
        converted = se_fused.convert_se_modules(after)
        x = torch.randn(2, 3, size, size, device=device).to(memory_format=torch.channels_last)
        with torch.no_grad():
            reference = before.eval()(x)
            max_diff = ((after.eval()(x) - reference).abs().max() / reference.abs().max()).item()
        for label, model in (("before", before), ("after", after)):
            for batch in batches:
                xb = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)

                def infer(model=model, xb=xb):
                    with torch.no_grad(), amp:
                        model.eval()(xb)

                rows.append(dict(model=name, variant=label, task=f"inference b{batch}",
                                 images_per_s=batch / (time_ms(infer, device, calls=repeats)[0] / 1e3)))
            xt = torch.randn(train_batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
            target = torch.randint(0, 1000, (train_batch,), device=device)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
            scaler = torch.amp.GradScaler(enabled=gpu)

            def train_step(model=model, xt=xt, target=target, optimizer=optimizer, scaler=scaler):
                model.train()
                optimizer.zero_grad(set_to_none=True)
                with amp:
                    loss = torch.nn.functional.cross_entropy(model(xt), target)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

            rows.append(dict(model=name, variant=label, task=f"train step b{train_batch}",
                             images_per_s=train_batch / (time_ms(train_step, device, calls=repeats)[0] / 1e3)))
        for row in rows:
            if row["model"] == name:
                row.update(se_modules_converted=converted, max_relative_output_diff=max_diff)
    write(Path(args.out), rows, f"{card}; torch {torch.__version__}; images {size}x{size}")


def write(out: Path, rows: list[dict], header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "e2e.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# End to end\n\n{header}\n", "| model | task | before img/s | after img/s | speedup | SE modules | "
             "max output diff / max output |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row["variant"] != "before":
            continue
        after = next(r for r in rows if r["model"] == row["model"] and r["task"] == row["task"]
                     and r["variant"] == "after")
        lines.append(f"| {row['model']} | {row['task']} | {row['images_per_s']:.1f} | {after['images_per_s']:.1f} | "
                     f"{after['images_per_s'] / row['images_per_s']:.3f}x | {row['se_modules_converted']} | "
                     f"{row['max_relative_output_diff']:.2e} |")
    (out / "e2e.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
