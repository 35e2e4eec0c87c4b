"""``python -m se_fused``: what this install built and what ``backend="auto"`` runs here.

In the spirit of ``python -m xformers.info`` and ``torch.utils.collect_env``: versions, whether the
compiled extension loaded (and why not), its CUDA kernels and their architectures, the CPU kernel's
instruction set, Triton and its interpreter, the GPU, and a one-line check that each available
backend computes what the eager reference computes.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, ops
from .functional import resolve_backend
from .module import FusedSE
from .reference import SEBlock


def _resolve(backend: str, device_type: str) -> tuple[str | None, str]:
    """(the backend that runs, or None; why not)."""
    try:
        return resolve_backend(backend, device_type), ""
    except RuntimeError as why:
        return None, str(why)


def report() -> list[tuple[str, str]]:
    """(item, value) lines describing this install."""
    lines = [
        ("se_fused", f"{__version__} ({os.path.dirname(__file__)})"),
        ("python", f"{platform.python_version()} on {platform.platform()}"),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}, {torch.get_num_threads()} CPU threads, "
                  f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()})"),
    ]
    if ops.extension_available():
        lines.append(("se_fused._C", f"loaded ({ops._C.__file__})"))
        lines.append(("C++ CPU kernel", f"yes, running its {ops._C.cpu_kernel_isa()} build"))
        cuda = f"yes, built for TORCH_CUDA_ARCH_LIST={ops.cuda_architectures()}" if ops.cuda_kernels_available() \
            else "no (the extension was built without CUDA)"
        lines.append(("CUDA kernels", cuda))
    else:
        lines.append(("se_fused._C", f"not loaded: {ops.EXTENSION_ERROR}"))
        lines.append(("C++ CPU kernel", "no"))
        lines.append(("CUDA kernels", "no"))
    if ops.triton_available():
        import triton

        mode = "interpreted on the CPU (TRITON_INTERPRET=1 at import)" if ops.triton_kernels.interpreter_enabled() \
            else "compiled for the GPU"
        lines.append(("Triton", f"{triton.__version__}, kernels {mode}"))
    else:
        lines.append(("Triton", f"not available: {ops.TRITON_ERROR}"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(("GPU", f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                             f"{props.multi_processor_count} SMs"))
    else:
        lines.append(("GPU", "none visible"))
    for device_type in ("cpu", "cuda"):
        chosen, why = _resolve("auto", device_type)
        lines.append((f"backend='auto' on {device_type} tensors", chosen or f"unavailable ({why})"))
    return lines


def self_check() -> list[tuple[str, str]]:
    """Each backend that can run here against the eager reference on one small input."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        torch.manual_seed(0)
        reference = SEBlock(32, rd_channels=8, act="silu").to(device)
        x = torch.randn(2, 32, 5, 7, device=device)
        expected = reference(x)
        for backend in ("cuda", "cpp", "triton", "torch"):
            if _resolve(backend, device)[0] is None:
                continue
            block = FusedSE(32, rd_channels=8, act="silu", backend=backend).to(device)
            block.load_state_dict(reference.state_dict())
            error = (block(x) - expected).abs().max().item()
            results.append((f"{backend} on {device}", f"{'ok' if error < 1e-4 else 'MISMATCH'} (max error {error:.1e})"))
    return results


def main() -> int:
    lines = report()
    checks = self_check()
    width = max(len(name) for name, _ in lines + checks)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
    print("\nself-check against SEBlock:")
    for name, value in checks:
        print(f"  {name:<{width - 2}}  {value}")
    return 0 if all(value.startswith("ok") for _, value in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
