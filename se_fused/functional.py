"""The functional API: ``squeeze_excite``, its autograd Function and the choice of backend.

Data flows one way: ``FusedSE`` -> ``squeeze_excite`` -> ``SqueezeExciteFunction`` (when a
gradient is needed) -> the backend's ops (``ops.py``) -> kernels. The backend is resolved from
the backend name, x's device type and what was built, all plain Python values, so the choice
is made once per graph when ``torch.compile`` traces it (docs/DESIGN.md §9).
"""

from __future__ import annotations

import os

import torch

from . import ops, torch_backend
from .spec import BACKENDS, check_choice


def _unavailable(backend: str, device_type: str) -> str | None:
    """Why `backend` cannot run on `device_type` tensors here, or None when it can."""
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got x on {device_type}"
        if not ops.cuda_kernels_available():
            why = f": {ops.EXTENSION_ERROR}" if ops.EXTENSION_ERROR else " (the extension was built without CUDA)"
            return f"backend='cuda' needs se_fused's CUDA extension, which is not available{why}"
    elif backend == "cpp":
        if device_type != "cpu":
            return f"backend='cpp' is the C++ CPU kernel and needs CPU tensors, got x on {device_type}"
        if not ops.extension_available():
            return f"backend='cpp' needs se_fused's compiled extension, which is not available: {ops.EXTENSION_ERROR}"
    elif backend == "triton":
        if not ops.triton_available():
            return f"backend='triton' needs Triton, which did not import: {ops.TRITON_ERROR}"
        if device_type == "cpu" and not ops.triton_kernels.interpreter_enabled():
            late = (" TRITON_INTERPRET=1 is set now, but it was not when se_fused was imported, so the kernels "
                    "were built for the GPU." if os.environ.get("TRITON_INTERPRET") == "1" else "")
            return ("backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                    f"se_fused is imported, or move x to a CUDA device.{late}")
        if device_type not in ("cpu", "cuda"):
            return f"backend='triton' supports CUDA (and interpreted CPU) tensors, got x on {device_type}"
    return None


def _auto(device_type: str, tail: bool) -> str:
    if device_type == "cuda":
        # The CUDA kernels' residual tail is compiled but has not yet run on a GPU (docs/DESIGN.md
        # §11); the Triton kernels' tail runs in CI's interpreter. backend="cuda" runs it when asked.
        if ops.cuda_kernels_available() and not tail:
            return "cuda"
        return "triton" if ops.triton_available() else "torch"
    if device_type == "cpu" and ops.extension_available():
        return "cpp"
    return "torch"


_resolved: dict[tuple[str, str, bool], str] = {}


def resolve_backend(backend: str, device_type: str, tail: bool = False) -> str:
    """The backend that runs for `backend` (maybe "auto") on tensors of `device_type`, with the
    residual tail when `tail`; a RuntimeError naming what is missing when it cannot run."""
    key = (backend, device_type, tail)
    chosen = _resolved.get(key)
    if chosen is None:
        check_choice("backend", backend, BACKENDS)
        chosen = _auto(device_type, tail) if backend == "auto" else backend
        why = _unavailable(chosen, device_type)
        if why is not None:
            raise RuntimeError(why)
        _resolved[key] = chosen
    return chosen


class SqueezeExciteFunction(torch.autograd.Function):
    """The autograd of every fused backend: one forward op, one backward op.

    ``apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, backend[, residual, out_act])``
    with weights (R, C) or (R, C, 1, 1), biases or None, `backend` one of "cuda", "cpp",
    "triton", "torch" (not "auto"; see ``resolve_backend``), and optionally the fused residual
    tail: y = out_act(x * s + residual), out_act "none", "relu" or "silu". Returns y. Saves x, the
    parameters and the O(N·C) vectors z, a, e the forward op returns; never a full-size
    intermediate. The tail saves tensors that exist anyway: the residual (for "silu" the
    activation's input is recomputed from x, s and it, and double backward needs it; in a residual
    block it is the block's input, which the first convolution saves too, or the downsample's
    output) and, for "relu", y (its mask; the next layer holds y too).

    Double backward (``create_graph=True``, e.g. a gradient penalty) differentiates the same
    function written in PyTorch ops, recomputed from what was saved, on every backend.
    """

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, backend, residual=None,
                out_act="none"):
        y, z, a, e = ops.run_forward(backend, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual,
                                     out_act)
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, z, a, e,
                              y if out_act == "relu" else None, residual)
        ctx.act, ctx.gate, ctx.backend, ctx.out_act = act, gate, backend, out_act
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, b1, w2, b2, z, a, e, y, residual = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_residual = residual is not None and need[8]
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            grads = _differentiable_backward(grad_y, (x, w1, b1, w2, b2, residual), need[:5] + (need_residual,),
                                             ctx.act, ctx.gate, ctx.out_act)
            return grads[:5] + (None,) * 3 + (grads[5], None)
        need_weights = any(need[1:5])
        dx, dw1, db1, dw2, db2, d_residual = ops.run_backward(
            ctx.backend, grad_y, x, w1, w2, z, a, e, ctx.act, ctx.gate, b1 is not None, b2 is not None,
            need[0], need_weights, y, residual, ctx.out_act, need_residual)
        if need_residual and ctx.out_act == "none":
            d_residual = grad_y
        return (dx if need[0] else None, dw1 if need_weights else None, db1 if need_weights and b1 is not None else None,
                dw2 if need_weights else None, db2 if need_weights and b2 is not None else None, None, None, None,
                d_residual if need_residual else None, None)


def _differentiable_backward(grad_y, inputs, needed, act, gate, out_act):
    """Gradients of the SE function as a graph of PyTorch ops (so they can be differentiated again)."""
    wanted = [t for t, need in zip(inputs, needed) if need]
    with torch.enable_grad():
        y = torch_backend.squeeze_excite(*inputs[:5], act, gate, inputs[5], out_act)
        grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
    return tuple(next(grads) if need else None for need in needed)


def squeeze_excite(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    act: str = "relu",
    gate: str = "sigmoid",
    backend: str = "auto",
    residual: torch.Tensor | None = None,
    out_act: str | None = None,
) -> torch.Tensor:
    """Squeeze-and-Excitation: ``x * gate(W2 act(W1 mean_hw(x) + b1) + b2)``, fused; with the
    residual tail of a residual block, ``out_act(x * s + residual)`` in the same pass.

    Args:
        x: (N, C, H, W), float16/bfloat16/float32/float64, NCHW or channels_last
            (other strides are copied first). The output keeps x's dtype and memory format.
        fc1_weight: (R, C) or (R, C, 1, 1). fc1_bias: (R,) or None.
        fc2_weight: (C, R) or (C, R, 1, 1). fc2_bias: (C,) or None.
            Parameters share one dtype: x's, or float32 when x is float16/bfloat16.
        act: ``"relu"`` or ``"silu"``. gate: ``"sigmoid"`` or ``"hard_sigmoid"``.
        backend: ``"auto"`` (CUDA tensors: the CUDA kernels when the extension is built, else
            Triton; CPU tensors: the C++ kernel when built; else PyTorch ops), ``"cuda"``,
            ``"cpp"``, ``"triton"`` (on CPU tensors only under TRITON_INTERPRET=1) or ``"torch"``.
        residual: None, or a tensor of x's shape, dtype and device (any layout; NCHW and
            channels_last are read in place) added to x · s: the shortcut of a residual block.
        out_act: None, ``"relu"`` or ``"silu"``: the activation after the addition.

    Accumulation is float32 (float64 for float64 input); gradients flow to x and every
    parameter, and twice over (``create_graph=True``) through PyTorch ops. NaN and Inf
    propagate as in eager PyTorch. Bad arguments raise TypeError/ValueError naming the argument,
    and a backend that cannot run here a RuntimeError saying why, before any kernel runs.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    out_act = "none" if out_act is None else out_act
    chosen = resolve_backend(backend, x.device.type, residual is not None or out_act != "none")
    # the op checks every argument; the autograd Function only when a gradient will be asked for
    if torch.is_grad_enabled() and (x.requires_grad or _requires_grad(fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                                       residual)):
        return SqueezeExciteFunction.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, chosen, residual,
                                           out_act)
    return ops.run_forward(chosen, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual, out_act)[0]


def _requires_grad(*tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
