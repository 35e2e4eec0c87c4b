"""The eager reference: ``SEBlock`` written plainly in PyTorch ops.

Every backend is tested against this module (run in float64), and ``FusedSE``
shares its parameters and ``state_dict`` layout, which is that of timm's
``SEModule`` and torchvision's ``SqueezeExcitation``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ACTIVATIONS, GATES, OUT_ACTIVATIONS, check_choice, hidden_width


def apply_activation(a: torch.Tensor, act: str) -> torch.Tensor:
    return F.relu(a) if act == "relu" else F.silu(a)


def apply_gate(e: torch.Tensor, gate: str) -> torch.Tensor:
    return torch.sigmoid(e) if gate == "sigmoid" else F.hardsigmoid(e)


class SEBlock(nn.Module):
    """Squeeze-and-Excitation: ``y = x * gate(fc2(act(fc1(mean_hw(x)))))``.

    Args:
        channels: C, the number of input (and output) channels.
        reduction: R = ``max(1, channels // reduction)`` unless ``rd_channels`` is given.
        rd_channels: the hidden width R, overriding ``reduction``.
        bias: whether ``fc1`` and ``fc2`` have biases.
        act: ``"relu"`` or ``"silu"`` after ``fc1``.
        gate: ``"sigmoid"`` or ``"hard_sigmoid"`` after ``fc2``.
        out_act: None, ``"relu"`` or ``"silu"``: the residual block's activation after the block's
            addition, ``forward(x, residual)`` = ``out_act(x * s + residual)`` (the fused tail).
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
        out_act: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        check_choice("act", act, ACTIVATIONS)
        check_choice("gate", gate, GATES)
        if out_act is not None:
            check_choice("out_act", out_act, OUT_ACTIVATIONS[1:])
        rd = hidden_width(channels, reduction, rd_channels)
        self.channels = channels
        self.rd_channels = rd
        self.act = act
        self.gate = gate
        self.out_act = out_act
        self.fc1 = nn.Conv2d(channels, rd, kernel_size=1, bias=bias)
        self.fc2 = nn.Conv2d(rd, channels, kernel_size=1, bias=bias)

    def extra_repr(self) -> str:
        tail = f", out_act={self.out_act!r}" if self.out_act else ""
        return f"channels={self.channels}, rd_channels={self.rd_channels}, act={self.act!r}, gate={self.gate!r}{tail}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        z = x.mean((2, 3), keepdim=True)
        h = apply_activation(self.fc1(z), self.act)
        y = x * apply_gate(self.fc2(h), self.gate)
        if residual is not None:
            y = y + residual
        return y if self.out_act is None else apply_activation(y, self.out_act)
