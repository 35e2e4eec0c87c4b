"""Swap the SE modules of a timm or torchvision model (or of any module tree) for FusedSE."""

from __future__ import annotations

from torch import nn

from .module import FusedSE
from .spec import BACKENDS, check_choice


def convert_se_modules(model: nn.Module, backend: str = "auto") -> int:
    """Replace, in place, every SE module inside `model` that ``FusedSE.from_module`` accepts; returns how many.

    Modules it refuses (not SE modules, or SE modules with features FusedSE lacks) are left as
    they are, and their children are searched in turn.
    """
    check_choice("backend", backend, BACKENDS)
    count = 0
    for name, child in list(model.named_children()):
        try:
            fused = FusedSE.from_module(child, backend)
        except ValueError:
            count += convert_se_modules(child, backend)
            continue
        setattr(model, name, fused)
        count += 1
    return count
