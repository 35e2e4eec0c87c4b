"""Host side of the Triton kernels: the schedule of one launch, the workspace, the launch itself.

The schedule (docs/DESIGN.md §3). A sample's (C, P) slice, P = H·W, is cut into *items*: a
range of ``item_c`` channels (walked in blocks of ``block_c``) times a segment of ``seg_len``
positions; ``split=False`` makes each sample one item. Samples form groups of ``group_size``.
Persistent programs take tickets from a global atomic counter; per group g there are

* R(g): the reduce items, each storing its per-channel partial sums;
* M1(g): ``fc1_tiles`` MLP tiles over hidden units, a small matrix product over the group's
  samples (forward: a = z W1ᵀ + b1; backward: da = act'(a) · (de W2));
* M2(g): ``fc2_tiles`` MLP tiles over channels (forward: e = act(a) W2ᵀ + b2; backward:
  de and dz/P = da W1 / P);
* S(g): the rescale items (y, or dx).

in the ticket order ``R(0) | M1(0) M2(0) R(1) S(0) | M1(1) M2(1) R(2) S(1) | ... | M1 M2 S of the
last group``, then (backward) ``wgrad_tiles`` weight-gradient tiles, each summing dW1, dW2, db1, db2
over the batch in a fixed order. One counter per group counts finished work: M1 waits for the
group's reduce items, M2 for its M1 tiles, S for its M2 tiles; the weight-gradient tiles wait for
every group's M2 tiles (a global counter). Every wait is on smaller tickets, claimed by programs
already running whose own waits are on still smaller tickets, so the kernel cannot deadlock,
whatever the grid size or the GPU. Weights are read once per group and tile, as small matrix
products (``tl.dot``: tensor cores for half-precision weights).

The counters reset themselves (the last user of each puts it back to zero), so a call needs no
memset launch. Partial sums and batch sums run in a fixed order: results are bitwise
deterministic.

Launch configurations (docs/DESIGN.md §3.1): each regime (map size, dtype) has a small, fixed set
of ``LaunchConfig`` candidates — tile elements (bytes in flight per step), warps, pipeline stages,
a register cap that fixes how many programs an SM holds, MLP tile widths. On a GPU the first call
of a problem times each candidate and keeps the fastest (``pick_config``); the interpreter,
``torch.use_deterministic_algorithms`` and ``SE_FUSED_AUTOTUNE=0`` take the first, and so does a
CUDA graph captured before any choice (which then stays the choice).

Rows that start on multiples of 4 or 8 elements are said so to the compiler (``vector_alignment``,
``device.aligned_view``), so their loads are 8- or 16-byte vectors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
import triton
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError
from triton.runtime.interpreter import InterpretedFunction

from ..debug import forced_schedule, record_launch

ACT_CODES = {"relu": 0, "silu": 1}
GATE_CODES = {"sigmoid": 0, "hard_sigmoid": 1}
OUT_ACT_CODES = {"none": 0, "relu": 1, "silu": 2}
HALF_TYPES = (torch.float16, torch.bfloat16)  # weights whose MLP products run on tensor cores

ITEM_ELEMENTS = 16384  # elements per split item: amortises its two atomics and partial-sum store
SAMPLE_BYTES_PER_PROGRAM = 128 * 1024  # largest sample one program handles alone
INTERPRETER_SMS = 4  # a small pretend GPU, so the interpreter takes both regimes
DOT_MIN = 16  # tl.dot needs every dimension >= 16; also the samples per step of an MLP tile (fewest registers)
WGRAD_SAMPLES = 16  # samples per step of a weight-gradient tile
REGISTERS_PER_SM = 65536  # sm_80 and sm_90
MAX_WARPS_PER_SM = 64  # sm_80 and sm_90
UNCAPPED_PROGRAMS_PER_SM = 4  # no register cap: occupancy unknown before compiling; spare programs retire at once
SMALL_MAP = 196  # P up to 14x14: the MLP, not the memory passes, sets the time
TUNING_RUNS = 5  # launches per timing of a candidate
TUNING_REPEATS = 3  # timings per candidate (median)
TUNING_SPIN_CYCLES = 2_000_000  # ~1 ms of GPU spin: covers the host's queuing of TUNING_RUNS launches


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One candidate launch of the main kernels (docs/DESIGN.md §3.1)."""

    tile_elements: int = 4096  # elements a program holds per loop step of the memory passes
    num_warps: int = 8  # 16 tile elements a thread at 4096: fewer registers than 4 warps
    maxnreg: int | None = None  # a register cap: fixes how many programs an SM holds (None: the compiler's)
    num_stages: int = 3  # Triton's software pipelining of loops (3, its default: next step's loads in registers)
    mlp_block_r: int = 32  # hidden units per M1 tile (upper bound: R rounded up to a power of two)
    mlp_block_c: int = 64  # channels per M2 tile

    def programs_per_sm(self) -> int:
        if self.maxnreg is None:
            return UNCAPPED_PROGRAMS_PER_SM
        return max(1, min(REGISTERS_PER_SM // (self.num_warps * 32 * self.maxnreg),
                          MAX_WARPS_PER_SM // self.num_warps))

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages,
                **({"maxnreg": self.maxnreg} if self.maxnreg else {})}


DEFAULT_CONFIG = LaunchConfig()
# Without pipelining (num_stages 1) the backward needs ~100 registers, not ~250: two programs an SM
# instead of one, but no next step's loads in flight; a register cap keeps the pipelining at two
# programs an SM, with spills. tests/compile_for_gpu.py prints each one's registers and spills.
# Small maps: the MLP tiles set the time; narrower ones spread a group's MLP over more programs.
SMALL_MAP_CONFIGS = (DEFAULT_CONFIG, LaunchConfig(num_stages=1), LaunchConfig(maxnreg=128),
                     LaunchConfig(maxnreg=128, mlp_block_r=16, mlp_block_c=32))
# Large maps: bytes in flight per SM, from programs an SM and elements a step.
LARGE_MAP_CONFIGS = (DEFAULT_CONFIG, LaunchConfig(num_stages=1), LaunchConfig(tile_elements=8192, num_stages=1),
                     LaunchConfig(maxnreg=128))


def candidate_configs(p: int, element_size: int) -> tuple[LaunchConfig, ...]:
    """The regime's candidates, the first one the default. float64 (gradcheck, oracles) keeps one."""
    if element_size == 8:
        return (DEFAULT_CONFIG,)
    return SMALL_MAP_CONFIGS if p <= SMALL_MAP else LARGE_MAP_CONFIGS


def _next_pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, v))


@dataclasses.dataclass(frozen=True)
class Schedule:
    split: bool
    block_c: int
    block_p: int
    item_c: int
    seg_len: int
    num_segments: int
    items_per_sample: int
    group_size: int
    num_groups: int
    mlp_block_r: int  # hidden units per M1 tile (and per K step of M2)
    mlp_block_c: int  # channels per M2 tile (and per K step of M1)
    wgrad_block: int  # channels and hidden units per weight-gradient tile
    fc1_tiles: int
    fc2_tiles: int
    wgrad_tiles: int
    num_tickets: int
    num_programs: int


def resident_programs(device: torch.device, config: LaunchConfig) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * config.programs_per_sm()
    return INTERPRETER_SMS * 4


def l2_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return None


def choose_schedule(n: int, c: int, r: int, p: int, channel_contiguous: bool, element_size: int,
                    device: torch.device, weight_grads: bool = False,
                    config: LaunchConfig = DEFAULT_CONFIG) -> Schedule:
    """Tile sizes and regime for one (N, C, R, P) problem under ``config`` (``debug.force_schedule``
    overrides them). ``weight_grads``: the backward's weight-gradient tiles are part of the launch."""
    forced = forced_schedule()
    tile = config.tile_elements
    if channel_contiguous:
        block_c = forced.get("block_c", min(_next_pow2(c), 128))
        block_p = forced.get("block_p", min(_next_pow2(p), max(1, tile // block_c)))
    else:
        block_p = forced.get("block_p", min(_next_pow2(p), 256))
        block_c = forced.get("block_c", min(_next_pow2(c), max(1, tile // block_p)))
    programs = forced.get("num_programs", resident_programs(device, config))
    channel_blocks = triton.cdiv(c, block_c)
    sample_bytes = c * p * element_size
    split = forced.get("split", not (n >= programs and sample_bytes <= SAMPLE_BYTES_PER_PROGRAM))
    if split:
        tiles_per_item = forced.get("tiles_per_item", max(1, ITEM_ELEMENTS // (block_c * block_p)))
        if n * channel_blocks * triton.cdiv(p, block_p * tiles_per_item) < 2 * programs:
            tiles_per_item = forced.get("tiles_per_item", 1)  # too few items to fill the machine
        item_c = block_c
        seg_len = block_p * min(tiles_per_item, triton.cdiv(p, block_p))
    else:
        item_c, seg_len = channel_blocks * block_c, p
    num_segments = triton.cdiv(p, seg_len)
    items_per_sample = triton.cdiv(c, item_c) * num_segments
    group_size = triton.cdiv(programs, items_per_sample)  # one wave of reduce items per group
    l2 = l2_bytes(device)
    if l2 is not None:  # two groups in flight keep x in half the L2: the rescale re-reads it from there
        group_size = min(group_size, max(1, l2 // (4 * sample_bytes)))
    group_size = min(n, forced.get("group_size", group_size))
    num_groups = triton.cdiv(n, group_size)
    if device.type == "cuda":  # small tiles: many programs share a group's MLP
        mlp_block_r = min(config.mlp_block_r, max(DOT_MIN, _next_pow2(r)))
        mlp_block_c, wgrad_block = config.mlp_block_c, 32
    else:  # the interpreter: its cost is per operation, not per element, so few, large tiles
        mlp_block_r, mlp_block_c, wgrad_block = min(128, max(DOT_MIN, _next_pow2(r))), 256, 128
    mlp_block_r = forced.get("mlp_block_r", mlp_block_r)
    mlp_block_c = forced.get("mlp_block_c", mlp_block_c)
    wgrad_block = forced.get("wgrad_block", wgrad_block)
    fc1_tiles, fc2_tiles = triton.cdiv(r, mlp_block_r), triton.cdiv(c, mlp_block_c)
    wgrad_tiles = triton.cdiv(c, wgrad_block) * triton.cdiv(r, wgrad_block) if weight_grads else 0
    num_tickets = num_groups * (fc1_tiles + fc2_tiles + 2 * group_size * items_per_sample) + wgrad_tiles
    return Schedule(split, block_c, block_p, item_c, seg_len, num_segments, items_per_sample, group_size,
                    num_groups, mlp_block_r, mlp_block_c, wgrad_block, fc1_tiles, fc2_tiles, wgrad_tiles,
                    num_tickets, min(programs, num_tickets))


def vector_alignment(sched: Schedule, channel_contiguous: bool, c: int, p: int, element_size: int,
                     *views: tuple[torch.Tensor, tuple[int, int, int]]) -> tuple[int, int]:
    """(ALIGN_C, ALIGN_P) for the kernels' ``aligned_view``: the largest multiple, up to 16 bytes of
    elements, that every streamed view's rows start on (data pointer, sample stride and the stride
    across rows) and that the row length, segment starts and tiles keep; it goes to the stride across
    rows (ALIGN_C for NCHW rows, ALIGN_P for channels_last), 1 to the other. (1, 1) unless every view
    is contiguous along the same axis: a promise Triton cannot check, so it is made only when true."""
    axis = 1 if channel_contiguous else 2  # (n, c, p) index of the contiguous axis
    across = 3 - axis
    values = [c, sched.item_c, sched.block_c] if channel_contiguous else [p, sched.seg_len, sched.block_p]
    for t, strides in views:
        if strides[axis] != 1 or t.data_ptr() % element_size:
            return 1, 1
        values += [strides[0], strides[across], t.data_ptr() // element_size]
    align = 16 // element_size
    while align > 1 and any(v % align for v in values):
        align //= 2
    return (1, align) if channel_contiguous else (align, 1)


def views_key(views) -> tuple:
    """What of the streamed views a compiled kernel depends on (layouts, 16-byte alignment): part of
    the tuner's problem key, so that a choice is made for the kernel variant that runs."""
    return tuple((strides, t.data_ptr() % 16) for t, strides in views)


class Workspace:
    """Self-resetting counters and partial-sum buffers of one stream (or of the interpreter)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sync = torch.zeros(0, dtype=torch.int32, device=device)
        self.partials: dict[torch.dtype, torch.Tensor] = {}

    def counters(self, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ticket, batch counter, per-group counters), all zero between launches."""
        sync = self.sync  # a local: another thread on this stream may replace self.sync meanwhile
        capacity = sync.numel() - 2
        if capacity < num_groups:
            capacity = max(num_groups, 2 * capacity)
            sync = self.sync = torch.zeros(2 + capacity, dtype=torch.int32, device=self.device)
        return sync[:1], sync[1:2], sync[2:2 + capacity]

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
_tuned: dict[tuple, LaunchConfig] = {}  # problem key -> the fastest candidate measured
_tuned_lock = threading.Lock()


def autotune_enabled(device: torch.device) -> bool:
    """SE_FUSED_AUTOTUNE=0/1 decides; otherwise on for GPUs, off for the interpreter."""
    setting = os.environ.get("SE_FUSED_AUTOTUNE")
    if setting is not None:
        return setting != "0"
    return device.type == "cuda"


def _time_ms(run: Callable[[LaunchConfig], None], config: LaunchConfig, device: torch.device) -> float:
    """One candidate's time per launch, after one launch that compiles it. On a GPU: TUNING_RUNS
    launches between two events on the current stream, queued behind a spin kernel so that the host's
    time to prepare each launch (tens of µs, more than a small problem's kernel) is not counted; the
    median of TUNING_REPEATS such timings. Inputs stay warm in L2 between the launches, as a layer's
    input usually is. Not triton.testing.do_bench: its L2 flush allocates 256 MB, which a training
    step near the memory limit may not have."""
    if device.type != "cuda":
        start = time.perf_counter()
        run(config)
        return (time.perf_counter() - start) * 1e3
    run(config)
    times = []
    for _ in range(TUNING_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(TUNING_SPIN_CYCLES)
        start.record()
        for _ in range(TUNING_RUNS):
            run(config)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / TUNING_RUNS)
    return statistics.median(times)


def pick_config(key: tuple, candidates: tuple[LaunchConfig, ...], run: Callable[[LaunchConfig], None],
                device: torch.device) -> LaunchConfig:
    """The configuration for problem ``key``: ``force_schedule(config=i)``'s choice, else the first
    candidate where tuning is off, else the fastest of one timing of each (``run`` launches one;
    the choice is kept for the process, so repeated calls stay bitwise identical).

    A candidate that this GPU cannot compile, hold or find memory for is skipped. Tuning is off for
    one candidate, under ``torch.use_deterministic_algorithms`` (the choice could differ between
    processes, and with it the rounding), and while a CUDA graph is captured: the graph records the
    first candidate, which becomes the problem's choice, so that eager calls round as the graph does.
    """
    forced = forced_schedule().get("config")
    if forced is not None:
        if not 0 <= forced < len(candidates):
            raise ValueError(f"force_schedule(config={forced}): this problem has {len(candidates)} candidate(s)")
        return candidates[forced]
    if len(candidates) == 1 or not autotune_enabled(device) or torch.are_deterministic_algorithms_enabled():
        return candidates[0]
    tuned = _tuned.get(key)
    if tuned is not None:
        return tuned
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        best = candidates[0]
    else:
        times = []
        for config in candidates:
            try:
                times.append(_time_ms(run, config, device))
            except (OutOfResources, PTXASError, CompileTimeAssertionFailure, torch.cuda.OutOfMemoryError):
                if config is candidates[0]:  # the default is what runs untuned: its failure is the caller's
                    raise
                times.append(math.inf)  # this GPU cannot hold that candidate (registers, shared memory)
        best = candidates[times.index(min(times))]
    with _tuned_lock:
        return _tuned.setdefault(key, best)


def launch(kernel, grid: tuple[int, ...], *args, counted: bool = True, **meta) -> None:
    """One launch; ``counted=False`` (the tuner's timing runs) leaves it out of ``count_kernel_launches``."""
    if counted:
        record_launch(kernel.fn.__name__)
    if uses_interpreter(kernel):
        with _interpreter_lock:  # Triton's interpreter patches triton.language per launch: one at a time
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
