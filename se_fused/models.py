"""The SENet family's models that no library ships: SE-Inception-v3 and SE-Inception-ResNet-v2.

Built as the SENet paper draws them (Hu et al., Fig. 2 and 3), on the base networks of torchvision
and timm (imported on first use; neither is a dependency of ``se_fused`` itself):

- ``se_inception_v3``: torchvision's ``inception_v3`` with an SE block on the output of each of its
  11 Inception modules (``Mixed_5b`` ... ``Mixed_7c``).
- ``se_inception_resnet_v2``: timm's ``inception_resnet_v2`` with an SE block on the residual branch
  of each of its 40 residual modules (``Block35`` ×10, ``Block17`` ×20, ``Block8`` ×10), after the
  branch's last convolution and before the scaled addition of the identity.

Both take ``num_classes``, ``reduction`` (r: hidden width ``channels // r``) and ``backend`` (see
``FusedSE``); ``fused=False`` builds the same network with eager ``SEBlock`` modules, the reference
twin (``convert_se_modules`` turns one into the other, weights included). Weights are random: the
paper's models were trained from scratch and no checkpoint exists. The wrapped submodules keep their
base-network names one level down (``Mixed_5b.module.branch1x1...``, ``repeat.0.conv2d.conv...``).
"""

from __future__ import annotations

import torch
from torch import nn

from .module import FusedSE
from .reference import SEBlock

# Output channels of torchvision's Inception-v3 modules (Szegedy et al. 2016, Table 1).
INCEPTION_V3_MODULES = {
    "Mixed_5b": 256, "Mixed_5c": 288, "Mixed_5d": 288, "Mixed_6a": 768, "Mixed_6b": 768, "Mixed_6c": 768,
    "Mixed_6d": 768, "Mixed_6e": 768, "Mixed_7a": 1280, "Mixed_7b": 2048, "Mixed_7c": 2048,
}


class SEAfter(nn.Module):
    """``module`` followed by an SE block on its output: ``se(module(x))``."""

    def __init__(self, module: nn.Module, se: SEBlock) -> None:
        super().__init__()
        self.module = module
        self.se = se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.module(x))


def _se_block(channels: int, reduction: int, backend: str, fused: bool) -> SEBlock:
    return FusedSE(channels, reduction, backend=backend) if fused else SEBlock(channels, reduction)


def se_inception_v3(num_classes: int = 1000, reduction: int = 16, backend: str = "auto", fused: bool = True,
                    aux_logits: bool = False, **kwargs) -> nn.Module:
    """SE-Inception-v3: torchvision's ``inception_v3`` with an SE block after each Inception module.

    Args:
        num_classes: classifier outputs.
        reduction: SE reduction ratio r (the paper's default 16).
        backend: FusedSE backend (``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"``).
        fused: ``False`` builds the eager twin with ``SEBlock``.
        aux_logits: torchvision's auxiliary classifier (off by default here, so the model returns a
            tensor in training too).
        **kwargs: passed to ``torchvision.models.inception_v3`` (e.g. ``transform_input``, ``dropout``).

    Inputs are at least 75×75 (299×299 as in the paper).
    """
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, num_classes=num_classes, aux_logits=aux_logits, init_weights=True, **kwargs)
    for name, channels in INCEPTION_V3_MODULES.items():
        setattr(model, name, SEAfter(getattr(model, name), _se_block(channels, reduction, backend, fused)))
    return model


def se_inception_resnet_v2(num_classes: int = 1000, reduction: int = 16, backend: str = "auto", fused: bool = True,
                           **kwargs) -> nn.Module:
    """SE-Inception-ResNet-v2: timm's ``inception_resnet_v2`` with SE on each residual branch.

    Each ``Block35``/``Block17``/``Block8`` computes ``act(x + scale · conv2d(branches(x)))``; here its
    ``conv2d`` becomes ``SEAfter(conv2d, SE)``, so the block computes
    ``act(x + scale · se(conv2d(branches(x))))`` — the SE-ResNet arrangement of the paper's Fig. 3.

    Args:
        num_classes, reduction, backend, fused: as in ``se_inception_v3``.
        **kwargs: passed to ``timm.create_model("inception_resnet_v2", ...)`` (e.g. ``drop_rate``).

    Inputs are at least 75×75 (299×299 as in the paper).
    """
    import timm
    from timm.models.inception_resnet_v2 import Block8, Block17, Block35

    model = timm.create_model("inception_resnet_v2", pretrained=False, num_classes=num_classes, **kwargs)
    for block in model.modules():
        if isinstance(block, (Block35, Block17, Block8)):
            channels = block.conv2d.out_channels
            block.conv2d = SEAfter(block.conv2d, _se_block(channels, reduction, backend, fused))
    return model
