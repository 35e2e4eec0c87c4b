"""The vocabulary every layer shares: what an SE problem is, and the checks that keep bad input
away from the kernels.

Names (activations, gates, backends), the dtypes x and the parameters may have, the compute
dtype of the saved vectors, the (N, C, P) stride view of x, the kernels' hidden-width limits,
and ``check_inputs``, which every call passes through before any kernel runs.
"""

from __future__ import annotations

import torch

ACTIVATIONS = ("relu", "silu")
GATES = ("sigmoid", "hard_sigmoid")
OUT_ACTIVATIONS = ("none", "relu", "silu")  # of the fused residual tail, y = out_act(x * s + residual)
BACKENDS = ("auto", "cuda", "cpp", "triton", "torch")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def hidden_width(channels: int, reduction: int, rd_channels: int | None) -> int:
    """R = ``rd_channels`` if given, else ``max(1, channels // reduction)``."""
    if rd_channels is not None:
        if not isinstance(rd_channels, int) or rd_channels < 1:
            raise ValueError(f"rd_channels must be a positive int, got {rd_channels!r}")
        return rd_channels
    if not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"reduction must be a positive int, got {reduction!r}")
    return max(1, channels // reduction)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of accumulation and of the saved vectors z, a, e: float64 for float64 x, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def spatial_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_p) when H and W flatten into one position axis P, else None.

    True for NCHW-contiguous and channels_last tensors (and any other strides where
    stride_h = W * stride_w), so the kernels read them without a copy.
    """
    _, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if w == 1:
        return sn, sc, sh
    if h == 1 or sh == w * sw:
        return sn, sc, sw
    return None


def flattenable(x: torch.Tensor) -> torch.Tensor:
    """x itself when H and W flatten into one strided axis, else a contiguous copy."""
    return x if spatial_strides(x) is not None else x.contiguous()


def _check_tensor(name: str, t: object, ndims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(t.shape)}")


def check_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act: str, gate: str, residual=None,
                 out_act: str = "none") -> None:
    """Every argument of ``squeeze_excite``, checked before any kernel runs; messages name the argument."""
    check_choice("act", act, ACTIVATIONS)
    check_choice("gate", gate, GATES)
    check_choice("out_act", out_act, OUT_ACTIVATIONS)
    _check_tensor("x", x, (4,))
    if x.dtype not in INPUT_DTYPES:
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
    if r == 0:
        raise ValueError(f"fc1_weight must have at least one output (hidden unit), got shape {tuple(fc1_weight.shape)}")
    params = [("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)]
    for name, bias, size in (("fc1_bias", fc1_bias, r), ("fc2_bias", fc2_bias, c)):
        if bias is not None:
            _check_tensor(name, bias, (1,))
            if bias.shape[0] != size:
                raise ValueError(f"{name} must have shape ({size},), got {tuple(bias.shape)}")
            params.append((name, bias))
    half_x = x.dtype in (torch.float16, torch.bfloat16)
    for name, t in params:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
        if t.dtype != fc1_weight.dtype or not (t.dtype == x.dtype or (half_x and t.dtype == torch.float32)):
            allowed = f"{x.dtype} or torch.float32" if half_x else str(x.dtype)
            raise TypeError(f"{name} has dtype {t.dtype}; parameters must all be {allowed} for x of dtype {x.dtype}")
    if residual is not None:
        check_like_x("residual", residual, x)


def check_like_x(name: str, t, x) -> None:
    """A full-size tensor beside x (the residual, the output y): x's shape, dtype and device."""
    _check_tensor(name, t, (4,))
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_backward_tail(grad_y, x, y, residual, out_act: str) -> None:
    """The full-size arguments of a backward op: grad_y always; y when out_act is "relu" (its mask);
    for "silu" the residual when the forward had one (to recompute the activation's input)."""
    check_choice("out_act", out_act, OUT_ACTIVATIONS)
    check_like_x("grad_y", grad_y, x)
    for name, t, needed in (("y", y, out_act == "relu"), ("residual", residual, False)):
        if t is not None:
            check_like_x(name, t, x)
        elif needed:
            raise ValueError(f"the backward of out_act={out_act!r} needs {name}, got None")
