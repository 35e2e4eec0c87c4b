"""Fused SE forward in one launch: squeeze, excitation MLP and rescale (with the residual tail,
y = out_act(x · s + residual), in the rescale).

Saves for backward only O(N·C) vectors: z (pooled input), a (fc1 output,
pre-activation) and e (fc2 output, pre-gate), in the compute dtype (float32,
or float64 for float64 input).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..debug import new_output
from ..spec import spatial_strides
from .device import (
    activation,
    arrive_reduced,
    decode_ticket,
    gate,
    next_ticket,
    publish,
    reduce_chunk,
    release_rescaled,
    retire,
    scale_chunk,
    sum_partials,
    wait_published,
)
from .schedule import (
    ACT_CODES,
    GATE_CODES,
    OUT_ACT_CODES,
    MAIN_KERNEL_WARPS,
    choose_schedule,
    launch,
    mlp_blocks,
    workspace,
)


@triton.jit
def _excite(
    n, partial_ptr, num_segments, C, R, P,
    w1_ptr, stride_w1r, stride_w1c, b1_ptr, w2_ptr, stride_w2c, stride_w2r, b2_ptr,
    z_ptr, a_ptr, e_ptr,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CM: tl.constexpr,
):
    """z = Σ partials / P, a = W1 z + b1, e = W2 act(a) + b2 for sample n; stores z, a, e."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    a = tl.zeros([BLOCK_R], dtype=z_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_CM):
        offs_c = c0 + tl.arange(0, BLOCK_CM)
        mask_c = offs_c < C
        z = sum_partials(partial_ptr, n, num_segments, offs_c, mask_c, C) / P
        tl.store(z_ptr + n * C + offs_c, z, mask=mask_c)
        w1 = tl.load(w1_ptr + offs_r[:, None] * stride_w1r + offs_c[None, :] * stride_w1c,
                     mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(a.dtype)
        a += tl.sum(w1 * z[None, :], axis=1)
    if HAS_B1:
        a += tl.load(b1_ptr + offs_r, mask=mask_r, other=0.0).to(a.dtype)
    tl.store(a_ptr + n * R + offs_r, a, mask=mask_r)
    h = tl.where(mask_r, activation(a, ACT), 0.0)
    for c0 in range(0, C, BLOCK_CM):
        offs_c = c0 + tl.arange(0, BLOCK_CM)
        mask_c = offs_c < C
        w2 = tl.load(w2_ptr + offs_c[:, None] * stride_w2c + offs_r[None, :] * stride_w2r,
                     mask=mask_c[:, None] & mask_r[None, :], other=0.0).to(a.dtype)
        e = tl.sum(w2 * h[None, :], axis=1)
        if HAS_B2:
            e += tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(a.dtype)
        tl.store(e_ptr + n * C + offs_c, e, mask=mask_c)


@triton.jit
def _rescale(
    n, c0, p_start, p_end, C, e_ptr,
    x_ptr, x_base, stride_xc, stride_xp, y_ptr, y_base, stride_yc, stride_yp,
    res_ptr, stride_rn, stride_rc, stride_rp,
    GATE: tl.constexpr, HAS_RES: tl.constexpr, OUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = out_act(x · gate(e) (+ residual)) over one item."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    e = tl.load(e_ptr + n * C + offs_c, mask=offs_c < C, other=0.0, cache_modifier=".cg")
    s = gate(e, GATE)
    scale_chunk(x_ptr, x_base, stride_xc, stride_xp, y_ptr, y_base, stride_yc, stride_yp,
                s, s, c0, p_start, p_end, C, res_ptr, n.to(tl.int64) * stride_rn, stride_rc, stride_rp,
                False, HAS_RES, OUT, BLOCK_C, BLOCK_P)


@triton.jit(do_not_specialize=["N"])
def se_forward_kernel(
    x_ptr, res_ptr, y_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    z_ptr, a_ptr, e_ptr,
    partial_ptr, ticket_ptr, counter_ptr, flag_ptr,
    N, C, R, P,
    stride_xn, stride_xc, stride_xp, stride_rn, stride_rc, stride_rp, stride_yn, stride_yc, stride_yp,
    stride_w1r, stride_w1c, stride_w2c, stride_w2r,
    seg_len, num_segments, items_per_sample, group_size, num_groups, num_tickets,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HAS_RES: tl.constexpr, OUT: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CM: tl.constexpr,
):
    if not SPLIT:
        # One program per sample: reduce, MLP, rescale; the second read of x hits cache.
        n = tl.program_id(0)
        x_base = n.to(tl.int64) * stride_xn
        y_base = n.to(tl.int64) * stride_yn
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            sums = reduce_chunk(x_ptr, x_base, stride_xc, stride_xp, x_ptr, x_base, stride_xc, stride_xp,
                                partial_ptr, c0, 0, P, C, False, BLOCK_C, BLOCK_P)
            tl.store(partial_ptr + n * C + offs_c, sums, mask=offs_c < C)
        tl.debug_barrier()
        _excite(n, partial_ptr, 1, C, R, P, w1_ptr, stride_w1r, stride_w1c, b1_ptr,
                w2_ptr, stride_w2c, stride_w2r, b2_ptr, z_ptr, a_ptr, e_ptr,
                ACT, GATE, HAS_B1, HAS_B2, BLOCK_R, BLOCK_CM)
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            _rescale(n, c0, 0, P, C, e_ptr, x_ptr, x_base, stride_xc, stride_xp,
                     y_ptr, y_base, stride_yc, stride_yp, res_ptr, stride_rn, stride_rc, stride_rp,
                     GATE, HAS_RES, OUT, BLOCK_C, BLOCK_P)
    else:
        ticket = next_ticket(ticket_ptr)
        while ticket < num_tickets:
            is_reduce, n, item = decode_ticket(ticket, items_per_sample, group_size, num_groups)
            seg = item % num_segments
            c0 = (item // num_segments) * BLOCK_C
            p_start = seg * seg_len
            p_end = tl.minimum(p_start + seg_len, P)
            x_base = n.to(tl.int64) * stride_xn
            if n < N:
                if is_reduce:
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    sums = reduce_chunk(x_ptr, x_base, stride_xc, stride_xp, x_ptr, x_base, stride_xc, stride_xp,
                                        partial_ptr, c0, p_start, p_end, C, False, BLOCK_C, BLOCK_P)
                    tl.store(partial_ptr + (n * num_segments + seg) * C + offs_c, sums, mask=offs_c < C)
                    if arrive_reduced(counter_ptr, n, items_per_sample):
                        _excite(n, partial_ptr, num_segments, C, R, P, w1_ptr, stride_w1r, stride_w1c, b1_ptr,
                                w2_ptr, stride_w2c, stride_w2r, b2_ptr, z_ptr, a_ptr, e_ptr,
                                ACT, GATE, HAS_B1, HAS_B2, BLOCK_R, BLOCK_CM)
                        publish(flag_ptr, n)
                else:
                    wait_published(flag_ptr, n)
                    _rescale(n, c0, p_start, p_end, C, e_ptr, x_ptr, x_base, stride_xc, stride_xp,
                             y_ptr, n.to(tl.int64) * stride_yn, stride_yc, stride_yp,
                             res_ptr, stride_rn, stride_rc, stride_rp, GATE, HAS_RES, OUT, BLOCK_C, BLOCK_P)
                    release_rescaled(counter_ptr, flag_ptr, n, items_per_sample)
            ticket = next_ticket(ticket_ptr)
        retire(ticket_ptr, ticket, num_tickets)


def se_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, act: str, gate_name: str, residual: torch.Tensor | None = None,
               out_act: str = "none"):
    """Returns (y, z, a, e), y = out_act(x * s + residual). x (and residual): (N, C, H, W) with H, W
    flattenable; w1 (R, C), w2 (C, R) 2-D views."""
    n, c, h, w = x.shape
    r, p = w1.shape[0], h * w
    x_strides = spatial_strides(x)
    residual_strides = spatial_strides(residual) if residual is not None else x_strides
    y = new_output(None, like=x)
    y_strides = spatial_strides(y)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = new_output((n, c), dtype=compute_dtype, device=x.device)
    a = new_output((n, r), dtype=compute_dtype, device=x.device)
    e = new_output((n, c), dtype=compute_dtype, device=x.device)
    if n == 0:
        return y, z, a, e

    sched = choose_schedule(n, c, p, x_strides[1] == 1, x.element_size(), x.device)
    ws = workspace(x.device)
    ticket, counters, flags = ws.counters(n)
    partial = ws.partial(n * sched.num_segments * c, compute_dtype)
    block_r, block_cm = mlp_blocks(c, r)
    launch(
        se_forward_kernel, (sched.num_programs,),
        x, x if residual is None else residual, y, w1, w1 if b1 is None else b1, w2, w2 if b2 is None else b2,
        z, a, e, partial, ticket, counters, flags,
        n, c, r, p, *x_strides, *residual_strides, *y_strides, *w1.stride(), *w2.stride(),
        sched.seg_len, sched.num_segments, sched.items_per_sample, sched.group_size, sched.num_groups,
        sched.num_tickets,
        ACT=ACT_CODES[act], GATE=GATE_CODES[gate_name], HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        HAS_RES=residual is not None, OUT=OUT_ACT_CODES[out_act], SPLIT=sched.split, BLOCK_C=sched.block_c, BLOCK_P=sched.block_p, BLOCK_R=block_r, BLOCK_CM=block_cm,
        num_warps=MAIN_KERNEL_WARPS,
    )
    return y, z, a, e
