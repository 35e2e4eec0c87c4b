"""Instruments for tests and profiling: a count of the package's own kernel launches,
NaN-poisoned output buffers (so an element a kernel forgot to write cannot pass for a
correct one), one switch that forces the schedule of both kernel families, and BatchNorm
weights that let a whole model's output show what its SE modules do."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .extension import native

# Process-wide, not thread-local: autograd runs CUDA backward passes on its own threads.
_counters: list["LaunchCount"] = []
_poison = False
_forced: dict = {}

SCHEDULE_FIELDS = ("config", "split", "group_size", "num_programs", "block_c", "block_p", "tiles_per_item",
                   "mlp_block_r", "mlp_block_c", "wgrad_block")


class LaunchCount:
    """How many kernels se_fused launched inside a ``count_kernel_launches`` block."""

    def __init__(self) -> None:
        self.count = 0
        self.kernels: list[str] = []

    def __repr__(self) -> str:
        return f"LaunchCount(count={self.count}, kernels={self.kernels})"


@contextlib.contextmanager
def count_kernel_launches() -> Iterator[LaunchCount]:
    """Count se_fused's kernel launches (forward and backward), e.g.::

        with se_fused.count_kernel_launches() as launches:
            y = fused_se(x)
        assert launches.count == 1
    """
    counter = LaunchCount()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def record_launch(kernel_name: str) -> None:
    for counter in _counters:
        counter.count += 1
        counter.kernels.append(kernel_name)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Fill every buffer a kernel is meant to overwrite with NaN before launch (every backend);
    ``enabled=False`` turns that off inside, e.g. to count the kernels a call launches."""
    global _poison
    previous, _poison = _poison, enabled
    if native is not None:
        native.set_poison_outputs(enabled)
    try:
        yield
    finally:
        _poison = previous
        if native is not None:
            native.set_poison_outputs(previous)


def new_output(shape, *, like: torch.Tensor | None = None, dtype=None, device=None) -> torch.Tensor:
    """``torch.empty`` (or ``empty_like``, keeping ``like``'s strides) that is NaN-filled under poisoning."""
    out = torch.empty_like(like, dtype=dtype) if like is not None else torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan"))
    return out


@contextlib.contextmanager
def force_schedule(**fields) -> Iterator[None]:
    """Override the schedule heuristics of the Triton and the CUDA kernels (tests use it to force
    samples across many work items and programs).

    Fields, all optional:
      config:         index of the Triton launch configuration among the problem's candidates
                      (``triton_kernels.schedule.candidate_configs``), instead of the tuner's choice
      split:          False: one program per sample; True: samples cut into items taken from tickets
      group_size:     samples per ticket group (split)
      num_programs:   programs (CUDA: blocks) in the grid (split)
      block_c, block_p, tiles_per_item: Triton tile sizes (the CUDA kernels' tiles follow their
                      thread layout and are not forced)
      mlp_block_r, mlp_block_c, wgrad_block: the Triton MLP tiles (hidden units per fc1 tile,
                      channels per fc2 tile, both per weight-gradient tile; each at least 16)
    """
    unknown = set(fields) - set(SCHEDULE_FIELDS)
    if unknown:
        raise ValueError(f"force_schedule got unknown fields {sorted(unknown)}; allowed: {list(SCHEDULE_FIELDS)}")
    previous = dict(_forced)
    _forced.update(fields)
    _apply_native_schedule()
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)
        _apply_native_schedule()


def forced_schedule() -> dict:
    """The fields ``force_schedule`` set (read by the Triton launchers)."""
    return _forced


def _apply_native_schedule() -> None:
    if native is not None:
        split = _forced.get("split")
        native.set_forced_schedule(-1 if split is None else int(split), _forced.get("group_size", 0),
                                   _forced.get("num_programs", 0))


CUDA_PLAN_FIELDS = ("split", "block_c", "item_c", "seg_len", "num_segments", "items_per_sample", "group_size",
                   "num_groups", "fc1_splits", "fc1_tiles", "fc2_tiles", "wgrad_tiles", "num_tickets", "num_blocks")
CUDA_WORK_FIELDS = ("phase", "group", "index", "n0", "n1", "reduced", "excited", "n", "seg", "c0", "c1", "p0", "p1")
CUDA_PHASES = ("reduce", "fc1", "fc2", "rescale", "weight_grads")


def cuda_schedule(n: int, c: int, r: int, p: int, *, channels_last: bool = False, element_size: int = 2,
                  num_sms: int = 132, blocks_per_sm: int = 2, l2_bytes: int = 60 * 2**20, weight_grads: bool = False,
                  split: bool | None = None, group_size: int = 0, num_blocks: int = 0) -> tuple[dict, list[dict]]:
    """The CUDA kernels' schedule of an (N, C, R, P) problem, computed on the CPU by the kernels' own
    planner and ticket decoder (csrc/cuda/se_cuda.cu): the plan, and what each ticket stands for
    (``phase`` one of CUDA_PHASES). The GPU's SM count, L2 size and the kernel's occupancy (blocks an
    SM holds; on a GPU the launch asks the CUDA runtime) are arguments, so that any GPU's schedule can
    be checked without one; ``split``, ``group_size`` and ``num_blocks`` force the
    heuristics' choices, as ``force_schedule`` does for a launch."""
    if native is None or not native.with_cuda:
        raise RuntimeError("se_fused.debug.cuda_schedule needs se_fused._C built with the CUDA kernels")
    flat = native.cuda_schedule(n, c, r, p, int(channels_last), element_size, num_sms, blocks_per_sm, l2_bytes,
                                int(weight_grads), -1 if split is None else int(split), group_size, num_blocks)
    k = len(CUDA_PLAN_FIELDS)
    plan = dict(zip(CUDA_PLAN_FIELDS, flat[:k]))
    width = len(CUDA_WORK_FIELDS)
    tickets = [dict(zip(CUDA_WORK_FIELDS, flat[i:i + width])) for i in range(k, len(flat), width)]
    for t in tickets:
        t["phase"] = CUDA_PHASES[t["phase"]]
    return plan, tickets


def randomize_batch_norms(model: torch.nn.Module, seed: int = 1, calibrate_with: torch.Tensor | None = None) -> None:
    """Give every BatchNorm of `model` random but tame affine weights and running statistics.

    timm zero-initialises the last norm of each residual block, which hides the SE path from the
    model's output; comparing a converted model with its original is only a test of the SE modules
    after this. With `calibrate_with` (a batch of inputs), the running statistics are those of the
    activations that batch produces instead: activations then stay near unit scale through deep
    random networks, which otherwise grow block by block until float32 rounding differences are
    amplified beyond comparison.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            for t, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.1, 0.1), (m.running_mean, -0.1, 0.1),
                                 (m.running_var, 0.5, 1.5)):
                if t is not None:
                    t.copy_(torch.empty(t.shape).uniform_(low, high, generator=gen))
        if calibrate_with is not None:
            momenta, training = [m.momentum for m in norms], model.training
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: the statistics of exactly this batch
            model.train()(calibrate_with)
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            model.train(training)
