"""Device code shared by the forward and backward Triton kernels: the SE math, the two memory
passes (reduce, scale) and the synchronisation protocol of the split schedule.

The schedule and its deadlock-freedom argument are in docs/DESIGN.md §3 and schedule.py.
Every function here runs inside a kernel; the host side lives in schedule.py.
"""

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- math


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def activation(a, ACT: tl.constexpr):
    if ACT == 0:
        h = tl.where(a < 0.0, 0.0, a)  # not max(a, 0): NaN propagates, as in eager
    else:
        h = a * _sigmoid(a)
    return h


@triton.jit
def activation_backward(grad, a, ACT: tl.constexpr):
    """grad · act'(a) as eager computes it: ReLU's is a select, so a NaN gradient of a dead unit gives 0."""
    if ACT == 0:
        d = tl.where(a <= 0.0, 0.0, grad)
    else:
        sig = _sigmoid(a)
        d = grad * (sig * (1.0 + a * (1.0 - sig)))
    return d


@triton.jit
def gate(e, GATE: tl.constexpr):
    if GATE == 0:
        s = _sigmoid(e)
    else:
        # relu6(e + 3) / 6, the same rounding as torch's hardsigmoid; where, not min/max, so NaN propagates
        t = e + 3.0
        s = tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t)) / 6.0
    return s


@triton.jit
def gate_backward(grad, e, GATE: tl.constexpr):
    """grad · gate'(e) as eager computes it: hard sigmoid's is a select."""
    if GATE == 0:
        s = _sigmoid(e)
        d = grad * (s * (1.0 - s))
    else:
        # divide in e's dtype: a literal 1/6 would be float32 and cost float64 its precision
        d = tl.where((e > -3.0) & (e < 3.0), grad, 0.0) / 6.0
    return d


@triton.jit
def out_activation(t, OUT: tl.constexpr):
    """out_act of the fused residual tail (OUT: 0 none, 1 ReLU, 2 SiLU); NaN propagates as in eager."""
    if OUT == 1:
        t = tl.where(t < 0.0, 0.0, t)
    elif OUT == 2:
        t = t * _sigmoid(t)
    return t


@triton.jit
def out_activation_backward(grad, u, OUT: tl.constexpr):
    """grad · out_act'(·) from u: y for ReLU (eager's threshold_backward on the output), the
    activation's input for SiLU."""
    if OUT == 1:
        d = tl.where(u > 0.0, grad, 0.0)
    else:
        sig = _sigmoid(u)
        d = grad * (sig * (1.0 + u * (1.0 - sig)))
    return d


# ----------------------------------------------------------------------------- memory passes


@triton.jit
def reduce_chunk(
    a_ptr, a_base, stride_ac, stride_ap,
    b_ptr, b_base, stride_bc, stride_bp,
    acc_ptr, c0, p_start, p_end, C,
    PRODUCT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per-channel sums over positions [p_start, p_end) of a (PRODUCT: of a·b), in acc_ptr's dtype."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_ptr.dtype.element_ty)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = mask_c[:, None] & (offs_p[None, :] < p_end)
        vals = tl.load(a_ptr + a_base + offs_c[:, None] * stride_ac + offs_p[None, :] * stride_ap,
                       mask=mask, other=0.0).to(acc.dtype)
        if PRODUCT:
            vals *= tl.load(b_ptr + b_base + offs_c[:, None] * stride_bc + offs_p[None, :] * stride_bp,
                            mask=mask, other=0.0).to(acc.dtype)
        acc += vals
    return tl.sum(acc, axis=1)


@triton.jit
def scale_chunk(
    src_ptr, src_base, stride_sc, stride_sp,
    out_ptr, out_base, stride_oc, stride_op,
    scale, shift, c0, p_start, p_end, C,
    res_ptr, res_base, stride_rc, stride_rp,
    HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, OUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[c, p] = out_act(src[c, p] * scale[c] (+ shift[c]) (+ res[c, p])) over positions [p_start, p_end)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = mask_c[:, None] & (offs_p[None, :] < p_end)
        vals = tl.load(src_ptr + src_base + offs_c[:, None] * stride_sc + offs_p[None, :] * stride_sp,
                       mask=mask, other=0.0).to(scale.dtype)
        vals = vals * scale[:, None]
        if HAS_SHIFT:
            vals += shift[:, None]
        if HAS_RES:
            vals += tl.load(res_ptr + res_base + offs_c[:, None] * stride_rc + offs_p[None, :] * stride_rp,
                            mask=mask, other=0.0).to(scale.dtype)
        vals = out_activation(vals, OUT)
        tl.store(out_ptr + out_base + offs_c[:, None] * stride_oc + offs_p[None, :] * stride_op,
                 vals.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tail_grad_tile(
    g_ptr, g_base, stride_gc, stride_gp,
    u_ptr, u_base, stride_uc, stride_up,
    res_ptr, res_base, stride_rc, stride_rp,
    scale, offs_c, offs_p, mask,
    OUT: tl.constexpr, HAS_RES: tl.constexpr,
):
    """The gradient at the tail's input over one tile: g · out_act'(u), u = y (ReLU: u_ptr is y) or
    u = x · s + residual (SiLU: u_ptr is x)."""
    g = tl.load(g_ptr + g_base + offs_c[:, None] * stride_gc + offs_p[None, :] * stride_gp,
                mask=mask, other=0.0).to(scale.dtype)
    u = tl.load(u_ptr + u_base + offs_c[:, None] * stride_uc + offs_p[None, :] * stride_up,
                mask=mask, other=0.0).to(scale.dtype)
    if OUT == 2:
        u = u * scale[:, None]
        if HAS_RES:
            u += tl.load(res_ptr + res_base + offs_c[:, None] * stride_rc + offs_p[None, :] * stride_rp,
                         mask=mask, other=0.0).to(scale.dtype)
    return out_activation_backward(g, u, OUT)


@triton.jit
def sum_partials(partial_ptr, n, num_segments, offs_c, mask_c, C):
    """Σ over a sample's segments of the partial sums (fixed order: deterministic).

    `.cg` reads from L2: other programs wrote these, and L1 is not coherent.
    """
    total = tl.zeros(offs_c.shape, dtype=partial_ptr.dtype.element_ty)
    for seg in range(0, num_segments):
        total += tl.load(partial_ptr + (n * num_segments + seg) * C + offs_c, mask=mask_c, other=0.0,
                         cache_modifier=".cg")
    return total


# ----------------------------------------------------------------------------- synchronisation


@triton.jit
def decode_ticket(ticket, items_per_sample, group_size, num_groups):
    """Ticket -> (is_reduce, sample, item) in the order documented at the top of this file."""
    group_items = group_size * items_per_sample
    half = ticket // group_items
    j = ticket % group_items
    is_reduce = (half == 0) | ((half % 2 == 1) & ((half + 1) // 2 < num_groups))
    group = tl.where(is_reduce, (half + 1) // 2, (half - 1) // 2)
    return is_reduce, group * group_size + j // items_per_sample, j % items_per_sample


@triton.jit
def arrive_reduced(counter_ptr, n, items_per_sample):
    """Count one reduce item of sample n as done; True for the sample's last one."""
    tl.debug_barrier()  # every thread's partial-sum stores come before the release
    done = tl.atomic_add(counter_ptr + n, 1, sem="acq_rel")
    return done == items_per_sample - 1


@triton.jit
def publish(flag_ptr, n):
    tl.debug_barrier()  # every thread's stores of the sample's vectors come before the release
    tl.atomic_xchg(flag_ptr + n, 1, sem="release")


@triton.jit
def wait_published(flag_ptr, n):
    ready = tl.atomic_add(flag_ptr + n, 0, sem="acquire")
    while ready == 0:
        ready = tl.atomic_add(flag_ptr + n, 0, sem="acquire")


@triton.jit
def release_rescaled(counter_ptr, flag_ptr, n, items_per_sample):
    """Count one rescale item of sample n as done; the last one resets the sample's counter and flag."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr + n, 1, sem="acq_rel")
    if done == 2 * items_per_sample - 1:
        tl.atomic_xchg(counter_ptr + n, 0, sem="relaxed")
        tl.atomic_xchg(flag_ptr + n, 0, sem="relaxed")


@triton.jit
def next_ticket(ticket_ptr):
    return tl.atomic_add(ticket_ptr, 1, sem="relaxed")


@triton.jit
def retire(ticket_ptr, last_ticket, num_tickets):
    """Every program draws one ticket past the end; the last of those resets the ticket counter."""
    if last_ticket == num_tickets + tl.num_programs(0) - 1:
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")
