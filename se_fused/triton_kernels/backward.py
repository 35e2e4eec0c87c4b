"""Fused SE backward in one launch (the schedule is in schedule.py):

* reduce items: ds = Σ_p g·x per (n, c) partial sums;
* MLP tiles over a group's samples: M1 (hidden units) da = act'(a) · (de W2) with
  de = gate'(e) · ds; M2 (channels) stores de and dz/P = (da W1)/P;
* rescale items: dx = g·s + dz/P;
* weight-gradient tiles, once every group's MLP tiles are done: dW2 = deᵀ act(a), db2 = Σ de,
  dW1 = daᵀ z, db1 = Σ da, summed over the batch in a fixed order (deterministic, no atomics on data).

With the residual tail, g is replaced by the gradient at the tail's input dt = g·out_act'(·),
computed in both memory passes from g and y (ReLU) or x·s + residual (SiLU); the reduce pass
writes it as d_residual when asked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..debug import new_output
from ..spec import spatial_strides
from .device import (
    PHASE_FC1,
    PHASE_FC2,
    PHASE_REDUCE,
    PHASE_RESCALE,
    activation,
    activation_backward,
    aligned_view,
    arrive,
    arrive_last,
    gate,
    gate_backward,
    load_block,
    locate_work,
    mma,
    multiple,
    next_ticket,
    partial_sums,
    reduce_chunk,
    retire,
    scale_chunk,
    tail_grad_tile,
    wait_count,
)
from .schedule import (
    ACT_CODES,
    DOT_MIN,
    GATE_CODES,
    HALF_TYPES,
    OUT_ACT_CODES,
    WGRAD_SAMPLES,
    LaunchConfig,
    candidate_configs,
    choose_schedule,
    launch,
    pick_config,
    uses_interpreter,
    vector_alignment,
    views_key,
    workspace,
)


@triton.jit
def _grad_fc1_tile(
    n0, n1, tile, C, R, num_segments, partial_ptr, e_ptr, a_ptr, w2_ptr, stride_w2c, stride_w2r, da_ptr,
    ACT: tl.constexpr, GATE: tl.constexpr, HALF_WEIGHTS: tl.constexpr, HALF_AS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """da = act'(a) · (de W2) for hidden units [tile·BLOCK_R, +BLOCK_R) of samples [n0, n1),
    de = gate'(e) · Σ partials."""
    offs_r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    for m0 in range(n0, n1, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n1
        dh = tl.zeros([BLOCK_M, BLOCK_R], dtype=da_ptr.dtype.element_ty)
        for c0 in range(0, C, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < C
            ds = partial_sums(partial_ptr, offs_m, mask_m, num_segments, offs_c, mask_c, C)
            de = gate_backward(ds, load_block(e_ptr, offs_m, mask_m, C, offs_c, mask_c, 1, False), GATE)
            w2 = load_block(w2_ptr, offs_c, mask_c, stride_w2c, offs_r, mask_r, stride_w2r, False)
            dh = mma(de, w2, dh, HALF_WEIGHTS, HALF_AS_FP32)
        a = load_block(a_ptr, offs_m, mask_m, R, offs_r, mask_r, 1, False)
        tl.store(da_ptr + offs_m[:, None] * R + offs_r[None, :], activation_backward(dh, a, ACT),
                 mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _grad_fc2_tile(
    n0, n1, tile, C, R, P, num_segments, partial_ptr, e_ptr, da_ptr, w1_ptr, stride_w1r, stride_w1c,
    de_ptr, dzp_ptr,
    GATE: tl.constexpr, HALF_WEIGHTS: tl.constexpr, HALF_AS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """de = gate'(e) · Σ partials and dz/P = (da W1)/P for channels [tile·BLOCK_C, +BLOCK_C) of
    samples [n0, n1)."""
    offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    for m0 in range(n0, n1, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n1
        mask = mask_m[:, None] & mask_c[None, :]
        ds = partial_sums(partial_ptr, offs_m, mask_m, num_segments, offs_c, mask_c, C)
        de = gate_backward(ds, load_block(e_ptr, offs_m, mask_m, C, offs_c, mask_c, 1, False), GATE)
        tl.store(de_ptr + offs_m[:, None] * C + offs_c[None, :], de, mask=mask)
        dz = tl.zeros([BLOCK_M, BLOCK_C], dtype=de_ptr.dtype.element_ty)
        for r0 in range(0, R, BLOCK_K):
            offs_r = r0 + tl.arange(0, BLOCK_K)
            mask_r = offs_r < R
            da = load_block(da_ptr, offs_m, mask_m, R, offs_r, mask_r, 1, True)
            w1 = load_block(w1_ptr, offs_r, mask_r, stride_w1r, offs_c, mask_c, stride_w1c, False)
            dz = mma(da, w1, dz, HALF_WEIGHTS, HALF_AS_FP32)
        tl.store(dzp_ptr + offs_m[:, None] * C + offs_c[None, :], dz / P, mask=mask)


@triton.jit
def _weight_grad_tile(
    tile, N, C, R, de_ptr, da_ptr, z_ptr, a_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    stride_dw1r, stride_dw1c, stride_dw2c, stride_dw2r,
    ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Channels × hidden units tile `tile` of dW2 = deᵀ act(a) and dW1ᵀ = zᵀ da (with db2, db1 on the
    first tile row/column), summed over the batch BLOCK_N samples at a time, in order."""
    r_tiles = tl.cdiv(R, BLOCK)
    offs_c = (tile // r_tiles) * BLOCK + tl.arange(0, BLOCK)
    offs_r = (tile % r_tiles) * BLOCK + tl.arange(0, BLOCK)
    mask_c = offs_c < C
    mask_r = offs_r < R
    acc_dtype = de_ptr.dtype.element_ty
    dw2 = tl.zeros([BLOCK, BLOCK], dtype=acc_dtype)
    dw1_t = tl.zeros([BLOCK, BLOCK], dtype=acc_dtype)
    db2 = tl.zeros([BLOCK], dtype=acc_dtype)
    db1 = tl.zeros([BLOCK], dtype=acc_dtype)
    for m0 in range(0, N, BLOCK_N):
        offs_m = m0 + tl.arange(0, BLOCK_N)
        mask_m = offs_m < N
        de_t = load_block(de_ptr, offs_c, mask_c, 1, offs_m, mask_m, C, True)
        h = activation(load_block(a_ptr, offs_m, mask_m, R, offs_r, mask_r, 1, False), ACT)
        z_t = load_block(z_ptr, offs_c, mask_c, 1, offs_m, mask_m, C, False)
        da = load_block(da_ptr, offs_m, mask_m, R, offs_r, mask_r, 1, True)
        dw2 = tl.dot(de_t, h, dw2, input_precision="ieee", out_dtype=acc_dtype)  # triton 3.6: float32 unless said
        dw1_t = tl.dot(z_t, da, dw1_t, input_precision="ieee", out_dtype=acc_dtype)
        db2 += tl.sum(de_t, axis=1)
        db1 += tl.sum(da, axis=0)
    mask = mask_c[:, None] & mask_r[None, :]
    tl.store(dw2_ptr + offs_c[:, None] * stride_dw2c + offs_r[None, :] * stride_dw2r,
             dw2.to(dw2_ptr.dtype.element_ty), mask=mask)
    tl.store(dw1_ptr + offs_r[None, :] * stride_dw1r + offs_c[:, None] * stride_dw1c,
             dw1_t.to(dw1_ptr.dtype.element_ty), mask=mask)
    if HAS_B2:
        tl.store(db2_ptr + offs_c, db2.to(db2_ptr.dtype.element_ty), mask=mask_c & (tile % r_tiles == 0))
    if HAS_B1:
        tl.store(db1_ptr + offs_r, db1.to(db1_ptr.dtype.element_ty), mask=mask_r & (tile < r_tiles))


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
    z_ptr, a_ptr, e_ptr, de_ptr, da_ptr, dzp_ptr,
    u_ptr, res_ptr, dres_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    partial_ptr, ticket_ptr, batch_counter_ptr, counter_ptr,
    N, C, R, P,
    stride_gn, stride_gc, stride_gp, stride_xn, stride_xc, stride_xp, stride_dn, stride_dc, stride_dp,
    stride_un, stride_uc, stride_up, stride_rn, stride_rc, stride_rp, stride_tn, stride_tc, stride_tp,
    stride_w1r, stride_w1c, stride_w2c, stride_w2r, stride_dw1r, stride_dw1c, stride_dw2c, stride_dw2r,
    item_c, seg_len, num_segments, items_per_sample, group_size, num_groups, fc1_tiles, fc2_tiles, wgrad_tiles,
    num_tickets,
    ACT: tl.constexpr, GATE: tl.constexpr, WRITE_DX: tl.constexpr,
    OUT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_DRES: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HALF_WEIGHTS: tl.constexpr, HALF_AS_FP32: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ALIGN_C: tl.constexpr, ALIGN_P: tl.constexpr,
    BLOCK_M: tl.constexpr, MLP_BLOCK_R: tl.constexpr, MLP_BLOCK_C: tl.constexpr,
    WGRAD_BLOCK: tl.constexpr, WGRAD_SAMPLES: tl.constexpr,
):
    stride_gn, stride_gc, stride_gp = aligned_view(stride_gn, stride_gc, stride_gp, ALIGN_C, ALIGN_P)
    stride_xn, stride_xc, stride_xp = aligned_view(stride_xn, stride_xc, stride_xp, ALIGN_C, ALIGN_P)
    stride_dn, stride_dc, stride_dp = aligned_view(stride_dn, stride_dc, stride_dp, ALIGN_C, ALIGN_P)
    stride_un, stride_uc, stride_up = aligned_view(stride_un, stride_uc, stride_up, ALIGN_C, ALIGN_P)
    stride_rn, stride_rc, stride_rp = aligned_view(stride_rn, stride_rc, stride_rp, ALIGN_C, ALIGN_P)
    stride_tn, stride_tc, stride_tp = aligned_view(stride_tn, stride_tc, stride_tp, ALIGN_C, ALIGN_P)
    P, seg_len = multiple(P, ALIGN_C), multiple(seg_len, ALIGN_C)  # row ends and segment starts (NCHW)
    C, item_c = multiple(C, ALIGN_P), multiple(item_c, ALIGN_P)  # (channels_last)
    mlps_done = num_groups * fc2_tiles  # the batch counter once every group's MLP tiles are done
    ticket = next_ticket(ticket_ptr)
    while ticket < num_tickets:
        phase, g, n0, n1, reduced, excited, index, n, seg, c_start, p_start, p_end = locate_work(
            ticket, N, P, item_c, seg_len, num_segments, items_per_sample, group_size, num_groups,
            fc1_tiles, fc2_tiles)
        g_base = n.to(tl.int64) * stride_gn
        x_base = n.to(tl.int64) * stride_xn
        if phase == PHASE_REDUCE:
            if n < N:
                for c0 in range(c_start, c_start + item_c, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
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
                arrive(counter_ptr + g)
        elif phase == PHASE_FC1:
            wait_count(counter_ptr + g, reduced)
            _grad_fc1_tile(n0, n1, index, C, R, num_segments, partial_ptr, e_ptr, a_ptr, w2_ptr, stride_w2c,
                           stride_w2r, da_ptr, ACT, GATE, HALF_WEIGHTS, HALF_AS_FP32,
                           BLOCK_M, MLP_BLOCK_R, MLP_BLOCK_C)
            arrive(counter_ptr + g)
        elif phase == PHASE_FC2:
            wait_count(counter_ptr + g, reduced + fc1_tiles)
            _grad_fc2_tile(n0, n1, index, C, R, P, num_segments, partial_ptr, e_ptr, da_ptr, w1_ptr, stride_w1r,
                           stride_w1c, de_ptr, dzp_ptr, GATE, HALF_WEIGHTS, HALF_AS_FP32,
                           BLOCK_M, MLP_BLOCK_C, MLP_BLOCK_R)
            arrive(counter_ptr + g)
            if wgrad_tiles > 0:
                arrive(batch_counter_ptr)
        elif phase == PHASE_RESCALE:
            if n < N:
                wait_count(counter_ptr + g, excited)
                if WRITE_DX:
                    for c0 in range(c_start, c_start + item_c, BLOCK_C):
                        _rescale_grad(n, c0, p_start, p_end, C, e_ptr, dzp_ptr, g_ptr, g_base, stride_gc, stride_gp,
                                      dx_ptr, n.to(tl.int64) * stride_dn, stride_dc, stride_dp,
                                      u_ptr, stride_un, stride_uc, stride_up, res_ptr, stride_rn, stride_rc, stride_rp,
                                      GATE, OUT, HAS_RES, BLOCK_C, BLOCK_P)
                arrive_last(counter_ptr + g, excited + reduced)
        else:  # weight gradients
            wait_count(batch_counter_ptr, mlps_done)
            _weight_grad_tile(index, N, C, R, de_ptr, da_ptr, z_ptr, a_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                              stride_dw1r, stride_dw1c, stride_dw2c, stride_dw2r, ACT, HAS_B1, HAS_B2,
                              WGRAD_BLOCK, WGRAD_SAMPLES)
            arrive_last(batch_counter_ptr, mlps_done + wgrad_tiles)
        ticket = next_ticket(ticket_ptr)
    retire(ticket_ptr, ticket, num_tickets)


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

    channel_contiguous = x_strides[1] == 1
    flags = dict(ACT=ACT_CODES[act], GATE=GATE_CODES[gate_name], WRITE_DX=need_dx,
                 OUT=OUT_ACT_CODES[out_act], HAS_RES=has_res, WRITE_DRES=write_dres,
                 HAS_B1=has_b1, HAS_B2=has_b2, HALF_WEIGHTS=param_dtype in HALF_TYPES,
                 HALF_AS_FP32=uses_interpreter(se_backward_kernel))

    u_strides = spatial_strides(u) if u is not None else x_strides
    residual_strides = spatial_strides(residual) if has_res else x_strides
    d_residual_strides = spatial_strides(d_residual) if write_dres else x_strides
    streamed = [(g, g_strides), (x, x_strides)] + [(dx, dx_strides)] * need_dx + [(u, u_strides)] * (u is not None)
    streamed += [(residual, residual_strides)] * has_res + [(d_residual, d_residual_strides)] * write_dres

    def run(config: LaunchConfig, counted: bool = False) -> None:
        sched = choose_schedule(n, c, r, p, channel_contiguous, x.element_size(), x.device,
                                weight_grads=need_weight_grads, config=config)
        align_c, align_p = vector_alignment(sched, channel_contiguous, c, p, x.element_size(), *streamed)
        ws = workspace(x.device)
        ticket, batch_counter, counters = ws.counters(sched.num_groups)
        partial = ws.partial(n * sched.num_segments * c, z.dtype)
        launch(
            se_backward_kernel, (sched.num_programs,),
            g, x, x if not need_dx else dx, w1, w2, z, a, e, de, da, dzp,
            x if u is None else u, residual if has_res else x, d_residual if write_dres else x,
            dw1, db1 if has_b1 else dw1, dw2, db2 if has_b2 else dw2,
            partial, ticket, batch_counter, counters,
            n, c, r, p, *g_strides, *x_strides, *dx_strides, *u_strides, *residual_strides, *d_residual_strides,
            *w1.stride(), *w2.stride(),
            *(dw1.stride() if need_weight_grads else (0, 0)), *(dw2.stride() if need_weight_grads else (0, 0)),
            sched.item_c, sched.seg_len, sched.num_segments, sched.items_per_sample, sched.group_size,
            sched.num_groups, sched.fc1_tiles, sched.fc2_tiles, sched.wgrad_tiles, sched.num_tickets,
            **flags, BLOCK_C=sched.block_c, BLOCK_P=sched.block_p, ALIGN_C=align_c, ALIGN_P=align_p,
            BLOCK_M=DOT_MIN, MLP_BLOCK_R=sched.mlp_block_r, MLP_BLOCK_C=sched.mlp_block_c,
            WGRAD_BLOCK=sched.wgrad_block, WGRAD_SAMPLES=WGRAD_SAMPLES,
            counted=counted, **config.launch_options(),
        )

    key = ("backward", n, c, r, p, x.dtype, param_dtype, x.device, need_weight_grads, tuple(flags.items()),
           views_key(streamed))
    run(pick_config(key, candidate_configs(p, x.element_size()), run, x.device), counted=True)
    return dx, dw1, db1, dw2, db2, d_residual
