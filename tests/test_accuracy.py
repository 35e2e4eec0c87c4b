"""FusedSE forward output and every gradient against the float64 oracle, for every backend."""

import pytest
import torch

from conftest import BACKEND_DEVICES, backend_params
from se_fused.debug import force_schedule
from se_fused.shapes import MODEL_SHAPES
from se_reference import Case, check_against_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]

MODEL_CASES = [(c, hw, r, act, gate, model) for model, (act, gate, shapes) in MODEL_SHAPES.items()
               for c, hw, r in shapes]
DTYPE_LAYOUTS = [(dtype, channels_last) for dtype in DTYPES for channels_last in (False, True)]


def _dtype_layout_id(combo) -> str:
    return f"{combo[0]}-{'channels_last' if combo[1] else 'nchw'}"


def _spatial(hw: int, device) -> int:
    # The interpreter is slow: on the CPU, spatial sizes above 14 shrink to 14 (7x7 stays 7x7).
    # 14x14 still spreads each sample over many items of the split schedule.
    return hw if device.type == "cuda" else min(hw, 14)


@pytest.mark.parametrize("shape,dtype,channels_last,backend_device",
                         backend_params(MODEL_CASES, DTYPE_LAYOUTS, lambda s: f"{s[5]}-{s[0]}x{s[1]}x{s[1]}-r{s[2]}",
                                        _dtype_layout_id))
def test_model_shapes(shape, dtype, channels_last, backend_device):
    c, hw, r, act, gate, _ = shape
    backend, device = backend_device
    hw = _spatial(hw, device)
    check_against_reference(Case(2, c, hw, hw, r, act, gate), backend, device, dtype, channels_last=channels_last)


EDGE_CASES = [
    Case(1, 1, 1, 1, 1),
    Case(3, 3, 7, 7, 1),
    Case(2, 3, 112, 112, 4),
    Case(1, 48, 112, 112, 6),
    Case(3, 1152, 1, 1, 48),
    Case(2, 1152, 7, 7, 222),
    Case(1, 48, 7, 7, 222),
    Case(5, 1, 7, 7, 4),
    Case(2, 48, 1, 7, 1),
    Case(2, 6, 5, 1, 6),
    Case(33, 24, 3, 5, 6),
]


@pytest.mark.parametrize("case,dtype,channels_last,backend_device",
                         backend_params(EDGE_CASES, DTYPE_LAYOUTS, str, _dtype_layout_id))
def test_edge_shapes(case, dtype, channels_last, backend_device):
    check_against_reference(case, *backend_device, dtype, channels_last=channels_last)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_act_gate_bias(act, gate, bias, dtype, channels_last, backend_device):
    check_against_reference(Case(3, 40, 9, 11, 6, act, gate, bias), *backend_device, dtype,
                            channels_last=channels_last)


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_precision_float32_params(dtype, channels_last, backend_device):
    check_against_reference(Case(4, 96, 14, 14, 4, "silu"), *backend_device, dtype, channels_last=channels_last,
                            param_dtype=torch.float32)


def test_float64(backend_device):
    check_against_reference(Case(3, 72, 7, 7, 24, "relu", "hard_sigmoid"), *backend_device, torch.float64)


# Forced schedules: both regimes, samples cut into many items of odd sizes, groups and
# programs that do and do not divide the work. Under the interpreter this runs the real
# ticket / counter / flag logic, one program after another.
SCHEDULES = [
    dict(split=False),
    dict(split=False, block_c=8, block_p=4),
    dict(split=True, block_c=8, block_p=16, tiles_per_item=1, group_size=1, num_programs=1),
    dict(split=True, block_c=16, block_p=8, tiles_per_item=3, group_size=2, num_programs=3),
    dict(split=True, block_c=4, block_p=32, tiles_per_item=2, group_size=5, num_programs=64, mlp_block_r=16,
         mlp_block_c=16),
    dict(split=True, block_c=64, block_p=64, tiles_per_item=1, group_size=3, num_programs=7, mlp_block_r=32,
         mlp_block_c=64, wgrad_block=32),  # the MLP tiles a GPU takes
]


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_forced_triton_schedules(schedule, channels_last, device):
    with force_schedule(**schedule):
        _check_schedule_cases("triton", device, channels_last)


if ("cuda", "cuda") in BACKEND_DEVICES:  # defined only where it can run: a GPU and the CUDA extension

    CUDA_SCHEDULES = [dict(split=False), dict(split=True), dict(split=True, group_size=1, num_programs=1),
                      dict(split=True, group_size=2, num_programs=5), dict(split=False, group_size=17, num_programs=3)]

    @pytest.mark.parametrize("channels_last", LAYOUTS)
    @pytest.mark.parametrize("schedule", CUDA_SCHEDULES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
    def test_forced_cuda_schedules(schedule, channels_last):
        with force_schedule(**schedule):
            _check_schedule_cases("cuda", torch.device("cuda"), channels_last)
            for case in (Case(300, 48, 7, 7, 12), Case(3, 256, 56, 56, 16), Case(2, 2048, 7, 7, 128)):
                check_against_reference(case, "cuda", torch.device("cuda"), torch.float16,
                                        channels_last=channels_last)
            for out_act in ("relu", "silu"):  # the residual tail's variant of the kernels
                for case in (Case(300, 48, 7, 7, 12), Case(3, 256, 56, 56, 16)):
                    check_against_reference(case, "cuda", torch.device("cuda"), torch.bfloat16,
                                            channels_last=channels_last, out_act=out_act, residual=True)


    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
    @pytest.mark.parametrize("channels_last", LAYOUTS)
    def test_cuda_mlp_tiles(dtype, channels_last):
        # 40 samples in one group: MLP tiles over 3 chunks of 16 samples (the last short), 2 fc1 tiles
        # over R = 36 and 3 fc2 tiles over C = 72 (32 outputs each), K steps of 8 with remainders;
        # every dtype's weight loads (16-byte rows of 8, 4 or 2 elements).
        with force_schedule(group_size=40):
            check_against_reference(Case(40, 72, 3, 3, 36, "silu"), "cuda", torch.device("cuda"), dtype,
                                    channels_last=channels_last)
            if dtype == torch.bfloat16:  # float32 weights with bfloat16 x, as under autocast
                check_against_reference(Case(40, 72, 3, 3, 36, "silu"), "cuda", torch.device("cuda"), dtype,
                                        channels_last=channels_last, param_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_mlp_tiles(dtype, device):
    # The MLP as matrix products over a group of samples: 40 samples in one group (3 steps of 16),
    # 3 fc1 tiles over R = 36, 3 fc2 tiles over C = 40, 2 x 2 weight-gradient tiles summing 3 steps
    # of 16 samples.
    with force_schedule(group_size=40, mlp_block_r=16, mlp_block_c=16, wgrad_block=32):
        check_against_reference(Case(40, 40, 3, 3, 36, "silu"), "triton", device, dtype)


def _check_schedule_cases(backend, device, channels_last):
    # Small, so the interpreter takes the smallest forced tiles in seconds; still several channel
    # blocks, segments with remainders, and several MLP tiles at 16 units.
    check_against_reference(Case(5, 20, 5, 7, 6, "silu"), backend, device, torch.float32,
                            channels_last=channels_last)
    check_against_reference(Case(4, 72, 5, 5, 36, "relu", "hard_sigmoid"), backend, device, torch.float16,
                            channels_last=channels_last)
