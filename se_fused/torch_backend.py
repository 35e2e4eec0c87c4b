"""The ``"torch"`` backend: the fused op's forward and backward written in PyTorch ops.

It runs on any device and serves as the portable fallback (``backend="auto"`` on devices
the kernels do not cover) and as the differentiable formula for double backward. It keeps
the kernels' contract: forward returns (y, z, a, e) with the MLP in the compute dtype
(float32, float64 for float64 x) and y = out_act(x * s + residual) (the fused residual tail
when a residual or out_act is given); backward returns (dx, dW1, db1, dW2, db2, d_residual),
empty tensors for what was not asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import apply_activation
from .spec import compute_dtype


def apply_gate(e: torch.Tensor, gate: str) -> torch.Tensor:
    """sigmoid, or hard sigmoid as relu6(e + 3) / 6 (torch's rounding) written with clamp, which
    unlike F.hardsigmoid can be differentiated twice."""
    return torch.sigmoid(e) if gate == "sigmoid" else torch.clamp(e + 3, 0, 6) / 6


def activation_backward(grad: torch.Tensor, a: torch.Tensor, act: str) -> torch.Tensor:
    """grad · act'(a) as eager computes it: ReLU's is a select (threshold_backward)."""
    if act == "relu":
        return torch.where(a <= 0, 0.0, grad)
    sig = torch.sigmoid(a)
    return grad * (sig * (1 + a * (1 - sig)))


def gate_backward(grad: torch.Tensor, e: torch.Tensor, gate: str) -> torch.Tensor:
    """grad · gate'(e) as eager computes it: hard sigmoid's is a select (hardsigmoid_backward)."""
    if gate == "sigmoid":
        s = torch.sigmoid(e)
        return grad * (s * (1 - s))
    return torch.where((e > -3) & (e < 3), grad, 0.0) / 6


def excite(z: torch.Tensor, w1, b1, w2, b2, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, e): the MLP on pooled vectors z, weights ((R, C) or (R, C, 1, 1)) cast to z's dtype."""
    w1, w2 = w1.reshape(w1.shape[0], -1).to(z.dtype), w2.reshape(w2.shape[0], -1).to(z.dtype)
    a = F.linear(z, w1, None if b1 is None else b1.to(z.dtype))
    e = F.linear(apply_activation(a, act), w2, None if b2 is None else b2.to(z.dtype))
    return a, e


def scales(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act: str, gate: str):
    """(s, z, a, e): the per-channel scales and the saved vectors, in the compute dtype."""
    z = x.mean((2, 3), dtype=compute_dtype(x))
    a, e = excite(z, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act)
    return apply_gate(e, gate), z, a, e


def tail(t: torch.Tensor, out_act: str) -> torch.Tensor:
    """out_act of the fused residual tail, as eager computes it."""
    return t if out_act == "none" else apply_activation(t, out_act)


def squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act: str, gate: str, residual=None,
                   out_act: str = "none") -> torch.Tensor:
    """y, as a differentiable graph of PyTorch ops (what double backward differentiates)."""
    s = scales(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)[0]
    t = x * s.to(x.dtype)[:, :, None, None]
    return tail(t if residual is None else t + residual, out_act)


def se_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act: str, gate: str, residual=None,
               out_act: str = "none"):
    s, z, a, e = scales(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)
    y = torch.empty_like(x)  # x's strides, as every backend's output
    torch.mul(x, s.to(x.dtype)[:, :, None, None], out=y)
    if residual is not None:
        y.add_(residual)
    if out_act != "none":
        y.copy_(tail(y, out_act))
    return y, z, a, e


def tail_backward(grad_y, x, y, residual, s, out_act: str) -> torch.Tensor:
    """The gradient at out_act's input, in the compute dtype: from y's sign for ReLU (eager's
    threshold_backward), from the recomputed input x * s + residual for SiLU."""
    g = grad_y.to(s.dtype)
    if out_act == "relu":
        return torch.where(y <= 0, 0.0, g)  # threshold_backward: a NaN y passes the gradient on
    if out_act == "silu":
        t = x.to(s.dtype) * s[:, :, None, None]
        return activation_backward(g, t if residual is None else t + residual.to(s.dtype), "silu")
    return g


def se_backward(grad_y, x, fc1_weight, fc2_weight, z, a, e, act: str, gate: str, has_fc1_bias: bool,
                has_fc2_bias: bool, need_dx: bool, need_weight_grads: bool, y=None, residual=None,
                out_act: str = "none", need_residual_grad: bool = False):
    cd = z.dtype
    p = x.shape[2] * x.shape[3]
    g = tail_backward(grad_y, x, y, residual, apply_gate(e, gate), out_act)
    d_residual = g.to(x.dtype) if need_residual_grad and out_act != "none" else x.new_empty((0,))
    de = gate_backward((g * x.to(cd)).sum((2, 3)), e, gate)
    da = activation_backward(de @ fc2_weight.to(cd), a, act)
    dx = x.new_empty((0,))
    if need_dx:
        dzp = (da @ fc1_weight.to(cd)) / p
        dx = torch.empty_like(x)
        torch.add(g * apply_gate(e, gate)[:, :, None, None], dzp[:, :, None, None], out=dx)
    if not need_weight_grads:  # new tensors: outputs must not alias
        return dx, *(fc1_weight.new_empty((0,)) for _ in range(4)), d_residual
    param = fc1_weight.dtype
    dw1 = (da.T @ z).to(param)
    dw2 = (de.T @ apply_activation(a, act)).to(param)
    db1 = da.sum(0).to(param) if has_fc1_bias else fc1_weight.new_empty((0,))
    db2 = de.sum(0).to(param) if has_fc2_bias else fc1_weight.new_empty((0,))
    return dx, dw1, db1, dw2, db2, d_residual

