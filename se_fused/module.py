"""``FusedSE``: the drop-in replacement for ``SEBlock`` and for timm's / torchvision's SE modules."""

from __future__ import annotations

import torch
from torch import nn

from .functional import resolve_backend, squeeze_excite
from .reference import SEBlock
from .spec import BACKENDS, check_choice

_ACTIVATIONS = {"ReLU": "relu", "SiLU": "silu", "Swish": "silu"}
_GATES = {"Sigmoid": "sigmoid", "Hardsigmoid": "hard_sigmoid", "HardSigmoid": "hard_sigmoid"}


class FusedSE(SEBlock):
    """``SEBlock`` computed by fused kernels: ``y = x * gate(fc2(act(fc1(mean_hw(x)))))``.

    Same constructor, parameters (``fc1``, ``fc2``: 1×1 convolutions) and ``state_dict`` as
    ``SEBlock``, timm's ``SEModule`` and torchvision's ``SqueezeExcitation``, so weights load
    both ways.

    Args:
        channels: C, the channels of the input (and of the output).
        reduction: the hidden width is R = ``max(1, channels // reduction)`` ...
        rd_channels: ... unless R is given here.
        bias: whether ``fc1`` and ``fc2`` have biases.
        act: ``"relu"`` or ``"silu"`` (EfficientNet), after ``fc1``.
        gate: ``"sigmoid"`` or ``"hard_sigmoid"`` (MobileNetV3), after ``fc2``.
        out_act: None, ``"relu"`` or ``"silu"``: with it (or with a residual), ``forward(x, residual)``
            computes a residual block's tail ``out_act(x * s + residual)`` in the same pass
            (see ``convert_se_modules(model, fuse_residual=True)``).
        backend: which kernels run: ``"auto"`` (default: the CUDA kernels for CUDA tensors when
            built, else Triton; the C++ kernel for CPU tensors when built; else PyTorch ops),
            ``"cuda"``, ``"cpp"``, ``"triton"`` or ``"torch"``. ``repr`` shows what ``"auto"``
            resolves to on the module's device.

    Shapes and dtypes: x is (N, C, H, W) in float16, bfloat16, float32 or float64, NCHW or
    channels_last (other strides are copied first); y has x's shape, dtype and memory format.
    The parameters have x's dtype, or float32 with float16/bfloat16 x (mixed precision, as under
    autocast). Accumulation is float32 (float64 for float64 x).
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
        backend: str = "auto",
    ) -> None:
        super().__init__(channels, reduction, rd_channels=rd_channels, bias=bias, act=act, gate=gate,
                         out_act=out_act)
        check_choice("backend", backend, BACKENDS)
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedSE":
        """A FusedSE computing what `module` computes, with a copy of its weights, on its device and dtype.

        Accepts ``SEBlock``, timm's ``SEModule`` (SE-ResNet(X), SENet-154, RegNetY; and the one of
        ``timm.models.senet``, in the ``legacy_*`` SENets) and ``SqueezeExcite``
        (EfficientNet, MobileNetV3), and torchvision's ``SqueezeExcitation``; raises ValueError
        saying why for anything else, or for features FusedSE lacks (``add_maxpool``, a norm
        between fc1 and the activation, other activations or gates, fcs that are not plain 1×1
        convolutions, a bias on only one of the two).
        """
        fc1, fc2, act_layer, gate_layer = _se_parts(module)
        act = act_layer if isinstance(act_layer, str) else _ACTIVATIONS.get(type(act_layer).__name__)
        gate = gate_layer if isinstance(gate_layer, str) else _GATES.get(type(gate_layer).__name__)
        name = type(module).__name__
        if act is None or gate is None:
            raise ValueError(f"cannot convert {name}: FusedSE supports ReLU or SiLU activations and sigmoid or "
                             f"hard-sigmoid gates, got {type(act_layer).__name__} and {type(gate_layer).__name__}")
        if not all(isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1 for fc in (fc1, fc2)):
            raise ValueError(f"cannot convert {name}: its fc1/fc2 are not plain 1x1 convolutions")
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError(f"cannot convert {name}: one of fc1/fc2 has a bias and the other does not")
        fused = cls(fc1.in_channels, rd_channels=fc1.out_channels, bias=fc1.bias is not None, act=act, gate=gate,
                    backend=backend)
        fused.fc1.load_state_dict(fc1.state_dict())
        fused.fc2.load_state_dict(fc2.state_dict())
        return fused.to(device=fc1.weight.device, dtype=fc1.weight.dtype).train(module.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}{self._resolved_note()}"

    def _resolved_note(self) -> str:
        if self.backend != "auto":
            return ""
        device_type = self.fc1.weight.device.type
        try:
            return f" (runs {resolve_backend('auto', device_type, self.out_act is not None)!r} on {device_type})"
        except RuntimeError:
            return ""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """y = x · s, s = gate(fc2(act(fc1(mean over H, W of x)))) per sample and channel; with
        `residual` and/or ``out_act``: y = out_act(x · s + residual).

        x: (N, C, H, W) with C = ``channels``; see the class docstring for dtypes and layouts.
        residual: None or a tensor of x's shape, dtype and device (any layout).
        """
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} has {self.channels} channels but x has {x.shape[1]} "
                             f"(x of shape {tuple(x.shape)}; channels are dimension 1)")
        return squeeze_excite(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, act=self.act,
                              gate=self.gate, backend=self.backend, residual=residual, out_act=self.out_act)


def _se_parts(module: nn.Module):
    """(fc1, fc2, activation, gate) of a recognised SE module; ValueError saying why otherwise."""
    name = type(module).__name__
    if isinstance(module, FusedSE):
        raise ValueError("cannot convert FusedSE: it is already fused")
    if isinstance(module, SEBlock):
        return module.fc1, module.fc2, module.act, module.gate
    if name == "SEModule" and hasattr(module, "add_maxpool"):  # timm.layers.SEModule
        if module.add_maxpool:
            raise ValueError("cannot convert SEModule: add_maxpool=True (mean + max pooling) is not supported")
        if not isinstance(getattr(module, "bn", None), nn.Identity):
            raise ValueError("cannot convert SEModule: a norm layer between fc1 and the activation is not supported")
        return module.fc1, module.fc2, module.act, module.gate
    if name == "SEModule" and hasattr(module, "sigmoid"):  # timm.models.senet (legacy_seresnet*, legacy_senet154)
        return module.fc1, module.fc2, module.relu, module.sigmoid
    if name == "SqueezeExcite" and hasattr(module, "conv_reduce"):  # timm EfficientNet / MobileNetV3
        return module.conv_reduce, module.conv_expand, module.act1, module.gate
    if name == "SqueezeExcitation" and hasattr(module, "scale_activation"):  # torchvision
        return module.fc1, module.fc2, module.activation, module.scale_activation
    raise ValueError(f"cannot convert {name}: not a recognised SE module (SEBlock, timm SEModule (either "
                     "kind) or SqueezeExcite, torchvision SqueezeExcitation)")
