"""The op layer: every backend's forward and backward as a registered op with a fake kernel.

    backend   ops                                            implementation
    "cpp"     torch.ops.se_fused.se_forward / se_backward    C++ CPU kernel (csrc/cpu/), CPU impl of the schema
    "cuda"    the same two ops                               CUDA kernels (csrc/cuda/), CUDA impl of the schema
    "triton"  se_forward_triton / se_backward_triton         Triton kernels (triton_kernels/)
    "torch"   se_forward_torch / se_backward_torch           PyTorch ops (torch_backend.py), any device

All share one contract, ``csrc/se_fused.cpp``'s schema: forward(x, fc1_weight, fc1_bias,
fc2_weight, fc2_bias, act, gate, residual=None, out_act="none") -> (y, z, a, e) with
y = out_act(x * s + residual); backward(grad_y, x, fc1_weight, fc2_weight, z, a, e, act, gate,
has_fc1_bias, has_fc2_bias, need_dx, need_weight_grads, y=None, residual=None, out_act="none",
need_residual_grad=False) -> (dx, dw1, db1, dw2, db2, d_residual), empty tensors for what was
not asked for. The backward of out_act "relu" reads y (its mask), that of "silu" the residual
if the forward had one (to recompute the activation's input); d_residual is the gradient at out_act's input, returned
when out_act is not "none" (without out_act it is grad_y itself). Weights may be (R, C) or (R, C, 1, 1) and
their gradients come back in the same shape; x whose H and W do not flatten into one axis is
copied first; y and dx have the strides of ``empty_like`` of that x. Every op checks every
argument (spec.check_inputs, mirrored word for word in C++) before any kernel runs. The fake kernels below serve every op, so ``torch.compile`` and
``torch.export`` trace each one without running it. Autograd is not registered here:
``functional.SqueezeExciteFunction`` is the one autograd implementation of all backends
(docs/DESIGN.md §9, which also says why the Triton ops are custom ops, not triton_ops).

Importing this module registers every op available: the compiled ones when ``se_fused._C``
loads, the Triton ones when Triton imports, the PyTorch ones always.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import torch_backend
from .debug import record_launch
from .spec import check_backward_tail, check_inputs, compute_dtype, flattenable

from .extension import LOAD_ERROR as EXTENSION_ERROR
from .extension import native as _C  # its import registered the compiled ops (TORCH_LIBRARY in csrc/)

try:
    from . import triton_kernels

    TRITON_ERROR: Optional[ImportError] = None
except ImportError as err:  # no Triton on this platform
    triton_kernels = None
    TRITON_ERROR = err


def extension_available() -> bool:
    """True when se_fused._C (the C++ CPU kernel, maybe the CUDA kernels) loaded."""
    return _C is not None


def cuda_kernels_available() -> bool:
    """True when se_fused._C was built with the CUDA kernels."""
    return _C is not None and _C.with_cuda


def cuda_architectures() -> str:
    """The CUDA architectures se_fused._C was compiled for (TORCH_CUDA_ARCH_LIST at build time), or ''."""
    return _C.cuda_arch_list if cuda_kernels_available() else ""


def triton_available() -> bool:
    return triton_kernels is not None


# ----------------------------------------------------------------------------- fake kernels


def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual=None, out_act="none"):
    check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual, out_act)  # errors at trace time
    n, c = x.shape[:2]
    vec = dict(dtype=compute_dtype(x), device=x.device)
    return (torch.empty_like(flattenable(x)), x.new_empty((n, c), **vec), x.new_empty((n, fc1_weight.shape[0]), **vec),
            x.new_empty((n, c), **vec))


def _backward_fake(grad_y, x, fc1_weight, fc2_weight, z, a, e, act, gate, has_fc1_bias, has_fc2_bias, need_dx,
                   need_weight_grads, y=None, residual=None, out_act="none", need_residual_grad=False):
    c, r = x.shape[1], fc1_weight.shape[0]

    def param(shape, needed=True):
        return fc1_weight.new_empty(shape if needed and need_weight_grads else (0,))

    dx = torch.empty_like(flattenable(x)) if need_dx else x.new_empty((0,))
    d_residual = torch.empty_like(flattenable(x)) if need_residual_grad and out_act != "none" else x.new_empty((0,))
    return (dx, param(fc1_weight.shape), param((r,), has_fc1_bias), param(fc2_weight.shape),
            param((c,), has_fc2_bias), d_residual)


if _C is not None:
    torch.library.register_fake("se_fused::se_forward")(_forward_fake)
    torch.library.register_fake("se_fused::se_backward")(_backward_fake)


# ----------------------------------------------------------------------------- Python-implemented ops


def _define(name: str, forward, backward, device_types) -> "BackendOps":
    """Registers se_forward_<name> / se_backward_<name> around two implementations that take x with
    H, W flattenable and 2-D weights, with the same checks and argument handling as the C++ ops."""

    @torch.library.custom_op(f"se_fused::se_forward_{name}", mutates_args=(), device_types=device_types)
    def forward_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                   fc2_bias: Optional[Tensor], act: str, gate: str, residual: Optional[Tensor] = None,
                   out_act: str = "none") -> tuple[Tensor, Tensor, Tensor, Tensor]:
        check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual, out_act)
        r, c = fc1_weight.shape[:2]
        with _device_of(x):
            return forward(flattenable(x), fc1_weight.reshape(r, c), fc1_bias, fc2_weight.reshape(c, r), fc2_bias,
                           act, gate, _flattenable_or_none(residual), out_act)

    @torch.library.custom_op(f"se_fused::se_backward_{name}", mutates_args=(), device_types=device_types)
    def backward_op(grad_y: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, z: Tensor, a: Tensor,
                    e: Tensor, act: str, gate: str, has_fc1_bias: bool, has_fc2_bias: bool, need_dx: bool,
                    need_weight_grads: bool, y: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                    out_act: str = "none", need_residual_grad: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        check_inputs(x, fc1_weight, None, fc2_weight, None, act, gate)
        check_backward_tail(grad_y, x, y, residual, out_act)
        r, c = fc1_weight.shape[:2]
        with _device_of(x):
            dx, dw1, db1, dw2, db2, d_residual = backward(
                grad_y, flattenable(x), fc1_weight.reshape(r, c), fc2_weight.reshape(c, r), z, a, e, act, gate,
                has_fc1_bias, has_fc2_bias, need_dx, need_weight_grads, _flattenable_or_none(y),
                _flattenable_or_none(residual), out_act, need_residual_grad)
        if need_weight_grads:  # in the weights' own shapes, (R, C) or (R, C, 1, 1)
            dw1, dw2 = dw1.view(fc1_weight.shape), dw2.view(fc2_weight.shape)
        return dx, dw1, db1, dw2, db2, d_residual

    forward_op.register_fake(_forward_fake)
    backward_op.register_fake(_backward_fake)
    return BackendOps(getattr(torch.ops.se_fused, f"se_forward_{name}").default,
                      getattr(torch.ops.se_fused, f"se_backward_{name}").default)


def _device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """x's GPU as the current one (Triton launches, and the tuner's events, go to the current device and
    stream), as the C++ ops' device guard does; nothing on the CPU."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _flattenable_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else flattenable(t)


class BackendOps(NamedTuple):
    forward: Callable
    backward: Callable


# backend name -> its two ops; the compiled ops serve "cpp" on CPU tensors and "cuda" on CUDA tensors
BACKEND_OPS: dict[str, BackendOps] = {
    "torch": _define("torch", torch_backend.se_forward, torch_backend.se_backward, None),
}
if _C is not None:
    BACKEND_OPS["cpp"] = BACKEND_OPS["cuda"] = BackendOps(torch.ops.se_fused.se_forward.default,
                                                         torch.ops.se_fused.se_backward.default)
if triton_kernels is not None:
    BACKEND_OPS["triton"] = _define("triton", triton_kernels.se_forward, triton_kernels.se_backward,
                                    ("cuda", "cpu"))


def run_forward(backend: str, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual=None,
                out_act="none"):
    """(y, z, a, e) from `backend`'s forward op."""
    out = BACKEND_OPS[backend].forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual, out_act)
    if backend in ("cpp", "cuda") and x.shape[0]:  # the Triton launchers count their own launches
        record_launch(f"se_forward_{backend}")
    return out


def run_backward(backend: str, grad_y, x, fc1_weight, fc2_weight, z, a, e, act, gate, has_fc1_bias, has_fc2_bias,
                 need_dx, need_weight_grads, y=None, residual=None, out_act="none", need_residual_grad=False):
    """(dx, dw1, db1, dw2, db2, d_residual) from `backend`'s backward op."""
    out = BACKEND_OPS[backend].backward(grad_y, x, fc1_weight, fc2_weight, z, a, e, act, gate, has_fc1_bias,
                                        has_fc2_bias, need_dx, need_weight_grads, y, residual, out_act,
                                        need_residual_grad)
    if backend in ("cpp", "cuda") and x.shape[0]:
        record_launch(f"se_backward_{backend}")  # weight gradients included: the launch's last tickets
    return out
