"""A small forward + backward through every fused backend on the GPU, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_case.py
Both schedules (per-sample and split) run, NCHW and channels_last, odd sizes; the first cases and
their order are those of the first GPU run's memcheck finding (shared/gpu/memcheck_sequence.py), the
last two complete every R mod 4 in float32 (the 16-byte shared read past R that finding came from).
On a machine without a GPU it runs the CPU backends instead (the check script's dry run).
"""

import itertools

import torch

import se_fused
from se_fused.debug import force_schedule
from se_fused.ops import cuda_kernels_available, extension_available

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
backends = ["triton", "cuda"] if device.type == "cuda" else []
if device.type == "cuda" and not cuda_kernels_available():
    raise SystemExit("sanitizer_case: se_fused's CUDA kernels are not built")
if device.type == "cpu" and extension_available():
    backends = ["cpp"]

CASES = ((3, 72, 7, 24, torch.float16), (2, 40, 9, 6, torch.float32), (2, 24, 13, 4, torch.bfloat16),
         (2, 130, 17, 9, torch.bfloat16), (2, 40, 9, 5, torch.float32), (2, 40, 9, 7, torch.float32))

torch.manual_seed(0)
for backend, split, memory_format in itertools.product(backends, (False, True),
                                                       (torch.contiguous_format, torch.channels_last)):
    with force_schedule(split=split):
        for n, c, hw, r, dtype in CASES:
            block = se_fused.FusedSE(c, rd_channels=r, act="silu", backend=backend).to(device, dtype)
            x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).to(memory_format=memory_format)
            x.requires_grad_()
            y = block(x)
            y.backward(torch.randn_like(y))
            assert torch.isfinite(x.grad).all()
if device.type == "cuda":
    torch.cuda.synchronize()
print(f"sanitizer_case: ok on {device} for backends {backends}")
