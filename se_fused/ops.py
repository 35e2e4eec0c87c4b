"""The compiled ops ``torch.ops.se_fused.se_forward`` / ``se_backward`` (csrc/), with
their fake kernels and autograd registered here, so ``torch.compile`` can trace them
and ``torch.library.opcheck`` can test them."""

from __future__ import annotations

import torch

from .debug import record_launch

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    EXTENSION_ERROR: ImportError | None = None
except ImportError as err:  # built without a compiler, or not built at all
    EXTENSION_ERROR = err


def extension_available() -> bool:
    """True when se_fused._C (the C++ CPU kernel, maybe the CUDA kernels) is built."""
    return EXTENSION_ERROR is None


def cuda_kernels_available() -> bool:
    """True when se_fused._C has the CUDA kernels."""
    return extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key("se_fused::se_forward", "CUDA")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate):
    n, c = x.shape[:2]
    r = fc1_weight.shape[0]
    vec = dict(dtype=_compute_dtype(x), device=x.device)
    return torch.empty_like(x), x.new_empty((n, c), **vec), x.new_empty((n, r), **vec), x.new_empty((n, c), **vec)


def _backward_fake(grad_y, x, fc1_weight, fc2_weight, z, a, e, act, gate, has_fc1_bias, has_fc2_bias, need_dx,
                   need_weight_grads):
    c, r = x.shape[1], fc1_weight.shape[0]

    def param(*shape, needed=True):
        return fc1_weight.new_empty(shape if needed and need_weight_grads else (0,))

    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, param(r, c), param(r, needed=has_fc1_bias), param(c, r), param(c, needed=has_fc2_bias)


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate = inputs
    _, z, a, e = output
    ctx.save_for_backward(x, fc1_weight, fc2_weight, z, a, e)
    ctx.act, ctx.gate = act, gate
    ctx.has_biases = fc1_bias is not None, fc2_bias is not None
    ctx.mark_non_differentiable(z, a, e)


def _backward(ctx, grad_y, _grad_z, _grad_a, _grad_e):
    x, w1, w2, z, a, e = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_weights = any(need[1:5])
    record_launch(f"se_backward_{x.device.type}")
    if need_weights and x.is_cuda:
        record_launch("se_weight_grad_cuda")  # the CPU kernel sums weight gradients in the same call
    dx, dw1, db1, dw2, db2 = torch.ops.se_fused.se_backward(
        grad_y, x, w1, w2, z, a, e, ctx.act, ctx.gate, *ctx.has_biases, need[0], need_weights)
    has_b1, has_b2 = ctx.has_biases
    return (dx if need[0] else None, dw1 if need_weights else None, db1 if need_weights and has_b1 else None,
            dw2 if need_weights else None, db2 if need_weights and has_b2 else None, None, None)


if extension_available():
    torch.library.register_fake("se_fused::se_forward")(_forward_fake)
    torch.library.register_fake("se_fused::se_backward")(_backward_fake)
    torch.library.register_autograd("se_fused::se_forward", _backward, setup_context=_setup_context)


def squeeze_excite_op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate) -> torch.Tensor:
    """y from the compiled op; weights as 2-D (R, C) and (C, R)."""
    record_launch(f"se_forward_{x.device.type}")
    return torch.ops.se_fused.se_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)[0]
