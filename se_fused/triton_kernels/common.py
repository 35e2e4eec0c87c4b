"""Pieces shared by the forward and backward Triton kernels.

The schedule (shared/DESIGN.md §3). A sample's (C, P) slice, P = H·W, is cut into
*items*: a block of ``block_c`` channels times a segment of ``seg_len`` positions.

* ``split=False``: one program owns whole samples; it reduces, runs the MLP and
  rescales with no cross-program synchronisation.
* ``split=True``: persistent programs take tickets from a global atomic counter.
  Tickets run through half-phases of ``group_size`` samples' worth of items:
  ``reduce g0 | reduce g1 | rescale g0 | reduce g2 | rescale g1 | ... | rescale g_last``.
  A reduce item stores its per-channel partial sums; the last reduce item of a
  sample (per-sample atomic counter) runs the MLP and raises the sample's flag;
  rescale items wait for that flag. A waiting program only waits on items with
  smaller tickets, all claimed by programs that are already running and never
  wait, so the kernel cannot deadlock whatever the grid size or the GPU.

The counters reset themselves (the last user of each puts it back to zero), so a
call needs no memset launch. Partial sums are summed in a fixed order, so results
are bitwise deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..debug import record_launch

ACT_CODES = {"relu": 0, "silu": 1}
GATE_CODES = {"sigmoid": 0, "hard_sigmoid": 1}


# ----------------------------------------------------------------------------- math


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def activation(a, ACT: tl.constexpr):
    if ACT == 0:
        h = tl.where(a > 0.0, a, 0.0)
    else:
        h = a * _sigmoid(a)
    return h


@triton.jit
def activation_grad(a, ACT: tl.constexpr):
    if ACT == 0:
        d = tl.where(a > 0.0, 1.0, 0.0).to(a.dtype)
    else:
        sig = _sigmoid(a)
        d = sig * (1.0 + a * (1.0 - sig))
    return d


@triton.jit
def gate(e, GATE: tl.constexpr):
    if GATE == 0:
        s = _sigmoid(e)
    else:
        # relu6(e + 3) / 6, the same rounding as torch's hardsigmoid
        s = tl.minimum(tl.maximum(e + 3.0, 0.0), 6.0) / 6.0
    return s


@triton.jit
def gate_grad(e, GATE: tl.constexpr):
    if GATE == 0:
        s = _sigmoid(e)
        d = s * (1.0 - s)
    else:
        # divide in e's dtype: a literal 1/6 would be float32 and cost float64 its precision
        d = tl.where((e > -3.0) & (e < 3.0), 1.0, 0.0).to(e.dtype) / 6.0
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
    HAS_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[c, p] = src[c, p] * scale[c] (+ shift[c]) over positions [p_start, p_end)."""
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
        tl.store(out_ptr + out_base + offs_c[:, None] * stride_oc + offs_p[None, :] * stride_op,
                 vals.to(out_ptr.dtype.element_ty), mask=mask)


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


# ----------------------------------------------------------------------------- host side


def _next_pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, v))


@dataclasses.dataclass(frozen=True)
class Schedule:
    split: bool
    block_c: int
    block_p: int
    seg_len: int
    num_segments: int
    items_per_sample: int
    group_size: int
    num_groups: int
    num_tickets: int
    num_programs: int


_forced: dict = {}

TILE_ELEMENTS = 4096  # elements a program holds per loop step
ITEM_ELEMENTS = 16384  # elements per split item: amortises its two atomics and partial-sum store
SAMPLE_BYTES_PER_PROGRAM = 128 * 1024  # largest sample one program handles alone
MAIN_KERNEL_WARPS = 8  # 16 tile elements a thread: fewer registers than 4 warps (see tests/compile_for_gpu.py)
INTERPRETER_SMS = 4  # a small pretend GPU, so the interpreter takes both regimes


@contextlib.contextmanager
def force_schedule(**fields) -> Iterator[None]:
    """Override the schedule heuristics (tests use it to force samples across many items).

    Accepted keys: split, block_c, block_p, tiles_per_item, group_size, num_programs.
    """
    allowed = {"split", "block_c", "block_p", "tiles_per_item", "group_size", "num_programs"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"force_schedule got unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
    previous = dict(_forced)
    _forced.update(fields)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)


def resident_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return INTERPRETER_SMS * 4


def choose_schedule(n: int, c: int, p: int, channel_contiguous: bool, element_size: int,
                    device: torch.device) -> Schedule:
    """Tile sizes and regime for one (N, C, P) problem; see the module docstring."""
    if channel_contiguous:
        block_c = _forced.get("block_c", min(_next_pow2(c), 128))
        block_p = _forced.get("block_p", min(_next_pow2(p), max(1, TILE_ELEMENTS // block_c)))
    else:
        block_p = _forced.get("block_p", min(_next_pow2(p), 256))
        block_c = _forced.get("block_c", min(_next_pow2(c), max(1, TILE_ELEMENTS // block_p)))
    programs = _forced.get("num_programs", resident_programs(device))
    channel_blocks = triton.cdiv(c, block_c)
    split = _forced.get("split", not (n >= programs and c * p * element_size <= SAMPLE_BYTES_PER_PROGRAM))
    if not split:
        return Schedule(False, block_c, block_p, p, 1, channel_blocks, 1, n, 0, n)

    tiles_per_item = _forced.get("tiles_per_item", max(1, ITEM_ELEMENTS // (block_c * block_p)))
    if n * channel_blocks * triton.cdiv(p, block_p * tiles_per_item) < 2 * programs:
        tiles_per_item = _forced.get("tiles_per_item", 1)  # too few items to fill the machine
    seg_len = block_p * min(tiles_per_item, triton.cdiv(p, block_p))
    num_segments = triton.cdiv(p, seg_len)
    items_per_sample = channel_blocks * num_segments
    group_size = min(n, _forced.get("group_size", triton.cdiv(programs, items_per_sample)))
    num_groups = triton.cdiv(n, group_size)
    num_tickets = 2 * num_groups * group_size * items_per_sample
    return Schedule(True, block_c, block_p, seg_len, num_segments, items_per_sample, group_size, num_groups,
                    num_tickets, min(programs, num_tickets))


class _Workspace:
    """Self-resetting counters and partial-sum buffers of one (device, stream)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sync = torch.zeros(0, dtype=torch.int32, device=device)
        self.partials: dict[torch.dtype, torch.Tensor] = {}

    def counters(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ticket, per-sample counters, per-sample flags), all zero between launches."""
        capacity = (self.sync.numel() - 1) // 2
        if capacity < n:
            capacity = max(n, 2 * capacity)
            self.sync = torch.zeros(1 + 2 * capacity, dtype=torch.int32, device=self.device)
        return self.sync[:1], self.sync[1:1 + capacity], self.sync[1 + capacity:]

    def partial(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.partials.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 2 * (0 if buf is None else buf.numel())), dtype=dtype, device=self.device)
            self.partials[dtype] = buf
        return buf[:numel]


_workspaces: dict[tuple, _Workspace] = {}


def workspace(device: torch.device) -> _Workspace:
    if device.type == "cuda":
        key = (device.type, device.index, torch.cuda.current_stream(device).stream_id)
    else:
        key = (device.type, device.index)
    ws = _workspaces.get(key)
    if ws is None:
        ws = _workspaces[key] = _Workspace(device)
    return ws


def spatial_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_p) when H and W flatten into one position axis P, else None."""
    _, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if w == 1:
        return sn, sc, sh
    if h == 1 or sh == w * sw:
        return sn, sc, sw
    return None


def uses_interpreter(kernel) -> bool:
    return isinstance(kernel, InterpretedFunction)


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    record_launch(kernel.fn.__name__)
    kernel[grid](*args, **meta)


def mlp_blocks(c: int, r: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_CM): all of R in registers, C walked in blocks of 2048 weights (16 a thread)."""
    block_r = _next_pow2(r)
    block_cm = max(1, min(_next_pow2(c), 2048 // block_r))
    return block_r, block_cm
