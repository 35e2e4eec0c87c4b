"""Compile every Triton kernel variant for real GPUs (sm_80, sm_90) on a machine without one.

Run as a script with TRITON_INTERPRET unset (the interpreter never compiles). It
catches what the CPU interpreter cannot: code that does not lower to the GPU. It
prints each variant's register, local-memory (spill) and shared-memory use, read
from the cubin with the cuobjdump that ships with Triton, and which instructions the
MLP's matrix products became in the PTX (mma / wgmma: tensor cores; fma only: CUDA cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from se_fused.triton_kernels.backward import se_backward_kernel
from se_fused.triton_kernels.forward import se_forward_kernel
from se_fused.triton_kernels.schedule import DOT_MIN, MAIN_KERNEL_WARPS, WGRAD_SAMPLES

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


def compile_variant(kernel, arch: int, x: str, param: str, constexprs: dict, unit_strides: tuple[str, ...]):
    compute = "float64" if x == "float64" else "float32"
    ptrs = pointer_types(kernel.fn.__name__, x, param, compute)
    constants = dict(constexprs, **{name: 1 for name in unit_strides if name in kernel.arg_names})
    signature = {name: ("constexpr" if name in constants else ptrs.get(name, "i32")) for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": MAIN_KERNEL_WARPS})


def resource_usage(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    lines = [line.strip() for line in out.stdout.splitlines() if "REG:" in line]
    return lines[0] if lines else f"(cuobjdump: {out.stderr.strip() or 'no resource line'})"


def matrix_instructions(compiled) -> str:
    ptx = compiled.asm["ptx"]
    kinds = [kind for kind in ("wgmma", "mma.sync") if kind in ptx]
    return "+".join(kinds) if kinds else "fma"


def variants():
    mlp = dict(ACT=1, GATE=0, BLOCK_M=DOT_MIN, MLP_BLOCK_R=32, MLP_BLOCK_C=64)
    nchw = ("stride_xp", "stride_yp", "stride_gp", "stride_dp", "stride_rp", "stride_up", "stride_tp")
    channels_last = ("stride_xc", "stride_yc", "stride_gc", "stride_dc", "stride_rc", "stride_uc", "stride_tc")
    for arch in (80, 90):
        for x, param in (("float16", "float16"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"),
                         ("float32", "float32"), ("float64", "float64")):
            common = dict(mlp, HAS_B1=True, HAS_B2=True, HALF_WEIGHTS=param in ("float16", "bfloat16"), HALF_AS_FP32=False)
            for layout, unit, blocks in (("nchw", nchw, dict(BLOCK_C=16, BLOCK_P=256)),
                                         ("channels_last", channels_last, dict(BLOCK_C=128, BLOCK_P=32))):
                fwd = dict(common, HAS_RES=False, OUT=0, **blocks)
                bwd = dict(common, WRITE_DX=True, OUT=0, HAS_RES=False, WRITE_DRES=False, WGRAD_BLOCK=32,
                           WGRAD_SAMPLES=WGRAD_SAMPLES, **blocks)
                yield se_forward_kernel, arch, x, param, fwd, unit, layout
                yield se_backward_kernel, arch, x, param, bwd, unit, layout
                if x == param and x in ("bfloat16", "float32"):  # the residual tail (ReLU and SiLU)
                    yield se_forward_kernel, arch, x, param, dict(fwd, HAS_RES=True, OUT=1), unit, layout + " tail"
                    for out, has_res in ((1, False), (2, True)):
                        tail = dict(bwd, OUT=out, HAS_RES=has_res, WRITE_DRES=True)
                        yield se_backward_kernel, arch, x, param, tail, unit, layout + f" tail{out}"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print("compile_for_gpu.py needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    count = 0
    for kernel, arch, x, param, constexprs, unit, layout in variants():
        compiled = compile_variant(kernel, arch, x, param, constexprs, unit)
        print(f"sm_{arch} {kernel.fn.__name__:18s} x={x:9s} params={param:8s} {layout:19s} "
              f"mlp={matrix_instructions(compiled):8s} {resource_usage(compiled)}")
        count += 1
    print(f"compiled {count} kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
