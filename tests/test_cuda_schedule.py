"""The CUDA kernels' schedule, checked without a GPU: the kernels' own planner and ticket decoder
(csrc/cuda/se_cuda.cu, reached through se_fused.debug.cuda_schedule) for the GPUs we target.

Run in ticket order by one block (the least concurrency a launch can have), every wait must already
be met, and met by exactly the work it stands for: a wait met only by later tickets would deadlock a
GPU whose blocks are all waiting, one met too early would read results not yet written. Every
element must be reduced and rescaled exactly once, every MLP and weight-gradient tile run once, and
every counter be back at zero at the end (the next launch's starting state).
"""

from __future__ import annotations

import collections
import math

import pytest

from se_fused import ops
from se_fused.debug import cuda_schedule

pytestmark = pytest.mark.skipif(not ops.cuda_kernels_available(), reason="se_fused._C built without the CUDA kernels")

MLP_SAMPLES, MLP_OUTPUTS, MLP_SPLIT_K, WGRAD_TILE = 16, 32, 256, 32  # csrc/cuda/se_cuda.h, se_cuda.cu
H200 = dict(num_sms=132, l2_bytes=60 * 2**20)
A100 = dict(num_sms=108, l2_bytes=40 * 2**20)

PROBLEMS = [  # (N, C, R, P, channels_last, element_size, gpu, forced)
    (128, 2048, 128, 49, False, 2, H200, {}),  # SE-ResNet-50 stage 4: wide MLP, small map
    (128, 2048, 128, 49, True, 2, H200, {}),
    (128, 256, 16, 3136, False, 2, H200, {}),  # stage 1: large map, short MLP
    (64, 1152, 48, 49, True, 4, A100, {}),  # EfficientNet-B0, float32
    (64, 960, 240, 49, False, 2, A100, {}),  # MobileNetV3
    (600, 64, 8, 49, False, 4, dict(num_sms=4, l2_bytes=2**20), {}),  # batch past residency: an item a sample
    (37, 100, 7, 300, False, 8, H200, dict(group_size=16)),  # a short last group, float64
    (5, 33, 3, 17, True, 2, H200, dict(split=True, num_blocks=3)),
    (5, 33, 3, 17, False, 2, H200, dict(split=False, group_size=2)),
    (1, 1, 1, 1, False, 4, H200, {}),
]


def _ids(problem):
    n, c, r, p, cl, es, gpu, forced = problem
    return f"{n}x{c}x{p}-r{r}-{'cl' if cl else 'nchw'}-{es}B-{gpu['num_sms']}sm" + "".join(f"-{k}{v}" for k, v in forced.items())


@pytest.mark.parametrize("weight_grads", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[_ids(p) for p in PROBLEMS])
def test_schedule_runs_in_ticket_order_and_covers_everything(problem, weight_grads):
    n, c, r, p, channels_last, element_size, gpu, forced = problem
    plan, tickets = cuda_schedule(n, c, r, p, channels_last=channels_last, element_size=element_size,
                                  weight_grads=weight_grads, **gpu, **forced)
    for key, value in forced.items():
        assert plan[key] == value
    _check_schedule(plan, tickets, n, c, r, p, weight_grads)


@pytest.mark.parametrize("fault", ["rescale before its group's MLP", "fc2 before fc1", "a reduce item lost",
                                   "a counter left at one"])
def test_the_check_catches_a_broken_schedule(fault):
    """The check above fails on each kind of fault a decoder could have."""
    n, c, r, p = 40, 72, 36, 300
    plan, tickets = cuda_schedule(n, c, r, p, weight_grads=True, group_size=16, **H200)
    phases = [t["phase"] for t in tickets]
    if fault == "rescale before its group's MLP":
        i, j = phases.index("fc2"), phases.index("rescale")
        tickets.insert(i, tickets.pop(j))
    elif fault == "fc2 before fc1":
        i, j = phases.index("fc1"), phases.index("fc2")
        tickets[i], tickets[j] = tickets[j], tickets[i]
    elif fault == "a reduce item lost":
        tickets[phases.index("reduce")] = dict(tickets[0], index=tickets[1]["index"])
    else:
        tickets[phases.index("rescale")]["excited"] -= 1  # its group's counter never reaches its reset count
    with pytest.raises(AssertionError):
        _check_schedule(plan, tickets, n, c, r, p, True)


def _check_schedule(plan, tickets, n, c, r, p, weight_grads):
    gs, groups = plan["group_size"], plan["num_groups"]
    assert 1 <= gs <= n and groups == math.ceil(n / gs)
    chunks = math.ceil(gs / MLP_SAMPLES)
    assert plan["fc1_splits"] == math.ceil(c / MLP_SPLIT_K)
    assert plan["fc1_tiles"] == chunks * plan["fc1_splits"] * math.ceil(r / MLP_OUTPUTS)
    assert plan["fc2_tiles"] == chunks * math.ceil(c / MLP_OUTPUTS)
    assert plan["wgrad_tiles"] == (math.ceil(c / WGRAD_TILE) * math.ceil(r / WGRAD_TILE) if weight_grads else 0)
    assert len(tickets) == plan["num_tickets"] and 1 <= plan["num_blocks"] <= plan["num_tickets"]
    if plan["split"]:
        assert plan["seg_len"] % 256 == 0  # every pack width divides a segment's start

    def group_samples(g):
        return g * gs, min(n, (g + 1) * gs)

    counters = collections.Counter()  # per group, as the kernel's: arrivals, back to zero by the last user
    batch = 0
    done = collections.defaultdict(collections.Counter)  # per group: finished work by phase
    reduced_area = collections.Counter()
    rescaled_area = collections.Counter()
    seen = collections.defaultdict(set)  # (phase, group) -> indices
    mlps_done = groups * plan["fc2_tiles"]
    for ticket, w in enumerate(tickets):
        phase, g = w["phase"], w["group"]
        assert (w["index"] not in seen[phase, g]), f"ticket {ticket} repeats {phase} {w['index']} of group {g}"
        seen[phase, g].add(w["index"])
        if phase == "weight_grads":
            assert 0 <= w["index"] < plan["wgrad_tiles"]
            assert batch >= mlps_done, f"ticket {ticket} would wait for later tickets"
            assert all(done[h]["fc2"] == plan["fc2_tiles"] for h in range(groups))
            batch += 1
            if batch == mlps_done + plan["wgrad_tiles"]:
                batch = 0
            continue
        n0, n1 = group_samples(g)
        assert (w["n0"], w["n1"]) == (n0, n1) and 0 <= g < groups
        items = (n1 - n0) * plan["items_per_sample"]
        assert w["reduced"] == items and w["excited"] == items + plan["fc1_tiles"] + plan["fc2_tiles"]
        if phase in ("reduce", "rescale"):
            assert 0 <= w["index"] < gs * plan["items_per_sample"]
            if w["n"] >= n:  # a short last group's missing sample: skipped, not counted
                assert n1 - n0 < gs
                continue
            assert n0 <= w["n"] < n1
            assert 0 <= w["c0"] < w["c1"] <= c and 0 <= w["p0"] < w["p1"] <= p
            assert w["c0"] % plan["block_c"] == 0 and w["p0"] % plan["seg_len"] == 0
            area = (w["c1"] - w["c0"]) * (w["p1"] - w["p0"])
            if phase == "reduce":
                reduced_area[w["n"]] += area
                done[g]["reduce"] += 1
                counters[g] += 1
            else:
                assert counters[g] >= w["excited"], f"ticket {ticket} (rescale) would wait for later tickets"
                assert done[g]["fc2"] == plan["fc2_tiles"] and reduced_area[w["n"]] == c * p
                rescaled_area[w["n"]] += area
                counters[g] += 1
                if counters[g] == w["excited"] + w["reduced"]:
                    counters[g] = 0
        elif phase == "fc1":
            assert 0 <= w["index"] < plan["fc1_tiles"]
            assert counters[g] >= w["reduced"], f"ticket {ticket} (fc1) would wait for later tickets"
            assert done[g]["reduce"] == items
            done[g]["fc1"] += 1
            counters[g] += 1
        else:
            assert phase == "fc2" and 0 <= w["index"] < plan["fc2_tiles"]
            assert counters[g] >= w["reduced"] + plan["fc1_tiles"], f"ticket {ticket} (fc2) would wait for later tickets"
            assert done[g]["fc1"] == plan["fc1_tiles"]
            done[g]["fc2"] += 1
            counters[g] += 1
            if weight_grads:
                batch += 1
    assert reduced_area == rescaled_area == {m: c * p for m in range(n)}
    assert all(done[g]["fc1"] == plan["fc1_tiles"] and done[g]["fc2"] == plan["fc2_tiles"] for g in range(groups))
    assert len(seen["weight_grads", 0]) == plan["wgrad_tiles"]
    assert not +counters and batch == 0, "a counter is not back at zero for the next launch"



def test_small_wide_maps_spread_the_mlp_over_many_tiles():
    """128 x 2048 x 7 x 7, R = 128 on an H200 (the shape the first GPU run found 10x slower than eager,
    its MLP in one block a sample): every group's MLP is tens of tiles, each over 16 samples, fc1's
    2048 channels in 8 splits (4 steps of 8 channels a warp), the group's fc1 tiles one wave."""
    plan, _ = cuda_schedule(128, 2048, 128, 49, **H200)
    assert plan["group_size"] >= 64 and plan["fc1_splits"] == 8
    assert 128 <= plan["fc1_tiles"] <= plan["num_blocks"] and plan["fc2_tiles"] >= 256


@pytest.mark.parametrize("blocks_per_sm", [1, 2, 3])
def test_grid_is_what_the_gpu_holds_at_once(blocks_per_sm):
    """The grid is the SMs times the kernel's occupancy (on a GPU, the CUDA runtime's answer for the
    kernel variant launched), never more blocks than tickets, and the batch-past-residency choice
    (an item a sample) follows the same count."""
    plan, _ = cuda_schedule(128, 256, 16, 56 * 56, blocks_per_sm=blocks_per_sm, **H200)
    assert plan["num_blocks"] == 132 * blocks_per_sm
    small, _ = cuda_schedule(4, 64, 4, 49, blocks_per_sm=blocks_per_sm, **H200)
    assert small["num_blocks"] == small["num_tickets"] < 132
    resident = 4 * blocks_per_sm
    below, _ = cuda_schedule(resident - 1, 64, 8, 49, num_sms=4, blocks_per_sm=blocks_per_sm, l2_bytes=2**20)
    at, _ = cuda_schedule(resident, 64, 8, 49, num_sms=4, blocks_per_sm=blocks_per_sm, l2_bytes=2**20)
    assert below["split"] and not at["split"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_short_maps_take_larger_items(channels_last):
    """A ticket costs an atomic, a fence and a counter update: on 7x7 maps an item is ~16K elements
    (NCHW: several blocks of 32 channels; channels_last: a step of 256 channels, where 64 gave a
    thread 1-2 positions) while the batch keeps two items a resident block; 56x56 segments are
    already that size."""
    resident = 132 * 2
    small, _ = cuda_schedule(128, 2048, 128, 49, channels_last=channels_last, split=True, **H200)
    assert small["block_c"] == (256 if channels_last else 32)
    assert small["item_c"] % small["block_c"] == 0 and 8192 <= small["item_c"] * 49 <= 16384
    assert 128 * small["items_per_sample"] >= 2 * resident
    large, _ = cuda_schedule(128, 256, 16, 56 * 56, channels_last=channels_last, **H200)
    assert large["split"] and large["item_c"] == large["block_c"] == (64 if channels_last else 32)


@pytest.mark.parametrize("c, p, element_size, block_c", [
    (2048, 49, 2, 256), (960, 49, 2, 256), (96, 49, 2, 64), (200, 49, 2, 128), (2048, 49, 4, 128),
    (2048, 49, 8, 64), (480, 196, 2, 64), (2048, 64, 2, 256), (2048, 100, 2, 128)])
def test_channels_last_steps_widen_on_short_maps(c, p, element_size, block_c):
    """channels_last walks block_c channels a step with rows of threads along positions, as many
    rows as 256 threads x 16 bytes / block_c leave: the step widens (up to 256 channels, not past C)
    while a thread keeps at most 8 positions to walk."""
    plan, _ = cuda_schedule(64, c, 16, p, channels_last=True, element_size=element_size, **H200)
    assert plan["block_c"] == block_c
    rows = 256 * (16 // element_size) // block_c
    assert math.ceil(p / rows) <= 8
