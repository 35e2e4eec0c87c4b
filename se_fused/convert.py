"""Swap the SE modules of timm and torchvision models (and SEBlock) for FusedSE.

Recognised: timm ``SEModule`` (SE-ResNet, RegNetY; plain ``bn``, no ``add_maxpool``),
timm ``SqueezeExcite`` (EfficientNet, MobileNetV3), torchvision ``SqueezeExcitation``
and ``SEBlock``. Modules with features FusedSE lacks are left as they are.
"""

from __future__ import annotations

from torch import nn

from .module import FusedSE
from .reference import SEBlock

_ACTIVATIONS = {"ReLU": "relu", "SiLU": "silu", "Swish": "silu"}
_GATES = {"Sigmoid": "sigmoid", "Hardsigmoid": "hard_sigmoid", "HardSigmoid": "hard_sigmoid"}


def _parts(module: nn.Module):
    """(fc1, fc2, act module, gate module) of a recognised SE module, else None."""
    if isinstance(module, FusedSE):
        return None
    if isinstance(module, SEBlock):
        return module.fc1, module.fc2, module.act, module.gate
    name = type(module).__name__
    if name == "SEModule" and isinstance(getattr(module, "bn", None), nn.Identity) and not module.add_maxpool:
        return module.fc1, module.fc2, module.act, module.gate
    if name == "SqueezeExcite" and hasattr(module, "conv_reduce"):
        return module.conv_reduce, module.conv_expand, module.act1, module.gate
    if name == "SqueezeExcitation" and hasattr(module, "scale_activation"):
        return module.fc1, module.fc2, module.activation, module.scale_activation
    return None


def _name(layer, table: dict[str, str]) -> str | None:
    if isinstance(layer, str):  # SEBlock stores names already
        return layer
    return table.get(type(layer).__name__)


def fused_from_module(module: nn.Module, backend: str = "auto") -> FusedSE | None:
    """A FusedSE computing what `module` computes, sharing its weights' values; None if unsupported."""
    parts = _parts(module)
    if parts is None:
        return None
    fc1, fc2, act_layer, gate_layer = parts
    act, gate = _name(act_layer, _ACTIVATIONS), _name(gate_layer, _GATES)
    plain_1x1 = all(isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1 for fc in (fc1, fc2))
    if act is None or gate is None or not plain_1x1 or (fc1.bias is None) != (fc2.bias is None):
        return None
    fused = FusedSE(fc1.in_channels, rd_channels=fc1.out_channels, bias=fc1.bias is not None, act=act, gate=gate,
                    backend=backend)
    fused.fc1.load_state_dict(fc1.state_dict())
    fused.fc2.load_state_dict(fc2.state_dict())
    return fused.to(device=fc1.weight.device, dtype=fc1.weight.dtype).train(module.training)


def convert_se_modules(model: nn.Module, backend: str = "auto") -> int:
    """Replace, in place, every recognised SE module inside `model` by FusedSE; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        fused = fused_from_module(child, backend)
        if fused is not None:
            setattr(model, name, fused)
            count += 1
        else:
            count += convert_se_modules(child, backend)
    return count
