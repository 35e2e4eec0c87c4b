"""Fused SE forward in one launch: squeeze, excitation MLP and rescale (with the residual tail,
y = out_act(x · s + residual), in the rescale); the schedule is in schedule.py.

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
    PHASE_FC1,
    PHASE_FC2,
    PHASE_REDUCE,
    activation,
    arrive,
    aligned_view,
    arrive_last,
    gate,
    load_block,
    locate_work,
    mma,
    multiple,
    next_ticket,
    partial_sums,
    reduce_chunk,
    retire,
    scale_chunk,
    wait_count,
)
from .schedule import (
    ACT_CODES,
    DOT_MIN,
    GATE_CODES,
    HALF_TYPES,
    OUT_ACT_CODES,
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
def _fc1_tile(
    n0, n1, tile, C, R, P, num_segments, partial_ptr,
    w1_ptr, stride_w1r, stride_w1c, b1_ptr, z_ptr, a_ptr,
    HAS_B1: tl.constexpr, HALF_WEIGHTS: tl.constexpr, HALF_AS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """a = z W1ᵀ + b1 for hidden units [tile·BLOCK_R, +BLOCK_R) of samples [n0, n1), z = Σ partials / P
    (tile 0 stores z)."""
    offs_r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    for m0 in range(n0, n1, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n1
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=z_ptr.dtype.element_ty)
        for c0 in range(0, C, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < C
            z = partial_sums(partial_ptr, offs_m, mask_m, num_segments, offs_c, mask_c, C) / P
            if tile == 0:
                tl.store(z_ptr + offs_m[:, None] * C + offs_c[None, :], z, mask=mask_m[:, None] & mask_c[None, :])
            w1_t = load_block(w1_ptr, offs_c, mask_c, stride_w1c, offs_r, mask_r, stride_w1r, False)
            acc = mma(z, w1_t, acc, HALF_WEIGHTS, HALF_AS_FP32)
        if HAS_B1:
            acc += tl.load(b1_ptr + offs_r, mask=mask_r, other=0.0).to(acc.dtype)[None, :]
        tl.store(a_ptr + offs_m[:, None] * R + offs_r[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _fc2_tile(
    n0, n1, tile, C, R, a_ptr, w2_ptr, stride_w2c, stride_w2r, b2_ptr, e_ptr,
    ACT: tl.constexpr, HAS_B2: tl.constexpr, HALF_WEIGHTS: tl.constexpr, HALF_AS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """e = act(a) W2ᵀ + b2 for channels [tile·BLOCK_C, +BLOCK_C) of samples [n0, n1)."""
    offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    for m0 in range(n0, n1, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n1
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=e_ptr.dtype.element_ty)
        for r0 in range(0, R, BLOCK_K):
            offs_r = r0 + tl.arange(0, BLOCK_K)
            mask_r = offs_r < R
            # act(0) = 0 off the masks
            h = activation(load_block(a_ptr, offs_m, mask_m, R, offs_r, mask_r, 1, True), ACT)
            w2_t = load_block(w2_ptr, offs_r, mask_r, stride_w2r, offs_c, mask_c, stride_w2c, False)
            acc = mma(h, w2_t, acc, HALF_WEIGHTS, HALF_AS_FP32)
        if HAS_B2:
            acc += tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(acc.dtype)[None, :]
        tl.store(e_ptr + offs_m[:, None] * C + offs_c[None, :], acc, mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _rescale(
    n, c0, p_start, p_end, C, e_ptr,
    x_ptr, x_base, stride_xc, stride_xp, y_ptr, y_base, stride_yc, stride_yp,
    res_ptr, stride_rn, stride_rc, stride_rp,
    GATE: tl.constexpr, HAS_RES: tl.constexpr, OUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = out_act(x · gate(e) (+ residual)) over one block of channels and a segment of positions."""
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
    partial_ptr, ticket_ptr, counter_ptr,
    N, C, R, P,
    stride_xn, stride_xc, stride_xp, stride_rn, stride_rc, stride_rp, stride_yn, stride_yc, stride_yp,
    stride_w1r, stride_w1c, stride_w2c, stride_w2r,
    item_c, seg_len, num_segments, items_per_sample, group_size, num_groups, fc1_tiles, fc2_tiles, num_tickets,
    ACT: tl.constexpr, GATE: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HAS_RES: tl.constexpr, OUT: tl.constexpr, HALF_WEIGHTS: tl.constexpr, HALF_AS_FP32: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ALIGN_C: tl.constexpr, ALIGN_P: tl.constexpr,
    BLOCK_M: tl.constexpr, MLP_BLOCK_R: tl.constexpr, MLP_BLOCK_C: tl.constexpr,
):
    stride_xn, stride_xc, stride_xp = aligned_view(stride_xn, stride_xc, stride_xp, ALIGN_C, ALIGN_P)
    stride_rn, stride_rc, stride_rp = aligned_view(stride_rn, stride_rc, stride_rp, ALIGN_C, ALIGN_P)
    stride_yn, stride_yc, stride_yp = aligned_view(stride_yn, stride_yc, stride_yp, ALIGN_C, ALIGN_P)
    P, seg_len = multiple(P, ALIGN_C), multiple(seg_len, ALIGN_C)  # row ends and segment starts (NCHW)
    C, item_c = multiple(C, ALIGN_P), multiple(item_c, ALIGN_P)  # (channels_last)
    ticket = next_ticket(ticket_ptr)
    while ticket < num_tickets:
        phase, g, n0, n1, reduced, excited, index, n, seg, c_start, p_start, p_end = locate_work(
            ticket, N, P, item_c, seg_len, num_segments, items_per_sample, group_size, num_groups,
            fc1_tiles, fc2_tiles)
        x_base = n.to(tl.int64) * stride_xn
        if phase == PHASE_REDUCE:
            if n < N:
                for c0 in range(c_start, c_start + item_c, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    sums = reduce_chunk(x_ptr, x_base, stride_xc, stride_xp, x_ptr, x_base, stride_xc, stride_xp,
                                        partial_ptr, c0, p_start, p_end, C, False, BLOCK_C, BLOCK_P)
                    tl.store(partial_ptr + (n * num_segments + seg) * C + offs_c, sums, mask=offs_c < C)
                arrive(counter_ptr + g)
        elif phase == PHASE_FC1:
            wait_count(counter_ptr + g, reduced)
            _fc1_tile(n0, n1, index, C, R, P, num_segments, partial_ptr, w1_ptr, stride_w1r, stride_w1c, b1_ptr,
                      z_ptr, a_ptr, HAS_B1, HALF_WEIGHTS, HALF_AS_FP32, BLOCK_M, MLP_BLOCK_R, MLP_BLOCK_C)
            arrive(counter_ptr + g)
        elif phase == PHASE_FC2:
            wait_count(counter_ptr + g, reduced + fc1_tiles)
            _fc2_tile(n0, n1, index, C, R, a_ptr, w2_ptr, stride_w2c, stride_w2r, b2_ptr, e_ptr,
                      ACT, HAS_B2, HALF_WEIGHTS, HALF_AS_FP32, BLOCK_M, MLP_BLOCK_C, MLP_BLOCK_R)
            arrive(counter_ptr + g)
        else:  # rescale
            if n < N:
                wait_count(counter_ptr + g, excited)
                for c0 in range(c_start, c_start + item_c, BLOCK_C):
                    _rescale(n, c0, p_start, p_end, C, e_ptr, x_ptr, x_base, stride_xc, stride_xp,
                             y_ptr, n.to(tl.int64) * stride_yn, stride_yc, stride_yp,
                             res_ptr, stride_rn, stride_rc, stride_rp, GATE, HAS_RES, OUT, BLOCK_C, BLOCK_P)
                arrive_last(counter_ptr + g, excited + reduced)
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

    channel_contiguous = x_strides[1] == 1
    flags = dict(ACT=ACT_CODES[act], GATE=GATE_CODES[gate_name], HAS_B1=b1 is not None, HAS_B2=b2 is not None,
                 HAS_RES=residual is not None, OUT=OUT_ACT_CODES[out_act], HALF_WEIGHTS=w1.dtype in HALF_TYPES,
                 HALF_AS_FP32=uses_interpreter(se_forward_kernel))

    streamed = [(x, x_strides), (y, y_strides)] + ([] if residual is None else [(residual, residual_strides)])

    def run(config: LaunchConfig, counted: bool = False) -> None:
        sched = choose_schedule(n, c, r, p, channel_contiguous, x.element_size(), x.device, config=config)
        align_c, align_p = vector_alignment(sched, channel_contiguous, c, p, x.element_size(), *streamed)
        ws = workspace(x.device)
        ticket, _, counters = ws.counters(sched.num_groups)
        partial = ws.partial(n * sched.num_segments * c, compute_dtype)
        launch(
            se_forward_kernel, (sched.num_programs,),
            x, x if residual is None else residual, y, w1, w1 if b1 is None else b1, w2, w2 if b2 is None else b2,
            z, a, e, partial, ticket, counters,
            n, c, r, p, *x_strides, *residual_strides, *y_strides, *w1.stride(), *w2.stride(),
            sched.item_c, sched.seg_len, sched.num_segments, sched.items_per_sample, sched.group_size,
            sched.num_groups, sched.fc1_tiles, sched.fc2_tiles, sched.num_tickets,
            **flags, BLOCK_C=sched.block_c, BLOCK_P=sched.block_p, ALIGN_C=align_c, ALIGN_P=align_p,
            BLOCK_M=DOT_MIN, MLP_BLOCK_R=sched.mlp_block_r, MLP_BLOCK_C=sched.mlp_block_c,
            counted=counted, **config.launch_options(),
        )

    key = ("forward", n, c, r, p, x.dtype, w1.dtype, x.device, tuple(flags.items()), views_key(streamed))
    run(pick_config(key, candidate_configs(p, x.element_size()), run, x.device), counted=True)
    return y, z, a, e
