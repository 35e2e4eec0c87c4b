"""The fused residual tail, y = out_act(x * s + residual): every backend against the float64 oracle
(y, dx, d(residual), every parameter gradient), gradcheck and gradgradcheck, schedules, bad input, NaN."""

import pytest
import torch

import se_fused
from conftest import ALL_BACKEND_DEVICES, BACKEND_DEVICES, TRITON_DEVICES, interpreted
from se_fused.debug import force_schedule
from se_reference import Case, check_against_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TAILS = [pytest.param(("relu", True), id="relu"), pytest.param(("silu", True), id="silu"),
         pytest.param((None, True), id="add-only"), pytest.param(("relu", False), id="relu-no-residual")]
# SE-ResNet-50-like stages (small maps: the Triton interpreter runs every program in Python)
CASES = [Case(2, 256, 7, 7, 16), Case(3, 64, 9, 5, 4, "silu", "hard_sigmoid"), Case(2, 2048, 2, 2, 128)]
INTERPRETER_CASES = [Case(2, 64, 7, 7, 16), Case(3, 24, 9, 5, 4, "silu", "hard_sigmoid")]
# the interpreted Triton backend takes minutes per gradcheck; its float64 results are checked against
# the oracle below (test_residual_in_another_layout_and_mixed_precision), and the double backward is
# the same PyTorch formula on every backend
COMPILED_BACKEND_DEVICES = [bd for bd in ALL_BACKEND_DEVICES if not interpreted(*bd)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tail", TAILS)
def test_tail_against_the_oracle(tail, dtype, channels_last, any_backend_device):
    backend, device = any_backend_device
    out_act, residual = tail
    for case in INTERPRETER_CASES if interpreted(backend, device) else CASES:
        check_against_reference(case, backend, device, dtype, channels_last=channels_last, out_act=out_act,
                                residual=residual)


@pytest.mark.parametrize("out_act", ["relu", "silu"])
def test_residual_in_another_layout_and_mixed_precision(out_act, any_backend_device):
    backend, device = any_backend_device
    case = Case(3, 40, 6, 5, 10, "silu")
    check_against_reference(case, backend, device, torch.float32, channels_last=True, out_act=out_act,
                            residual=True, residual_channels_last=False)
    check_against_reference(case, backend, device, torch.bfloat16, param_dtype=torch.float32, out_act=out_act,
                            residual=True)
    check_against_reference(case, backend, device, torch.float64, out_act=out_act, residual=True)


@pytest.mark.parametrize("backend,device", COMPILED_BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in COMPILED_BACKEND_DEVICES])
@pytest.mark.parametrize("out_act", ["none", "relu", "silu"])
def test_gradcheck_and_gradgradcheck(out_act, backend, device):
    gen = torch.Generator().manual_seed(3)

    def t(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()

    inputs = (t(2, 6, 3, 4), t(3, 6), t(3), t(6, 3), t(6), t(2, 6, 3, 4))

    def fn(x, w1, b1, w2, b2, residual):
        return se_fused.squeeze_excite(x, w1, b1, w2, b2, act="silu", backend=backend, residual=residual,
                                       out_act=out_act)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


SCHEDULES = [dict(split=False, block_c=8, block_p=16),
             dict(split=True, block_c=8, block_p=16, tiles_per_item=1, group_size=1, num_programs=1),
             dict(split=True, block_c=16, block_p=8, tiles_per_item=3, group_size=2, num_programs=3)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_tail_under_forced_triton_schedules(schedule, channels_last, device):
    with force_schedule(**schedule):
        for out_act in ("relu", "silu"):
            check_against_reference(Case(5, 20, 5, 7, 6, "silu"), "triton", torch.device(device), torch.float32,
                                    channels_last=channels_last, out_act=out_act, residual=True)


def test_one_launch_forward_and_no_extra_launch_backward():
    """The tail adds no kernel launch: forward one, backward as without the tail."""
    for backend, device in BACKEND_DEVICES:
        block = se_fused.FusedSE(16, 4, out_act="relu", backend=backend).to(device)
        x = torch.randn(2, 16, 5, 5, device=device, requires_grad=True)
        residual = torch.randn_like(x, requires_grad=True)
        with se_fused.count_kernel_launches() as forward_launches:
            y = block(x, residual)
        with se_fused.count_kernel_launches() as backward_launches:
            y.sum().backward()
        plain = se_fused.FusedSE(16, 4, backend=backend).to(device)
        with se_fused.count_kernel_launches() as plain_launches:
            plain(x).sum().backward()
        assert forward_launches.count == 1, forward_launches
        assert forward_launches.count + backward_launches.count == plain_launches.count, (backend, backward_launches)


@pytest.mark.parametrize("backend", ["cpp", "torch"] + (["triton"] if TRITON_DEVICES == ["cpu"] else []))
def test_bad_residual_and_out_act_are_named(backend):
    if backend == "cpp" and not se_fused.ops.extension_available():
        pytest.skip("the C++ extension is not built here")
    x = torch.randn(2, 8, 3, 3)
    block = se_fused.FusedSE(8, 4, out_act="relu", backend=backend)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(2, 8, 3, 3\), got \(2, 8, 3, 4\)"):
        block(x, torch.randn(2, 8, 3, 4))
    with pytest.raises(TypeError, match="residual must have x's dtype torch.float32, got torch.float64"):
        block(x, torch.randn(2, 8, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual is on meta but x is on cpu"):
        block(x, torch.randn(2, 8, 3, 3, device="meta"))
    with pytest.raises(ValueError, match="residual must have 4 dimensions"):
        block(x, torch.randn(2, 8, 9))
    with pytest.raises(ValueError, match="out_act must be one of 'none', 'relu', 'silu', got 'gelu'"):
        se_fused.squeeze_excite(x, block.fc1.weight, None, block.fc2.weight, None, backend=backend, out_act="gelu")
    with pytest.raises(ValueError, match="out_act must be one of 'relu', 'silu', got 'tanh'"):
        se_fused.FusedSE(8, out_act="tanh")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_backward_op_asks_for_what_the_tail_needs(backend):
    """The backward op of a ReLU tail needs y (its mask): a named error without it."""
    if backend == "cpp" and not se_fused.ops.extension_available():
        pytest.skip("the C++ extension is not built here")
    x = torch.randn(2, 8, 3, 3)
    w1, w2 = torch.randn(2, 8), torch.randn(8, 2)
    y, z, a, e = se_fused.ops.run_forward(backend, x, w1, None, w2, None, "relu", "sigmoid", x, "relu")
    with pytest.raises(ValueError, match="the backward of out_act='relu' needs y, got None"):
        se_fused.ops.run_backward(backend, x, x, w1, w2, z, a, e, "relu", "sigmoid", False, False, True, True,
                                  None, None, "relu", True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_silu_tail_without_a_residual(channels_last, any_backend_device):
    """out_act='silu' with no residual, y = silu(x * s): its backward recomputes x * s alone."""
    backend, device = any_backend_device
    case = INTERPRETER_CASES[0] if interpreted(backend, device) else CASES[0]
    check_against_reference(case, backend, device, torch.float32, channels_last=channels_last, out_act="silu",
                            residual=False)


@pytest.mark.parametrize("out_act", ["relu", "silu"])
@pytest.mark.parametrize("where", ["x", "residual", "grad"])
def test_nan_and_inf_propagate_as_in_eager(where, out_act, any_backend_device):
    backend, device = any_backend_device
    torch.manual_seed(0)
    eager = se_fused.SEBlock(8, 2, out_act=out_act).to(device)
    fused = se_fused.FusedSE(8, 2, out_act=out_act, backend=backend).to(device)
    fused.load_state_dict(eager.state_dict())
    x, residual, g = (torch.randn(3, 8, 4, 4, device=device) for _ in range(3))
    {"x": x, "residual": residual, "grad": g}[where][1, 2, 1, 3] = float("nan")
    {"x": x, "residual": residual, "grad": g}[where][2, 5, 0, 0] = float("inf")
    results = []
    for block in (eager, fused):
        xi, ri = x.clone().requires_grad_(), residual.clone().requires_grad_()
        y = block(xi, ri)
        y.backward(g)
        results.append((y, xi.grad, ri.grad))
    for expected, got in zip(*results):
        assert torch.equal(expected.isnan(), got.isnan()) and torch.equal(expected.isinf(), got.isinf())
        # the values too: ReLU's backward passes the gradient where y is NaN (threshold_backward)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4, equal_nan=True)


def test_auto_runs_the_tail_on_cuda_tensors_with_triton_until_the_cuda_tail_has_run_on_a_gpu():
    """backend='cuda' accepts the tail; 'auto' keeps Triton for it (docs/DESIGN.md §11)."""
    from se_fused.functional import _auto

    assert _auto("cuda", True) in ("triton", "torch")


@pytest.mark.parametrize("name,blocks", [("seresnet18", 8), ("seresnet50", 16), ("seresnext26t_32x4d", 8)])
def test_fuse_residual_converts_timm_blocks_with_the_same_outputs_and_state_dict(name, blocks):
    import copy
    import io

    import timm

    from se_fused.debug import randomize_batch_norms

    backend = "cpp" if se_fused.ops.extension_available() else "torch"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    randomize_batch_norms(model, calibrate_with=torch.randn(4, 3, 64, 64))
    fused = copy.deepcopy(model)
    assert se_fused.convert_se_modules(fused, backend=backend, fuse_residual=True) == blocks
    assert sum(type(m).__name__.endswith("WithFusedTail") for m in fused.modules()) == blocks
    assert sum(isinstance(m, se_fused.FusedSE) and m.out_act == "relu" for m in fused.modules()) == blocks
    assert fused.state_dict().keys() == model.state_dict().keys()

    x = torch.randn(2, 3, 64, 64)
    model.eval(), fused.eval()
    with torch.no_grad():  # float32: errors against float64 within 2x the original's
        exact = copy.deepcopy(model).double()(x.double())
        eager_error = (model(x).double() - exact).abs().max().item()
        fused_error = (fused(x).double() - exact).abs().max().item()
        assert fused_error <= 2 * eager_error + 1e-6 * exact.abs().max().item()
    model.double().train(), fused.double().train()  # training gradients, in float64
    for m in (model, fused):
        m(x.double()).square().mean().backward()
    grads = dict(model.named_parameters())
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=0, atol=1e-9 * grads[n].grad.abs().max().item(), msg=n)

    buffer = io.BytesIO()  # the generated block classes pickle
    torch.save(fused, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x.double()), fused.eval()(x.double()))


def test_fuse_residual_leaves_stochastic_depth_blocks_alone():
    import timm

    model = timm.create_model("seresnet18", pretrained=False, drop_path_rate=0.1)  # rate 0 in the first block only
    assert se_fused.convert_se_modules(model, fuse_residual=True) == 8
    blocks = [m for m in model.modules() if hasattr(m, "drop_path")]
    assert len(blocks) == 8 and sum(b.drop_path is None for b in blocks) == 1
    for block in blocks:
        assert type(block).__name__.endswith("WithFusedTail") == (block.drop_path is None)
