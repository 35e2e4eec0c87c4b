"""The functional API, its autograd Function and the choice of backend."""

from __future__ import annotations

import torch

from .reference import ACTIVATIONS, GATES, apply_activation, apply_gate, check_choice

BACKENDS = ("auto", "cuda", "cpp", "triton", "torch")
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t: object, ndims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(t.shape)}")


def _check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, backend) -> None:
    """Every argument, checked before any kernel runs; messages name the argument."""
    check_choice("act", act, ACTIVATIONS)
    check_choice("gate", gate, GATES)
    check_choice("backend", backend, BACKENDS)
    _check_tensor("x", x, (4,))
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    n, c, h, w = x.shape
    if c == 0 or h * w == 0:
        raise ValueError(f"x must have at least one channel and one spatial position, got shape {tuple(x.shape)}")
    _check_tensor("fc1_weight", fc1_weight, (2, 4))
    _check_tensor("fc2_weight", fc2_weight, (2, 4))
    r = fc1_weight.shape[0]
    for name, wt, expected in (("fc1_weight", fc1_weight, (r, c)), ("fc2_weight", fc2_weight, (c, r))):
        if tuple(wt.shape[:2]) != expected or wt.shape[2:] not in ((), (1, 1)):
            raise ValueError(f"{name} must have shape {expected} or {expected + (1, 1)} for x with {c} channels "
                             f"and fc1_weight with {r} outputs, got {tuple(wt.shape)}")
    params = {"fc1_weight": fc1_weight, "fc2_weight": fc2_weight}
    for name, bias, size in (("fc1_bias", fc1_bias, r), ("fc2_bias", fc2_bias, c)):
        if bias is not None:
            _check_tensor(name, bias, (1,))
            if bias.shape[0] != size:
                raise ValueError(f"{name} must have shape ({size},), got {tuple(bias.shape)}")
            params[name] = bias
    allowed = (x.dtype,) if x.dtype in (torch.float32, torch.float64) else (x.dtype, torch.float32)
    for name, t in params.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
        if t.dtype != fc1_weight.dtype or t.dtype not in allowed:
            raise TypeError(f"{name} has dtype {t.dtype}; parameters must all be "
                            f"{' or '.join(map(str, allowed))} for x of dtype {x.dtype}")


def _choose_backend(x: torch.Tensor, backend: str) -> str:
    from .ops import EXTENSION_ERROR, cuda_kernels_available, extension_available

    if backend == "auto":
        if x.is_cuda:
            return "cuda" if cuda_kernels_available() else "triton"
        return "cpp" if x.device.type == "cpu" and extension_available() else "torch"
    if backend == "cuda":
        if not x.is_cuda:
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got x on {x.device}")
        if not cuda_kernels_available():
            why = f": {EXTENSION_ERROR}" if EXTENSION_ERROR else " (the extension was built without CUDA)"
            raise RuntimeError(f"backend='cuda' needs se_fused's CUDA extension, which is not available{why}")
    if backend == "cpp":
        if x.device.type != "cpu":
            raise RuntimeError(f"backend='cpp' is the C++ CPU kernel and needs CPU tensors, got x on {x.device}")
        if not extension_available():
            raise RuntimeError(f"backend='cpp' needs se_fused's compiled extension, which is not available: "
                               f"{EXTENSION_ERROR}")
    if backend == "triton":
        from .triton_kernels import interpreter_enabled

        if x.device.type == "cpu" and not interpreter_enabled():
            raise RuntimeError("backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                               "before se_fused is imported, or move x to a CUDA device")
        if x.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' supports CUDA (and interpreted CPU) tensors, got {x.device}")
    return backend


def _flattenable(x: torch.Tensor) -> torch.Tensor:
    """x itself when H and W flatten into one strided axis (NCHW, channels_last and more), else a copy."""
    from .triton_kernels.common import spatial_strides

    return x if spatial_strides(x) is not None else x.contiguous()


class SqueezeExciteFunction(torch.autograd.Function):
    """Autograd for the fused kernels: one forward launch, at most two backward launches.

    ``apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)`` with 2-D
    weights (R, C) and (C, R); biases may be None. Saves x and O(N·C) vectors only.
    """

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate):
        from .triton_kernels import se_forward

        x = _flattenable(x)
        y, z, a, e = se_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)
        ctx.save_for_backward(x, fc1_weight, fc2_weight, z, a, e)
        ctx.act, ctx.gate = act, gate
        ctx.has_b1, ctx.has_b2 = fc1_bias is not None, fc2_bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        from .triton_kernels import se_backward

        x, w1, w2, z, a, e = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw1, db1, dw2, db2 = se_backward(
            grad_y, x, w1, w2, z, a, e, ctx.act, ctx.gate,
            need_dx=need[0], need_weight_grads=any(need[1:5]),
            has_b1=ctx.has_b1, has_b2=ctx.has_b2, param_dtype=w1.dtype,
        )
        return dx, dw1, db1, dw2, db2, None, None


def _torch_squeeze_excite(x, w1, b1, w2, b2, act, gate):
    """The same function in plain PyTorch ops (any device), MLP computed in float32 or float64."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.mean((2, 3), dtype=compute)
    h = apply_activation(torch.nn.functional.linear(z, w1.to(compute), None if b1 is None else b1.to(compute)), act)
    e = torch.nn.functional.linear(h, w2.to(compute), None if b2 is None else b2.to(compute))
    return x * apply_gate(e, gate).to(x.dtype)[:, :, None, None]


@torch.compiler.disable
def _triton_fused(x, w1, b1, w2, b2, act, gate):
    return SqueezeExciteFunction.apply(x, w1, b1, w2, b2, act, gate)


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
) -> torch.Tensor:
    """Squeeze-and-Excitation: ``x * gate(W2 act(W1 mean_hw(x) + b1) + b2)``.

    Args:
        x: (N, C, H, W), float16/bfloat16/float32/float64, NCHW or channels_last
            (other strides are copied first). The output keeps x's dtype and memory format.
        fc1_weight: (R, C) or (R, C, 1, 1). fc1_bias: (R,) or None.
        fc2_weight: (C, R) or (C, R, 1, 1). fc2_bias: (C,) or None.
            Parameters share one dtype: x's, or float32 when x is float16/bfloat16.
        act: ``"relu"`` or ``"silu"``. gate: ``"sigmoid"`` or ``"hard_sigmoid"``.
        backend: ``"auto"`` (CUDA tensors: the CUDA kernels when the extension is built, else
            Triton; CPU tensors: the C++ kernel when built, else PyTorch ops), ``"cuda"``,
            ``"cpp"``, ``"triton"`` (on CPU tensors only under TRITON_INTERPRET=1) or ``"torch"``.

    Accumulation is float32 (float64 for float64 input); gradients flow to x and
    every parameter.
    """
    _check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, backend)
    chosen = _choose_backend(x, backend)
    r, c = fc1_weight.shape[:2]
    w1, w2 = fc1_weight.reshape(r, c), fc2_weight.reshape(c, r)
    if chosen == "torch" or x.shape[0] == 0:
        return _torch_squeeze_excite(x, w1, fc1_bias, w2, fc2_bias, act, gate)
    if chosen in ("cuda", "cpp"):
        from .ops import squeeze_excite_op

        return squeeze_excite_op(_flattenable(x), w1, fc1_bias, w2, fc2_bias, act, gate)
    return _triton_fused(x, w1, fc1_bias, w2, fc2_bias, act, gate)
