"""Compile every Triton kernel variant for real GPUs (sm_80, sm_90) on a machine without one.

Run as a script with TRITON_INTERPRET unset (the interpreter never compiles). It
catches what the CPU interpreter cannot: code that does not lower to the GPU. For each
variant it prints what sets a memory-bound kernel's speed, read from the cubin (with the
cuobjdump that ships with Triton) and the PTX:

* registers, spills (STACK/LOCAL), shared memory, and the programs an SM holds with them;
* which instructions the MLP's matrix products became (mma / wgmma: tensor cores; fma only: CUDA cores);
* the global loads by width (ld128 are the 16-byte loads that keep bytes in flight).

Integer arguments are compiled as Triton's JIT specialises them: ``odd`` without the
divisible-by-16 hint (7x7 maps in NCHW, 72 channels in channels_last: rows start anywhere),
``aligned`` with it (56x56 maps, 256 channels). The base variants use each regime's first
launch configuration; the tuner's candidates (docs/DESIGN.md §3.1) follow for sm_90 bfloat16,
small-map ones odd, large-map ones aligned: those with their own tiles always, those that differ
only in launch options (stages, register cap) with ``--all-candidates`` (CI's time is short).

    python tests/compile_for_gpu.py [--all-candidates]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from se_fused.triton_kernels.backward import se_backward_kernel
from se_fused.triton_kernels.forward import se_forward_kernel
from se_fused.triton_kernels.schedule import (
    DEFAULT_CONFIG,
    DOT_MIN,
    LARGE_MAP_CONFIGS,
    MAX_WARPS_PER_SM,
    REGISTERS_PER_SM,
    SMALL_MAP_CONFIGS,
    WGRAD_SAMPLES,
)

TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def pointer_types(kernel_name: str, x: str, param: str, compute: str) -> dict[str, str]:
    roles = {
        "se_forward_kernel": ((x, "x res y"), (param, "w1 b1 w2 b2"), (compute, "z a e partial")),
        "se_backward_kernel": ((x, "g x dx u res dres"), (param, "w1 w2 dw1 db1 dw2 db2"),
                               (compute, "z a e de da dzp partial")),
    }[kernel_name]
    types = {"ticket_ptr": "*i32", "counter_ptr": "*i32", "batch_counter_ptr": "*i32"}
    for dtype, names in roles:
        types.update({f"{name}_ptr": f"*{TYPES[dtype]}" for name in names.split()})
    return types


def compile_variant(kernel, arch: int, x: str, param: str, constexprs: dict, unit_strides: tuple[str, ...],
                    config=DEFAULT_CONFIG, aligned: bool = False):
    compute = "float64" if x == "float64" else "float32"
    ptrs = pointer_types(kernel.fn.__name__, x, param, compute)
    constants = dict(constexprs, **{name: 1 for name in unit_strides if name in kernel.arg_names})
    signature = {name: ("constexpr" if name in constants else ptrs.get(name, "i32")) for name in kernel.arg_names}
    # the JIT's specialisation: tensors are 16-byte aligned; integers divisible by 16 say so (N never: it
    # is left unspecialised so every batch size shares one compile)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*") or (aligned and signature[name] == "i32" and name != "N")}
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                          options=config.launch_options())


def programs_per_sm(registers: int, num_warps: int) -> int:
    """Programs an SM holds by registers (allocated in units of 8 a thread) and warps."""
    return min(REGISTERS_PER_SM // (-(-registers // 8) * 8 * 32 * num_warps), MAX_WARPS_PER_SM // num_warps)


def global_loads(compiled) -> str:
    """Global loads in the PTX by width in bits (ld128 = 16-byte vectors)."""
    widths: dict[int, int] = {}
    for vec, bits in re.findall(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", compiled.asm["ptx"]):
        width = int(vec or 1) * int(bits)
        widths[width] = widths.get(width, 0) + 1
    return " ".join(f"ld{w}:{widths[w]}" for w in sorted(widths, reverse=True))


def resource_usage(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    lines = [line.strip() for line in out.stdout.splitlines() if "REG:" in line]
    if not lines:
        return f"(cuobjdump: {out.stderr.strip() or 'no resource line'})"
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", lines[0]))
    per_sm = programs_per_sm(int(fields["REG"]), compiled.metadata.num_warps)
    return " ".join(f"{k}:{v}" for k, v in fields.items()) + f" programs/SM:{per_sm}"


def matrix_instructions(compiled) -> str:
    ptx = compiled.asm["ptx"]
    kinds = [kind for kind in ("wgmma", "mma.sync") if kind in ptx]
    return "+".join(kinds) if kinds else "fma"


def _blocks(config, channels_last: bool) -> dict:
    if channels_last:
        return dict(BLOCK_C=128, BLOCK_P=config.tile_elements // 128)
    return dict(BLOCK_C=config.tile_elements // 256, BLOCK_P=256)


def _kernels(arch, x, param, config, layout, aligned, tails=False, row_align=1):
    """The forward and backward of one dtype pair and layout (with the residual tail's variants)."""
    nchw = ("stride_xp", "stride_yp", "stride_gp", "stride_dp", "stride_rp", "stride_up", "stride_tp")
    channels_last = ("stride_xc", "stride_yc", "stride_gc", "stride_dc", "stride_rc", "stride_uc", "stride_tc")
    weights = ("stride_w1c", "stride_w2r", "stride_dw1c", "stride_dw2r")  # contiguous (R, C) and (C, R)
    is_channels_last = layout.startswith("channels_last")
    unit = (channels_last if is_channels_last else nchw) + weights
    common = dict(ACT=1, GATE=0, BLOCK_M=DOT_MIN, MLP_BLOCK_R=config.mlp_block_r, MLP_BLOCK_C=config.mlp_block_c,
                  HAS_B1=True, HAS_B2=True, HALF_WEIGHTS=param in ("float16", "bfloat16"), HALF_AS_FP32=False,
                  ALIGN_C=1 if is_channels_last else row_align, ALIGN_P=row_align if is_channels_last else 1,
                  **_blocks(config, is_channels_last))
    fwd = dict(common, HAS_RES=False, OUT=0)
    bwd = dict(common, WRITE_DX=True, OUT=0, HAS_RES=False, WRITE_DRES=False, WGRAD_BLOCK=32,
               WGRAD_SAMPLES=WGRAD_SAMPLES)
    yield se_forward_kernel, arch, x, param, fwd, unit, layout, config, aligned
    yield se_backward_kernel, arch, x, param, bwd, unit, layout, config, aligned
    if tails:  # the residual tail (ReLU and SiLU)
        yield se_forward_kernel, arch, x, param, dict(fwd, HAS_RES=True, OUT=1), unit, layout + " tail", config, aligned
        for out, has_res in ((1, False), (2, True)):
            tail = dict(bwd, OUT=out, HAS_RES=has_res, WRITE_DRES=True)
            yield se_backward_kernel, arch, x, param, tail, unit, layout + f" tail{out}", config, aligned


def _changes_code(config) -> bool:
    """A candidate with other tiles than the default's is another kernel; one that differs only in
    launch options (stages, register cap) is the same code compiled otherwise."""
    return (config.tile_elements, config.mlp_block_r, config.mlp_block_c) != (
        DEFAULT_CONFIG.tile_elements, DEFAULT_CONFIG.mlp_block_r, DEFAULT_CONFIG.mlp_block_c)


def variants(all_candidates: bool = False):
    """Every kernel variant for sm_80 and sm_90 (the residual tail's for sm_90), the tuner's candidates whose tiles differ from the
    default's for sm_90 bfloat16 (all of them with ``all_candidates``), and rows on 4/8-element starts."""
    for arch in (80, 90):
        for x, param in (("float16", "float16"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"),
                         ("float32", "float32"), ("float64", "float64")):
            for layout in ("nchw", "channels_last"):
                # the tails' extra code is elementwise: sm_90 only (CI's time is short)
                tails = arch == 90 and x == param and x in ("bfloat16", "float32")
                yield from _kernels(arch, x, param, DEFAULT_CONFIG, layout, False, tails)
    # what the tuner chooses from, for the GPU's training dtype: small maps as odd shapes compile
    # (the default is among the base variants), large maps as aligned ones
    for config, aligned in [(c, False) for c in SMALL_MAP_CONFIGS[1:]] + [(c, True) for c in LARGE_MAP_CONFIGS]:
        if all_candidates or _changes_code(config) or config == DEFAULT_CONFIG:
            for layout in ("nchw", "channels_last"):
                yield from _kernels(90, "bfloat16", "bfloat16", config, layout, aligned)
    # odd rows that start on a multiple of 4 (14x14 NCHW) or 8 elements (72 channels): aligned_view's hint
    for layout, row_align in (("nchw", 4), ("channels_last", 8)):
        yield from _kernels(90, "bfloat16", "bfloat16", DEFAULT_CONFIG, f"{layout} rows%{row_align}", False,
                            row_align=row_align)


def config_name(config) -> str:
    cap = f"/{config.maxnreg}reg" if config.maxnreg else ""
    return (f"{config.tile_elements}x{config.num_warps}w{cap} {config.num_stages}st "
            f"mlp{config.mlp_block_r}/{config.mlp_block_c}")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("compile_for_gpu.py needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    count = 0
    for kernel, arch, x, param, constexprs, unit, layout, config, aligned in variants("--all-candidates" in sys.argv):
        compiled = compile_variant(kernel, arch, x, param, constexprs, unit, config, aligned)
        print(f"sm_{arch} {kernel.fn.__name__:18s} x={x:9s} params={param:8s} {layout:19s} "
              f"{config_name(config):30s} {'aligned' if aligned else 'odd':7s} "
              f"mlp={matrix_instructions(compiled):8s} {resource_usage(compiled)} {global_loads(compiled)}")
        count += 1
    print(f"compiled {count} kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
