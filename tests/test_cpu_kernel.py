"""The C++ CPU kernel: built once per instruction set (csrc/cpu/se_cpu_isa_*.cpp) and picked at run time as
ATen does, every build must agree with the float64 oracle whichever this CPU would pick; and its results do
not depend on the number of threads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import se_fused
from se_fused.ops import extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="needs the C++ kernel (CI builds it)")

CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
import se_fused
from se_reference import Case, check_against_reference
print("ISA", se_fused.ops._C.cpu_kernel_isa())
# channels_last paths by channel count against the step width (16 floats for AVX2, 32 for AVX-512):
# positions packed into a step (C = 3, 4, 8), sums in registers (24, 33), sums through memory (72, 1152)
cases = [Case(3, 40, 9, 11, 6, "silu", "hard_sigmoid"), Case(2, 72, 7, 7, 24), Case(5, 1, 3, 1, 2, bias=False),
         Case(2, 1152, 1, 1, 48, "silu"), Case(1, 33, 17, 5, 4, "relu", "hard_sigmoid"), Case(2, 3, 9, 7, 2),
         Case(3, 4, 13, 5, 2, "silu"), Case(2, 8, 5, 3, 4), Case(2, 24, 6, 5, 6)]
with se_fused.poison_outputs():
    for case in cases:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for channels_last in (False, True):
                check_against_reference(case, "cpp", torch.device("cpu"), dtype, channels_last=channels_last)
    for case in cases[5:]:  # the residual tail through the packed and register paths
        check_against_reference(case, "cpp", torch.device("cpu"), torch.float32, channels_last=True,
                                out_act="silu", residual=True)
print("OK")
"""


def _supported(capability: str) -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    needs = {"default": [], "avx2": ["avx2", "fma"], "avx512": ["avx512f", "avx512bw", "avx512vl", "avx512dq"]}
    return all(f" {flag}" in flags for flag in needs[capability])


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_instruction_set_build_matches_the_oracle(capability):
    if not _supported(capability):
        pytest.skip(f"this CPU has no {capability}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    code = CHECK.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"ISA {capability.upper()}" in out.stdout and "OK" in out.stdout, out.stdout


def test_isa_is_reported():
    from se_fused.ops import _C

    assert _C.cpu_kernel_isa() in ("DEFAULT", "AVX2", "AVX512")
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert _C.cpu_kernel_isa() == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 256, 20, 20, 16), (5, 2048, 7, 7, 128), (3, 72, 1, 1, 24)], ids=str)
def test_same_bits_for_any_number_of_threads(shape, channels_last):
    """Every sum runs in an order that does not depend on the thread count (docs/DESIGN.md §10)."""
    n, c, h, w, r = shape
    torch.manual_seed(0)
    block = se_fused.FusedSE(c, rd_channels=r, act="silu", backend="cpp")
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            xr = x.clone().requires_grad_()
            y = block(xr)
            grads = torch.autograd.grad(y, [xr, *block.parameters()], g)
            results.append([y, *grads])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("c", [4, 3])
def test_packed_channels_last_above_the_streaming_size(c):
    """Few channels, channels_last, an input past the 8 MB where outputs are written with streaming stores:
    packed steps, streamed (4 channels divide the step, runs start aligned here) or overlapping with normal
    stores (3 do not)."""
    from se_reference import Case, check_against_reference

    check_against_reference(Case(2, c, 512, 700, 2, "silu"), "cpp", torch.device("cpu"), torch.float32,
                            channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", [(3, 1024, 28), (3, 1004, 27)], ids=["rows_aligned", "rows_unaligned"])
def test_above_the_streaming_size(case, channels_last):
    """Past the 8 MB where outputs are written with streaming stores: rows of dst (784 or 729 positions;
    1024 or 1004 channels_last channels) that start on the streaming alignment are streamed, the others
    stored normally."""
    from se_reference import Case, check_against_reference

    n, c, hw = case
    with se_fused.poison_outputs():  # an element the kernel skips stays NaN
        check_against_reference(Case(n, c, hw, hw, 16), "cpp", torch.device("cpu"), torch.float32,
                                channels_last=channels_last)
