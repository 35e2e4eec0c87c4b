"""Triton kernels of the fused SE block: one launch forward, one launch backward.

    device.py    device code: the SE math, memory passes, MLP products, ticket protocol
    schedule.py  host side: schedule, workspace, launch
    forward.py   se_forward_kernel and its launcher
    backward.py  se_backward_kernel (weight gradients included) and its launcher
"""

from .backward import se_backward
from .forward import se_forward, se_forward_kernel
from .schedule import uses_interpreter


def interpreter_enabled() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return uses_interpreter(se_forward_kernel)


__all__ = ["interpreter_enabled", "se_backward", "se_forward"]
