"""Host side of the Triton kernels: the schedule of one launch, the workspace, the launch itself.

The schedule (docs/DESIGN.md §3). A sample's (C, P) slice, P = H·W, is cut into *items*:
a block of ``block_c`` channels times a segment of ``seg_len`` positions.

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

import dataclasses
import threading

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from ..debug import forced_schedule, record_launch

ACT_CODES = {"relu": 0, "silu": 1}
GATE_CODES = {"sigmoid": 0, "hard_sigmoid": 1}
OUT_ACT_CODES = {"none": 0, "relu": 1, "silu": 2}

TILE_ELEMENTS = 4096  # elements a program holds per loop step
ITEM_ELEMENTS = 16384  # elements per split item: amortises its two atomics and partial-sum store
SAMPLE_BYTES_PER_PROGRAM = 128 * 1024  # largest sample one program handles alone
MAIN_KERNEL_WARPS = 8  # 16 tile elements a thread: fewer registers than 4 warps (see tests/compile_for_gpu.py)
INTERPRETER_SMS = 4  # a small pretend GPU, so the interpreter takes both regimes


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


def resident_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return INTERPRETER_SMS * 4


def choose_schedule(n: int, c: int, p: int, channel_contiguous: bool, element_size: int,
                    device: torch.device) -> Schedule:
    """Tile sizes and regime for one (N, C, P) problem (``debug.force_schedule`` overrides them)."""
    forced = forced_schedule()
    if channel_contiguous:
        block_c = forced.get("block_c", min(_next_pow2(c), 128))
        block_p = forced.get("block_p", min(_next_pow2(p), max(1, TILE_ELEMENTS // block_c)))
    else:
        block_p = forced.get("block_p", min(_next_pow2(p), 256))
        block_c = forced.get("block_c", min(_next_pow2(c), max(1, TILE_ELEMENTS // block_p)))
    programs = forced.get("num_programs", resident_programs(device))
    channel_blocks = triton.cdiv(c, block_c)
    split = forced.get("split", not (n >= programs and c * p * element_size <= SAMPLE_BYTES_PER_PROGRAM))
    if not split:
        return Schedule(False, block_c, block_p, p, 1, channel_blocks, 1, n, 0, n)

    tiles_per_item = forced.get("tiles_per_item", max(1, ITEM_ELEMENTS // (block_c * block_p)))
    if n * channel_blocks * triton.cdiv(p, block_p * tiles_per_item) < 2 * programs:
        tiles_per_item = forced.get("tiles_per_item", 1)  # too few items to fill the machine
    seg_len = block_p * min(tiles_per_item, triton.cdiv(p, block_p))
    num_segments = triton.cdiv(p, seg_len)
    items_per_sample = channel_blocks * num_segments
    group_size = min(n, forced.get("group_size", triton.cdiv(programs, items_per_sample)))
    num_groups = triton.cdiv(n, group_size)
    num_tickets = 2 * num_groups * group_size * items_per_sample
    return Schedule(True, block_c, block_p, seg_len, num_segments, items_per_sample, group_size, num_groups,
                    num_tickets, min(programs, num_tickets))


class Workspace:
    """Self-resetting counters and partial-sum buffers of one stream (or of the interpreter)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sync = torch.zeros(0, dtype=torch.int32, device=device)
        self.partials: dict[torch.dtype, torch.Tensor] = {}

    def counters(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ticket, per-sample counters, per-sample flags), all zero between launches."""
        sync = self.sync  # a local: another thread on this stream may replace self.sync meanwhile
        capacity = (sync.numel() - 1) // 2
        if capacity < n:
            capacity = max(n, 2 * capacity)
            sync = self.sync = torch.zeros(1 + 2 * capacity, dtype=torch.int32, device=self.device)
        return sync[:1], sync[1:1 + capacity], sync[1 + capacity:]

    def partial(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.partials.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 2 * (0 if buf is None else buf.numel())), dtype=dtype, device=self.device)
            self.partials[dtype] = buf
        return buf[:numel]


_workspaces: dict[tuple, Workspace] = {}
_workspaces_lock = threading.Lock()


def workspace(device: torch.device) -> Workspace:
    """The workspace of the current stream: launches on one stream run in order, so they can share it
    (interpreted launches are serialised by ``launch``).

    While a CUDA graph is being captured, a fresh workspace is allocated from the graph's memory pool
    (and zeroed by a captured fill) and never reused outside that graph.
    """
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return Workspace(device)
        key = (device.type, device.index, torch.cuda.current_stream(device).stream_id)
    else:
        key = (device.type, device.index)
    with _workspaces_lock:
        ws = _workspaces.get(key)
        if ws is None:
            ws = _workspaces[key] = Workspace(device)
    return ws


def uses_interpreter(kernel) -> bool:
    return isinstance(kernel, InterpretedFunction)


_interpreter_lock = threading.Lock()


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    record_launch(kernel.fn.__name__)
    if uses_interpreter(kernel):
        with _interpreter_lock:  # Triton's interpreter patches triton.language per launch: one at a time
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def mlp_blocks(c: int, r: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_CM): all of R in registers, C walked in blocks of 2048 weights (16 a thread)."""
    block_r = _next_pow2(r)
    block_cm = max(1, min(_next_pow2(c), 2048 // block_r))
    return block_r, block_cm
