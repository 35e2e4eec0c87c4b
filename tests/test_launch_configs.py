"""The Triton kernels' launch configurations (docs/DESIGN.md §3.1): every candidate of every regime
meets the accuracy rule, and the tuner times each candidate once, keeps the fastest, stays out of
the launch count, and is off where it must be."""

import pytest
import torch
from triton.runtime.errors import OutOfResources

import se_fused
from se_fused import FusedSE
from se_fused.debug import force_schedule
from se_fused.triton_kernels import backward, forward, schedule
from se_fused.triton_kernels.schedule import SMALL_MAP, candidate_configs

from conftest import TRITON_DEVICES
from se_reference import Case, check_against_reference

# One SE shape of each regime: a small map (the MLP sets the time) and a large one.
REGIME_CASES = {"small-map": Case(3, 48, 7, 7, 40, act="silu"), "large-map": Case(2, 24, 16, 16, 6, gate="hard_sigmoid")}


def test_regimes_have_their_candidates():
    assert 7 * 7 <= SMALL_MAP < 16 * 16
    for p in (49, 256):
        configs = candidate_configs(p, 2)
        assert len(configs) == len(set(configs)) >= 2
        assert configs[0] == schedule.DEFAULT_CONFIG
        assert all(c.programs_per_sm() >= 1 and c.num_warps in (4, 8) for c in configs)
    assert candidate_configs(49, 8) == (schedule.DEFAULT_CONFIG,)  # float64: one configuration
    capped = schedule.LaunchConfig(maxnreg=128)
    assert capped.programs_per_sm() == 2  # 128 registers x 256 threads: two programs fill an SM's registers
    assert capped.launch_options() == {"num_warps": 8, "num_stages": 3, "maxnreg": 128}


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("regime", list(REGIME_CASES))
@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32-nchw", "bfloat16-channels_last"])
def test_every_candidate_meets_the_accuracy_rule(regime, dtype, channels_last, device):
    case = REGIME_CASES[regime]
    configs = candidate_configs(case.h * case.w, dtype.itemsize)
    seen = set()
    for index, config in enumerate(configs):
        mlp = {}
        if device == "cpu":
            # the interpreter ignores launch options: candidates with the same tiles are the same run there
            tiles = (config.tile_elements, config.mlp_block_r, config.mlp_block_c)
            if tiles in seen:
                continue
            seen.add(tiles)
            # and picks its own (large) MLP tiles: force the ones the candidate sets on a GPU
            mlp = dict(mlp_block_r=config.mlp_block_r, mlp_block_c=config.mlp_block_c)
        with force_schedule(config=index, **mlp):
            check_against_reference(case, "triton", device, dtype, channels_last=channels_last)


FASTEST = 3  # the candidate the fake clock favours: its launch options differ from the default's


@pytest.fixture
def tuning(monkeypatch):
    """Tuning on (also in the interpreter), a fake clock that makes candidate FASTEST the fastest, and
    an empty choice cache; yields the list of timed configurations."""
    monkeypatch.setenv("SE_FUSED_AUTOTUNE", "1")
    monkeypatch.setattr(schedule, "_tuned", {})
    timed = []

    def fake_time_ms(run, config, device):
        run(config)
        timed.append(config)
        return 0.5 if config is candidate_configs(49, 4)[FASTEST] else 1.0

    monkeypatch.setattr(schedule, "_time_ms", fake_time_ms)
    return timed


@pytest.fixture
def counted_launch_options(monkeypatch):
    """The launch options (num_warps, num_stages, maxnreg) of every counted Triton launch."""
    options = []

    def recording_launch(kernel, grid, *args, counted=True, **meta):
        if counted:
            options.append({k: meta.get(k) for k in ("num_warps", "num_stages", "maxnreg")})
        schedule.launch(kernel, grid, *args, counted=counted, **meta)

    monkeypatch.setattr(forward, "launch", recording_launch)
    monkeypatch.setattr(backward, "launch", recording_launch)
    return options


def _fused(device):
    torch.manual_seed(3)
    return FusedSE(48, rd_channels=40, backend="triton").to(device)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_tuner_times_every_candidate_once_and_keeps_the_fastest(tuning, counted_launch_options, device):
    fused = _fused(device)
    x = torch.randn(3, 48, 7, 7, device=device, requires_grad=True)
    configs = candidate_configs(49, x.element_size())
    assert configs[FASTEST].launch_options() != configs[0].launch_options()
    with se_fused.count_kernel_launches() as launches:
        y = fused(x)
        y.backward(torch.ones_like(y))
    assert launches.count == 2, launches  # the timing runs are not counted
    assert tuning == list(configs) * 2  # forward, then backward: each candidate timed once
    assert sorted(schedule._tuned.values(), key=str) == [configs[FASTEST]] * 2
    chosen = {k: configs[FASTEST].launch_options().get(k) for k in ("num_warps", "num_stages", "maxnreg")}
    assert counted_launch_options == [chosen] * 2  # what runs is the choice
    y = fused(x)
    y.backward(torch.ones_like(y))  # (an expanded gradient, as from .sum(), is another kernel variant)
    assert len(tuning) == 2 * len(configs)  # the choice is kept: no more timing
    assert counted_launch_options == [chosen] * 4


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("failing", [1, 0], ids=["a-candidate", "the-default"])
def test_tuner_skips_a_candidate_the_gpu_cannot_hold(tuning, monkeypatch, failing, device):
    configs = candidate_configs(49, 4)
    timed = []

    def time_ms(run, config, device):
        if config is configs[failing]:
            raise OutOfResources(300000, 232448, "shared memory")
        timed.append(config)
        return float(len(timed))  # the first that runs is the fastest

    monkeypatch.setattr(schedule, "_time_ms", time_ms)
    fused = _fused(device)
    x = torch.randn(2, 48, 7, 7, device=device)
    if failing == 0:
        with pytest.raises(OutOfResources):
            fused(x)
        return
    y = fused(x)
    assert list(schedule._tuned.values()) == [configs[0]] and timed == [c for c in configs if c is not configs[1]]
    with force_schedule(config=0):
        assert torch.equal(y, fused(x))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("why", ["SE_FUSED_AUTOTUNE=0", "deterministic algorithms", "forced"])
def test_tuner_stays_off(tuning, monkeypatch, why, device):
    fused = _fused(device)
    x = torch.randn(2, 48, 7, 7, device=device)
    if why == "SE_FUSED_AUTOTUNE=0":
        monkeypatch.setenv("SE_FUSED_AUTOTUNE", "0")
        fused(x)
    elif why == "deterministic algorithms":
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            fused(x)
        finally:
            torch.use_deterministic_algorithms(previous)
    else:
        with force_schedule(config=2):
            fused(x)
    assert tuning == [] and schedule._tuned == {}


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_forced_config_out_of_range_is_named(device):
    fused = FusedSE(8, rd_channels=4, backend="triton").to(device=device, dtype=torch.float64)
    with force_schedule(config=1), pytest.raises(ValueError, match=r"config=1.*1 candidate"):
        fused(torch.randn(1, 8, 3, 3, device=device, dtype=torch.float64))
