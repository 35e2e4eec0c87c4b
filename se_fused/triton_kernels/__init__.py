"""Triton kernels of the fused SE block: one forward launch, two backward launches."""

from .backward import se_backward
from .common import force_schedule, uses_interpreter
from .forward import se_forward, se_forward_kernel


def interpreter_enabled() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return uses_interpreter(se_forward_kernel)


__all__ = ["force_schedule", "interpreter_enabled", "se_backward", "se_forward"]
