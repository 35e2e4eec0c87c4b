"""Fused SE backward in two launches.

1. ``se_backward_kernel`` (same schedule as the forward): reduce ds = Σ_p g·x per
   (n, c); the last item of a sample runs the MLP backward for it, storing
   de = ds·gate'(e) (N×C), da = (W2ᵀ de)·act'(a) (N×R) and dz/P = (W1ᵀ da)/P;
   rescale items write dx = g·s + dz/P. With the residual tail, g is replaced by the gradient
   at the tail's input dt = g·out_act'(·), computed in both passes from g and y (ReLU) or
   x·s + residual (SiLU); the reduce pass writes it as d_residual when asked.
2. ``se_weight_grad_kernel``: dW2 = deᵀ act(a), db2 = Σ de, dW1 = daᵀ z,
   db1 = Σ da, summed over the batch in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..debug import new_output
from ..spec import spatial_strides
from .device import (
    activation,
    activation_backward,
    arrive_reduced,
    decode_ticket,
    gate,
    gate_backward,
    next_ticket,
    publish,
    reduce_chunk,
    release_rescaled,
    retire,
    scale_chunk,
    sum_partials,
    tail_grad_tile,
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
def _excite_backward(
    n, partial_ptr, num_segments, C, R, P,
    w1_ptr, stride_w1r, stride_w1c, w2_ptr, stride_w2c, stride_w2r,
    a_ptr, e_ptr, de_ptr, da_ptr, dzp_ptr,
    ACT: tl.constexpr, GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_CM: tl.constexpr,
):
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    dh = tl.zeros([BLOCK_R], dtype=de_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_CM):
        offs_c = c0 + tl.arange(0, BLOCK_CM)
        mask_c = offs_c < C
        ds = sum_partials(partial_ptr, n, num_segments, offs_c, mask_c, C)
        e = tl.load(e_ptr + n * C + offs_c, mask=mask_c, other=0.0)
        de = gate_backward(ds, e, GATE)
        tl.store(de_ptr + n * C + offs_c, de, mask=mask_c)
        w2 = tl.load(w2_ptr + offs_c[:, None] * stride_w2c + offs_r[None, :] * stride_w2r,
                     mask=mask_c[:, None] & mask_r[None, :], other=0.0).to(dh.dtype)
        dh += tl.sum(w2 * de[:, None], axis=0)
    a = tl.load(a_ptr + n * R + offs_r, mask=mask_r, other=0.0)
    da = tl.where(mask_r, activation_backward(dh, a, ACT), 0.0)
    tl.store(da_ptr + n * R + offs_r, da, mask=mask_r)
    for c0 in range(0, C, BLOCK_CM):
        offs_c = c0 + tl.arange(0, BLOCK_CM)
        mask_c = offs_c < C
        w1 = tl.load(w1_ptr + offs_r[:, None] * stride_w1r + offs_c[None, :] * stride_w1c,
                     mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(dh.dtype)
        dz = tl.sum(w1 * da[:, None], axis=0)
        tl.store(dzp_ptr + n * C + offs_c, dz / P, mask=mask_c)


@triton.jit
def _reduce_tail(
    n, c0, p_start, p_end, C, e_ptr,
    g_ptr, g_base, stride_gc, stride_gp, x_ptr, x_base, stride_xc, stride_xp,
    u_ptr, stride_un, stride_uc, stride_up, res_ptr, stride_rn, stride_rc, stride_rp,
    dres_ptr, stride_dn, stride_dc, stride_dp, acc_ptr,
    GATE: tl.constexpr, OUT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_DRES: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Σ_p dt·x per channel over positions [p_start, p_end), dt the gradient at the tail's input
    (stored as d_residual when WRITE_DRES)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    s = gate(tl.load(e_ptr + n * C + offs_c, mask=mask_c, other=0.0), GATE)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_ptr.dtype.element_ty)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = mask_c[:, None] & (offs_p[None, :] < p_end)
        dt = tail_grad_tile(g_ptr, g_base, stride_gc, stride_gp, u_ptr, n.to(tl.int64) * stride_un, stride_uc,
                            stride_up, res_ptr, n.to(tl.int64) * stride_rn, stride_rc, stride_rp,
                            s, offs_c, offs_p, mask, OUT, HAS_RES)
        if WRITE_DRES:
            tl.store(dres_ptr + n.to(tl.int64) * stride_dn + offs_c[:, None] * stride_dc + offs_p[None, :] * stride_dp,
                     dt.to(dres_ptr.dtype.element_ty), mask=mask)
        x = tl.load(x_ptr + x_base + offs_c[:, None] * stride_xc + offs_p[None, :] * stride_xp,
                    mask=mask, other=0.0).to(acc.dtype)
        acc += dt.to(acc.dtype) * x
    return tl.sum(acc, axis=1)


@triton.jit
def _rescale_grad(
    n, c0, p_start, p_end, C, e_ptr, dzp_ptr,
    g_ptr, g_base, stride_gc, stride_gp, dx_ptr, dx_base, stride_dc, stride_dp,
    u_ptr, stride_un, stride_uc, stride_up, res_ptr, stride_rn, stride_rc, stride_rp,
    GATE: tl.constexpr, OUT: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dx = dt · gate(e) + dz/P over one item, dt = g (no tail) or the gradient at the tail's input."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    e = tl.load(e_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    dzp = tl.load(dzp_ptr + n * C + offs_c, mask=mask_c, other=0.0, cache_modifier=".cg")
    s = gate(e, GATE)
    if OUT == 0:
        scale_chunk(g_ptr, g_base, stride_gc, stride_gp, dx_ptr, dx_base, stride_dc, stride_dp,
                    s, dzp, c0, p_start, p_end, C, g_ptr, 0, 0, 0, True, False, 0, BLOCK_C, BLOCK_P)
    else:
        for p0 in range(p_start, p_end, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask = mask_c[:, None] & (offs_p[None, :] < p_end)
            dt = tail_grad_tile(g_ptr, g_base, stride_gc, stride_gp, u_ptr, n.to(tl.int64) * stride_un, stride_uc,
                                stride_up, res_ptr, n.to(tl.int64) * stride_rn, stride_rc, stride_rp,
                                s, offs_c, offs_p, mask, OUT, HAS_RES)
            tl.store(dx_ptr + dx_base + offs_c[:, None] * stride_dc + offs_p[None, :] * stride_dp,
                     (dt * s[:, None] + dzp[:, None]).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N"])
def se_backward_kernel(
    g_ptr, x_ptr, dx_ptr, w1_ptr, w2_ptr,
    a_ptr, e_ptr, de_ptr, da_ptr, dzp_ptr,
    u_ptr, res_ptr, dres_ptr,
    partial_ptr, ticket_ptr, counter_ptr, flag_ptr,
    N, C, R, P,
    stride_gn, stride_gc, stride_gp, stride_xn, stride_xc, stride_xp, stride_dn, stride_dc, stride_dp,
    stride_un, stride_uc, stride_up, stride_rn, stride_rc, stride_rp, stride_tn, stride_tc, stride_tp,
    stride_w1r, stride_w1c, stride_w2c, stride_w2r,
    seg_len, num_segments, items_per_sample, group_size, num_groups, num_tickets,
    ACT: tl.constexpr, GATE: tl.constexpr, WRITE_DX: tl.constexpr,
    OUT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_DRES: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CM: tl.constexpr,
):
    if not SPLIT:
        n = tl.program_id(0)
        g_base = n.to(tl.int64) * stride_gn
        x_base = n.to(tl.int64) * stride_xn
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            if OUT == 0:
                sums = reduce_chunk(g_ptr, g_base, stride_gc, stride_gp, x_ptr, x_base, stride_xc, stride_xp,
                                    partial_ptr, c0, 0, P, C, True, BLOCK_C, BLOCK_P)
            else:
                sums = _reduce_tail(n, c0, 0, P, C, e_ptr, g_ptr, g_base, stride_gc, stride_gp,
                                    x_ptr, x_base, stride_xc, stride_xp, u_ptr, stride_un, stride_uc, stride_up,
                                    res_ptr, stride_rn, stride_rc, stride_rp, dres_ptr, stride_tn, stride_tc, stride_tp,
                                    partial_ptr, GATE, OUT, HAS_RES, WRITE_DRES, BLOCK_C, BLOCK_P)
            tl.store(partial_ptr + n * C + offs_c, sums, mask=offs_c < C)
        tl.debug_barrier()
        _excite_backward(n, partial_ptr, 1, C, R, P, w1_ptr, stride_w1r, stride_w1c, w2_ptr, stride_w2c,
                         stride_w2r, a_ptr, e_ptr, de_ptr, da_ptr, dzp_ptr, ACT, GATE, BLOCK_R, BLOCK_CM)
        if WRITE_DX:
            tl.debug_barrier()
            for c0 in range(0, C, BLOCK_C):
                _rescale_grad(n, c0, 0, P, C, e_ptr, dzp_ptr, g_ptr, g_base, stride_gc, stride_gp,
                              dx_ptr, n.to(tl.int64) * stride_dn, stride_dc, stride_dp,
                              u_ptr, stride_un, stride_uc, stride_up, res_ptr, stride_rn, stride_rc, stride_rp,
                              GATE, OUT, HAS_RES, BLOCK_C, BLOCK_P)
    else:
        ticket = next_ticket(ticket_ptr)
        while ticket < num_tickets:
            is_reduce, n, item = decode_ticket(ticket, items_per_sample, group_size, num_groups)
            seg = item % num_segments
            c0 = (item // num_segments) * BLOCK_C
            p_start = seg * seg_len
            p_end = tl.minimum(p_start + seg_len, P)
            g_base = n.to(tl.int64) * stride_gn
            if n < N:
                if is_reduce:
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    x_base = n.to(tl.int64) * stride_xn
                    if OUT == 0:
                        sums = reduce_chunk(g_ptr, g_base, stride_gc, stride_gp, x_ptr, x_base, stride_xc, stride_xp,
                                            partial_ptr, c0, p_start, p_end, C, True, BLOCK_C, BLOCK_P)
                    else:
                        sums = _reduce_tail(n, c0, p_start, p_end, C, e_ptr, g_ptr, g_base, stride_gc, stride_gp,
                                            x_ptr, x_base, stride_xc, stride_xp, u_ptr, stride_un, stride_uc,
                                            stride_up, res_ptr, stride_rn, stride_rc, stride_rp,
                                            dres_ptr, stride_tn, stride_tc, stride_tp, partial_ptr,
                                            GATE, OUT, HAS_RES, WRITE_DRES, BLOCK_C, BLOCK_P)
                    tl.store(partial_ptr + (n * num_segments + seg) * C + offs_c, sums, mask=offs_c < C)
                    if arrive_reduced(counter_ptr, n, items_per_sample):
                        _excite_backward(n, partial_ptr, num_segments, C, R, P, w1_ptr, stride_w1r, stride_w1c,
                                         w2_ptr, stride_w2c, stride_w2r, a_ptr, e_ptr, de_ptr, da_ptr, dzp_ptr,
                                         ACT, GATE, BLOCK_R, BLOCK_CM)
                        publish(flag_ptr, n)
                else:
                    wait_published(flag_ptr, n)
                    if WRITE_DX:
                        _rescale_grad(n, c0, p_start, p_end, C, e_ptr, dzp_ptr, g_ptr, g_base, stride_gc, stride_gp,
                                      dx_ptr, n.to(tl.int64) * stride_dn, stride_dc, stride_dp,
                                      u_ptr, stride_un, stride_uc, stride_up, res_ptr, stride_rn, stride_rc, stride_rp,
                                      GATE, OUT, HAS_RES, BLOCK_C, BLOCK_P)
                    release_rescaled(counter_ptr, flag_ptr, n, items_per_sample)
            ticket = next_ticket(ticket_ptr)
        retire(ticket_ptr, ticket, num_tickets)


@triton.jit(do_not_specialize=["N"])
def se_weight_grad_kernel(
    de_ptr, da_ptr, z_ptr, a_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    N, C, R, stride_dw1r, stride_dw1c, stride_dw2c, stride_dw2r,
    ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (i, j) owns channels block i × hidden block j of dW2 and dW1ᵀ."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_c = offs_c < C
    mask_r = offs_r < R
    acc_dtype = de_ptr.dtype.element_ty
    dw2 = tl.zeros([BLOCK_C, BLOCK_R], dtype=acc_dtype)
    dw1_t = tl.zeros([BLOCK_C, BLOCK_R], dtype=acc_dtype)
    db2 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    db1 = tl.zeros([BLOCK_R], dtype=acc_dtype)
    for n in range(0, N):
        de = tl.load(de_ptr + n * C + offs_c, mask=mask_c, other=0.0)
        z = tl.load(z_ptr + n * C + offs_c, mask=mask_c, other=0.0)
        da = tl.load(da_ptr + n * R + offs_r, mask=mask_r, other=0.0)
        h = activation(tl.load(a_ptr + n * R + offs_r, mask=mask_r, other=0.0), ACT)
        dw2 += de[:, None] * h[None, :]
        dw1_t += z[:, None] * da[None, :]
        db2 += de
        db1 += da
    mask = mask_c[:, None] & mask_r[None, :]
    tl.store(dw2_ptr + offs_c[:, None] * stride_dw2c + offs_r[None, :] * stride_dw2r,
             dw2.to(dw2_ptr.dtype.element_ty), mask=mask)
    tl.store(dw1_ptr + offs_r[None, :] * stride_dw1r + offs_c[:, None] * stride_dw1c,
             dw1_t.to(dw1_ptr.dtype.element_ty), mask=mask)
    if HAS_B2:
        tl.store(db2_ptr + offs_c, db2.to(db2_ptr.dtype.element_ty), mask=mask_c & (pid_r == 0))
    if HAS_B1:
        tl.store(db1_ptr + offs_r, db1.to(db1_ptr.dtype.element_ty), mask=mask_r & (pid_c == 0))


def se_backward(g: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, z: torch.Tensor,
                a: torch.Tensor, e: torch.Tensor, act: str, gate_name: str, has_b1: bool, has_b2: bool, need_dx: bool,
                need_weight_grads: bool, y: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                out_act: str = "none", need_residual_grad: bool = False):
    """Returns (dx, dw1, db1, dw2, db2, d_residual), empty tensors for what is not needed; dw1 (R, C),
    dw2 (C, R). The tail's backward reads y (out_act "relu") or x and the residual ("silu")."""
    n, c, h, w = x.shape
    r, p = w1.shape[0], h * w
    param_dtype = w1.dtype
    x_strides = spatial_strides(x)
    g_strides = spatial_strides(g)
    if g_strides is None:
        g = g.contiguous(memory_format=torch.channels_last if x_strides[1] == 1 else torch.contiguous_format)
        g_strides = spatial_strides(g)
    dx = new_output(None, like=x) if need_dx else x.new_empty((0,))
    dx_strides = spatial_strides(dx) if need_dx else (0, 0, 0)
    write_dres = need_residual_grad and out_act != "none"
    d_residual = new_output(None, like=x) if write_dres else x.new_empty((0,))
    u = y if out_act == "relu" else x  # what the tail's gradient is computed from (with s and the residual)
    has_res = out_act == "silu" and residual is not None

    def param_grad(*shape, needed=True):  # a new tensor each: outputs of an op must not alias
        return new_output(shape if needed and need_weight_grads else (0,), dtype=param_dtype, device=x.device)

    dw1, dw2 = param_grad(r, c), param_grad(c, r)
    db1, db2 = param_grad(r, needed=has_b1), param_grad(c, needed=has_b2)
    if n == 0:  # a sum over an empty batch
        for t in (dw1, dw2, db1, db2):
            t.zero_()
        return dx, dw1, db1, dw2, db2, d_residual
    de = new_output((n, c), dtype=z.dtype, device=x.device)
    da = new_output((n, r), dtype=z.dtype, device=x.device)
    dzp = new_output((n, c), dtype=z.dtype, device=x.device)

    sched = choose_schedule(n, c, p, x_strides[1] == 1, x.element_size(), x.device)
    ws = workspace(x.device)
    ticket, counters, flags = ws.counters(n)
    partial = ws.partial(n * sched.num_segments * c, z.dtype)
    block_r, block_cm = mlp_blocks(c, r)
    launch(
        se_backward_kernel, (sched.num_programs,),
        g, x, x if not need_dx else dx, w1, w2, a, e, de, da, dzp,
        x if u is None else u, residual if has_res else x, d_residual if write_dres else x,
        partial, ticket, counters, flags,
        n, c, r, p, *g_strides, *x_strides, *dx_strides,
        *(spatial_strides(u) if u is not None else x_strides), *(spatial_strides(residual) if has_res else x_strides),
        *(spatial_strides(d_residual) if write_dres else x_strides), *w1.stride(), *w2.stride(),
        sched.seg_len, sched.num_segments, sched.items_per_sample, sched.group_size, sched.num_groups,
        sched.num_tickets,
        ACT=ACT_CODES[act], GATE=GATE_CODES[gate_name], WRITE_DX=need_dx,
        OUT=OUT_ACT_CODES[out_act], HAS_RES=has_res, WRITE_DRES=write_dres,
        SPLIT=sched.split, BLOCK_C=sched.block_c, BLOCK_P=sched.block_p, BLOCK_R=block_r, BLOCK_CM=block_cm,
        num_warps=MAIN_KERNEL_WARPS,
    )
    if not need_weight_grads:
        return dx, dw1, db1, dw2, db2, d_residual

    block_c = min(triton.next_power_of_2(c), 32)  # two 32x32 accumulators: no spills even in float64
    block_r = min(triton.next_power_of_2(r), 32)
    launch(
        se_weight_grad_kernel, (triton.cdiv(c, block_c), triton.cdiv(r, block_r)),
        de, da, z, a, dw1, dw1 if not has_b1 else db1, dw2, dw2 if not has_b2 else db2,
        n, c, r, *dw1.stride(), *dw2.stride(),
        ACT=ACT_CODES[act], HAS_B1=has_b1, HAS_B2=has_b2, BLOCK_C=block_c, BLOCK_R=block_r,
    )
    return dx, dw1, db1, dw2, db2, d_residual
