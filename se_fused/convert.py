"""Swap the SE modules of a timm or torchvision model (or of any module tree) for FusedSE, and
optionally fuse the residual tails of timm's SE-ResNet / SE-ResNeXt blocks into them."""

from __future__ import annotations

import torch
from torch import nn

from .module import _ACTIVATIONS, FusedSE
from .spec import BACKENDS, check_choice


def convert_se_modules(model: nn.Module, backend: str = "auto", fuse_residual: bool = False) -> int:
    """Replace, in place, every SE module inside `model` that ``FusedSE.from_module`` accepts; returns how many.

    Modules it refuses (not SE modules, or SE modules with features FusedSE lacks) are left as
    they are, and their children are searched in turn.

    With ``fuse_residual=True``, the residual blocks of timm's ResNet family (``BasicBlock`` and
    ``Bottleneck``: seresnet*, seresnext*, senet154) whose block ends ``act(se(x) + shortcut)`` then
    compute that whole tail in the SE module's pass (``FusedSE(out_act=...)(x, residual=shortcut)``):
    same outputs, same ``state_dict``. Blocks with stochastic depth (``drop_path``) or an activation
    other than ReLU/SiLU keep their own tail. The rewritten blocks are instances of subclasses
    generated here (``se_fused.convert.<Block>WithFusedTail``); save their ``state_dict``.
    """
    check_choice("backend", backend, BACKENDS)
    count = _convert(model, backend)
    if fuse_residual:
        fuse_residual_tails(model)
    return count


def _convert(model: nn.Module, backend: str) -> int:
    count = 0
    for name, child in list(model.named_children()):
        try:
            fused = FusedSE.from_module(child, backend)
        except ValueError:
            count += _convert(child, backend)
            continue
        setattr(model, name, fused)
        count += 1
    return count


# timm's residual blocks (timm.models.resnet) and the attribute holding their last activation.
_TAIL_ACTIVATION = {"BasicBlock": "act2", "Bottleneck": "act3"}


def fuse_residual_tails(model: nn.Module) -> int:
    """Fuse ``act(se(x) + shortcut)`` of every eligible timm ResNet block of `model` into its FusedSE
    (see ``convert_se_modules``); returns how many blocks now run the fused tail."""
    count = 0
    for block in model.modules():
        cls = type(block)
        act_name = _TAIL_ACTIVATION.get(cls.__name__)
        if act_name is None or cls.__module__ != "timm.models.resnet":
            continue
        se, act = getattr(block, "se", None), getattr(block, act_name, None)
        out_act = _ACTIVATIONS.get(type(act).__name__)
        if not isinstance(se, FusedSE) or se.out_act is not None or out_act is None or block.drop_path is not None:
            continue
        se.out_act = out_act
        block.__class__ = _fused_tail_class(cls.__name__)
        count += 1
    return count


def _basic_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's BasicBlock.forward with ``act2(se(x) + shortcut)`` in one FusedSE call."""
    shortcut = x if self.downsample is None else self.downsample(x)
    x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    return self.se(self.bn2(self.conv2(x)), residual=shortcut)


def _bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's Bottleneck.forward with ``act3(se(x) + shortcut)`` in one FusedSE call."""
    shortcut = x if self.downsample is None else self.downsample(x)
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    return self.se(self.bn3(self.conv3(x)), residual=shortcut)


_TAIL_FORWARDS = {"BasicBlock": _basic_block_forward, "Bottleneck": _bottleneck_forward}
_tail_classes: dict[str, type] = {}


def _fused_tail_class(block_name: str) -> type:
    """The subclass of timm's `block_name` whose forward fuses the tail, made once, named and
    reachable as ``se_fused.convert.<block_name>WithFusedTail`` (so pickling finds it)."""
    cls = _tail_classes.get(block_name)
    if cls is None:
        from timm.models import resnet

        name = f"{block_name}WithFusedTail"
        cls = type(name, (getattr(resnet, block_name),), {"forward": _TAIL_FORWARDS[block_name],
                                                          "__module__": __name__, "__qualname__": name})
        _tail_classes[block_name] = cls
    return cls


def __getattr__(name: str) -> type:  # unpickling a converted model in a fresh process
    for block_name in _TAIL_FORWARDS:
        if name == f"{block_name}WithFusedTail":
            return _fused_tail_class(block_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
