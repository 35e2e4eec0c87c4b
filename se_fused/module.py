"""``FusedSE``: the drop-in replacement for ``SEBlock`` (and timm's / torchvision's SE modules)."""

from __future__ import annotations

import torch

from .functional import BACKENDS, squeeze_excite
from .reference import SEBlock, check_choice


class FusedSE(SEBlock):
    """``SEBlock`` computed by fused kernels.

    Same constructor, parameters (``fc1``, ``fc2`` 1×1 convolutions) and
    ``state_dict`` as ``SEBlock``, so weights load both ways, plus ``backend``:
    ``"auto"`` (default), ``"cuda"``, ``"cpp"``, ``"triton"`` or ``"torch"`` (see ``squeeze_excite``).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        rd_channels: int | None = None,
        bias: bool = True,
        act: str = "relu",
        gate: str = "sigmoid",
        backend: str = "auto",
    ) -> None:
        super().__init__(channels, reduction, rd_channels=rd_channels, bias=bias, act=act, gate=gate)
        check_choice("backend", backend, BACKENDS)
        self.backend = backend

    @classmethod
    def from_module(cls, module: torch.nn.Module, backend: str = "auto") -> "FusedSE":
        """A FusedSE computing what `module` (timm / torchvision SE module, SEBlock) computes, same weights."""
        from .convert import fused_from_module

        fused = fused_from_module(module, backend)
        if fused is None:
            raise ValueError(f"cannot convert {type(module).__name__}: not a recognised SE module with a 1x1 "
                             "fc1/fc2, a ReLU or SiLU activation and a sigmoid or hard-sigmoid gate")
        return fused

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squeeze_excite(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            act=self.act, gate=self.gate, backend=self.backend,
        )
