"""Instruments for tests and profiling: a count of the package's own kernel
launches, and NaN-poisoned output buffers so an element a kernel forgot to
write cannot pass for a correct one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Process-wide, not thread-local: autograd runs CUDA backward passes on its own threads.
_counters: list["LaunchCount"] = []
_poison = False


class LaunchCount:
    """How many kernels se_fused launched inside a ``count_kernel_launches`` block."""

    def __init__(self) -> None:
        self.count = 0
        self.kernels: list[str] = []

    def __repr__(self) -> str:
        return f"LaunchCount(count={self.count}, kernels={self.kernels})"


@contextlib.contextmanager
def count_kernel_launches() -> Iterator[LaunchCount]:
    """Count se_fused's kernel launches (forward and backward), e.g.::

        with se_fused.count_kernel_launches() as launches:
            y = fused_se(x)
        assert launches.count == 1
    """
    counter = LaunchCount()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def record_launch(kernel_name: str) -> None:
    for counter in _counters:
        counter.count += 1
        counter.kernels.append(kernel_name)


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every buffer a kernel is meant to overwrite with NaN before launch."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def new_output(shape, *, like: torch.Tensor | None = None, dtype=None, device=None) -> torch.Tensor:
    """``torch.empty`` (or ``empty_like``, keeping ``like``'s memory format) that is NaN-filled under poisoning."""
    if like is not None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan"))
    return out
