"""Device code shared by the forward and backward Triton kernels: the SE math, the two memory
passes (reduce, scale), the MLP's matrix products and the ticket protocol of the schedule.

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
        d = tl.where(u <= 0.0, 0.0, grad)  # threshold_backward: a NaN y passes the gradient on
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
def multiple(v, ALIGN: tl.constexpr):
    """v, which the host checked is a multiple of ALIGN, written so that Triton's analysis knows it too
    (from arguments it learns only divisibility by 16). ALIGN 1: v as it is (a unit stride is a constexpr)."""
    if ALIGN > 1:
        v = (v // ALIGN) * ALIGN
    return v


@triton.jit
def aligned_view(stride_n, stride_c, stride_p, ALIGN_C: tl.constexpr, ALIGN_P: tl.constexpr):
    """A streamed view's strides, with the host's promise that rows start on a multiple of ALIGN_C
    (NCHW: rows of positions) or ALIGN_P (channels_last) elements: their loads become 8- or 16-byte
    vectors where the row length is a multiple of 4 or 8 but not of 16 (docs/DESIGN.md §3.1)."""
    return multiple(stride_n, ALIGN_C * ALIGN_P), multiple(stride_c, ALIGN_C), multiple(stride_p, ALIGN_P)


@triton.jit
def partial_sums(partial_ptr, offs_m, mask_m, num_segments, offs_c, mask_c, C):
    """[samples, channels] Σ over each sample's segments of the partial sums (fixed order:
    deterministic). `.cg` reads from L2: other programs wrote these, and L1 is not coherent."""
    total = tl.zeros([offs_m.shape[0], offs_c.shape[0]], dtype=partial_ptr.dtype.element_ty)
    for seg in range(0, num_segments):  # sample m's segment seg is row m·num_segments + seg
        total += load_block(partial_ptr + seg * C, offs_m, mask_m, num_segments * C, offs_c, mask_c, 1, True)
    return total


@triton.jit
def load_block(ptr, offs_i, mask_i, stride_i, offs_j, mask_j, stride_j, FROM_L2: tl.constexpr):
    """[i, j] block of a matrix with any strides (a transposed view is swapped strides), 0 outside
    the masks. FROM_L2: written by another program in this launch; `.cg` skips the incoherent L1."""
    ptrs = ptr + offs_i[:, None] * stride_i + offs_j[None, :] * stride_j
    mask = mask_i[:, None] & mask_j[None, :]
    if FROM_L2:
        return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def mma(a, w, acc, HALF_WEIGHTS: tl.constexpr, HALF_AS_FP32: tl.constexpr):
    """acc + a @ w. Half-precision weights: a is rounded to the weights' type (as eager's Linear
    sees its half-precision input) and the product runs on tensor cores with float32 accumulation;
    otherwise IEEE products in acc's type (float32 or float64). HALF_AS_FP32 (the interpreter, whose
    tl.dot mishandles bfloat16): the rounded half operands are multiplied in float32, exactly as
    tensor cores do. out_dtype is spelled out: triton 3.6 defaults it to float32 whatever acc is."""
    if HALF_WEIGHTS:
        a = a.to(w.dtype)
        if HALF_AS_FP32:
            return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype)
        return tl.dot(a, w, acc, out_dtype=acc.dtype)
    return tl.dot(a.to(acc.dtype), w.to(acc.dtype), acc, input_precision="ieee", out_dtype=acc.dtype)


# ----------------------------------------------------------------------------- synchronisation

PHASE_REDUCE = tl.constexpr(0)
PHASE_FC1 = tl.constexpr(1)
PHASE_FC2 = tl.constexpr(2)
PHASE_RESCALE = tl.constexpr(3)
PHASE_WGRAD = tl.constexpr(4)


@triton.jit
def decode_ticket(ticket, group_items, fc1_tiles, fc2_tiles, num_groups):
    """Ticket -> (phase, group, index within the phase), in the order of schedule.py:
    R(0) | M1(0) M2(0) R(1) S(0) | ... | M1(G-1) M2(G-1) S(G-1) | weight-gradient tiles."""
    round_len = fc1_tiles + fc2_tiles + 2 * group_items
    u = tl.maximum(ticket - group_items, 0)
    k = u // round_len + 1  # round k runs the MLP and rescale of group k - 1, the reduce of group k
    o = u % round_len - fc1_tiles - fc2_tiles  # offset past the round's MLP tiles
    has_reduce = k < num_groups
    phase = tl.where(o < -fc2_tiles, PHASE_FC1,
                     tl.where(o < 0, PHASE_FC2, tl.where(has_reduce & (o < group_items), PHASE_REDUCE, PHASE_RESCALE)))
    group = tl.where(phase == PHASE_REDUCE, k, k - 1)
    index = tl.where(phase == PHASE_FC1, o + fc1_tiles + fc2_tiles, tl.where(phase == PHASE_FC2, o + fc2_tiles, o))
    index = tl.where((phase == PHASE_RESCALE) & has_reduce, index - group_items, index)
    first = ticket < group_items
    wgrad = ticket >= num_groups * round_len
    phase = tl.where(first, PHASE_REDUCE, tl.where(wgrad, PHASE_WGRAD, phase))
    group = tl.where(first | wgrad, 0, group)
    index = tl.where(first, ticket, tl.where(wgrad, ticket - num_groups * round_len, index))
    return phase, group, index


@triton.jit
def locate_work(ticket, N, P, item_c, seg_len, num_segments, items_per_sample, group_size, num_groups,
                fc1_tiles, fc2_tiles):
    """A ticket's work: its phase; its group's samples [n0, n1) and the group counter's value once
    the group's reduce items are done (`reduced`) and once its MLP tiles are too (`excited`); its index
    within the phase; for an item, its sample n, segment seg, first channel c_start and positions
    [p_start, p_end)."""
    phase, g, index = decode_ticket(ticket, group_size * items_per_sample, fc1_tiles, fc2_tiles, num_groups)
    n0 = g * group_size
    n1 = tl.minimum(n0 + group_size, N)
    reduced = (n1 - n0) * items_per_sample
    excited = reduced + fc1_tiles + fc2_tiles
    item = index % items_per_sample
    seg = item % num_segments
    p_start = seg * seg_len
    return (phase, g, n0, n1, reduced, excited, index, n0 + index // items_per_sample, seg,
            (item // num_segments) * item_c, p_start, tl.minimum(p_start + seg_len, P))


@triton.jit
def arrive(counter_ptr):
    """Count this program's finished work (release: its stores come first); returns the count before."""
    tl.debug_barrier()  # every thread's stores come before the release
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel")


@triton.jit
def wait_count(counter_ptr, target):
    """Spin until the counter reaches target (acquire: what was counted is visible after)."""
    done = tl.atomic_add(counter_ptr, 0, sem="acquire")
    while done < target:
        done = tl.atomic_add(counter_ptr, 0, sem="acquire")


@triton.jit
def arrive_last(counter_ptr, total):
    """arrive(), and the counter's last user (count total) puts it back to zero for the next launch."""
    if arrive(counter_ptr) == total - 1:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")


@triton.jit
def next_ticket(ticket_ptr):
    return tl.atomic_add(ticket_ptr, 1, sem="relaxed")


@triton.jit
def retire(ticket_ptr, last_ticket, num_tickets):
    """Every program draws one ticket past the end; the last of those resets the ticket counter."""
    if last_ticket == num_tickets + tl.num_programs(0) - 1:
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")
