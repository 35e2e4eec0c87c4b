"""The kernels' contract beyond accuracy: launch counts, self-resetting workspace,
determinism, layouts and strides."""

import pytest
import torch
import triton
import triton.language as tl

import se_fused
from se_fused import FusedSE, SEBlock
from se_fused.debug import force_schedule
from se_fused.triton_kernels.device import (
    PHASE_FC1,
    PHASE_FC2,
    PHASE_REDUCE,
    PHASE_RESCALE,
    PHASE_WGRAD,
    decode_ticket,
)
from se_fused.triton_kernels.schedule import workspace


def _pair(device, c=40, r=6, **kwargs):
    torch.manual_seed(1)
    ref = SEBlock(c, rd_channels=r, **kwargs).to(device)
    fused = FusedSE(c, rd_channels=r, backend="triton", **kwargs).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@triton.jit
def _decode_all(out_ptr, num_tickets, group_items, fc1_tiles, fc2_tiles, num_groups):
    for t in range(0, num_tickets):
        phase, group, index = decode_ticket(t, group_items, fc1_tiles, fc2_tiles, num_groups)
        tl.store(out_ptr + 3 * t, phase)
        tl.store(out_ptr + 3 * t + 1, group)
        tl.store(out_ptr + 3 * t + 2, index)


@pytest.mark.parametrize("group_items, fc1_tiles, fc2_tiles, num_groups, wgrad_tiles",
                         [(1, 1, 1, 1, 0), (6, 2, 3, 1, 4), (4, 1, 5, 3, 0), (3, 3, 1, 5, 2)])
def test_ticket_order_is_complete_and_deadlock_free(group_items, fc1_tiles, fc2_tiles, num_groups, wgrad_tiles):
    """Every piece of work has exactly one ticket, and everything it waits for has a smaller one."""
    num_tickets = num_groups * (fc1_tiles + fc2_tiles + 2 * group_items) + wgrad_tiles
    out = torch.full((num_tickets, 3), -1, dtype=torch.int32, device="cuda" if torch.cuda.is_available() else "cpu")
    _decode_all[(1,)](out, num_tickets, group_items, fc1_tiles, fc2_tiles, num_groups)
    decoded = [tuple(row) for row in out.tolist()]
    counts = {PHASE_REDUCE: group_items, PHASE_FC1: fc1_tiles, PHASE_FC2: fc2_tiles, PHASE_RESCALE: group_items}
    expected = {(phase, g, i) for phase, k in counts.items() for g in range(num_groups) for i in range(k)}
    expected |= {(PHASE_WGRAD, 0, i) for i in range(wgrad_tiles)}
    assert sorted(decoded) == sorted(expected)
    ticket = {work: t for t, work in enumerate(decoded)}
    waits_for = {PHASE_FC1: PHASE_REDUCE, PHASE_FC2: PHASE_FC1, PHASE_RESCALE: PHASE_FC2}
    for (phase, g, _), t in ticket.items():
        needed = [w for w in ticket if (phase in waits_for and w[:2] == (waits_for[phase], g))
                  or (phase == PHASE_WGRAD and w[0] == PHASE_FC2)]
        assert all(ticket[w] < t for w in needed), (phase, g, t)


@pytest.mark.parametrize("split", [False, True], ids=["per-sample", "split"])
def test_one_launch_forward_one_backward(split, device):
    _, fused = _pair(device)
    x = torch.randn(3, 40, 7, 7, device=device, requires_grad=True)
    with force_schedule(split=split):
        fused(x).sum().backward()  # warm-up: workspace allocation happens once
        with se_fused.count_kernel_launches() as fwd:
            y = fused(x)
        with se_fused.count_kernel_launches() as bwd:
            y.backward(torch.randn_like(y))
    assert fwd.count == 1, fwd
    assert bwd.count == 1, bwd  # the weight gradients are the backward's last tickets


if torch.cuda.is_available() and se_fused.ops.cuda_kernels_available():

    @pytest.mark.parametrize("split", [False, True], ids=["per-sample", "split"])
    def test_cuda_backend_one_launch_forward_one_backward(split):
        """One kernel each way, weight gradients included, and no fill or memset kernel beside them."""
        torch.manual_seed(1)
        fused = FusedSE(40, rd_channels=6, backend="cuda").cuda()
        x = torch.randn(3, 40, 7, 7, device="cuda", requires_grad=True)
        with force_schedule(split=split), se_fused.poison_outputs(False):  # no NaN fills of the outputs
            fused(x).sum().backward()  # warm-up: the workspace is allocated (and zeroed) once
            grad = torch.randn(3, 40, 7, 7, device="cuda")
            torch.cuda.synchronize()
            with torch.profiler.profile() as prof:
                with se_fused.count_kernel_launches() as fwd:
                    y = fused(x)
                with se_fused.count_kernel_launches() as bwd:
                    torch.autograd.grad(y, [x] + list(fused.parameters()), grad)
                torch.cuda.synchronize()
        assert fwd.count == 1 and bwd.count == 1
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 2 and "se_forward_kernel" in kernels[0] and "se_backward_kernel" in kernels[1], kernels


def test_frozen_weights_backward_is_one_launch(device):
    _, fused = _pair(device)
    fused.requires_grad_(False)
    x = torch.randn(2, 40, 5, 5, device=device, requires_grad=True)
    y = fused(x)
    with se_fused.count_kernel_launches() as bwd:
        y.backward(torch.randn_like(y))
    assert bwd.count == 1, bwd


def test_input_without_grad_gets_weight_grads_only(device):
    ref, fused = _pair(device)
    x = torch.randn(2, 40, 5, 5, device=device)
    g = torch.randn_like(x)
    fused(x).backward(g)
    ref(x).backward(g)
    for p_ref, p_fused in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split", [False, True], ids=["per-sample", "split"])
def test_workspace_counters_reset_and_results_deterministic(split, device):
    _, fused = _pair(device)
    x = torch.randn(5, 40, 9, 9, device=device, requires_grad=True)
    g = torch.randn_like(x)
    results = []
    with force_schedule(split=split, block_c=8, block_p=16, num_programs=4):
        for _ in range(2):
            x.grad = None
            fused.zero_grad(set_to_none=True)
            y = fused(x)
            y.backward(g)
            results.append([y, x.grad] + [p.grad for p in fused.parameters()])
    assert torch.count_nonzero(workspace(x.device).sync).item() == 0, "ticket or counters left set"
    for first, second in zip(*results):
        assert torch.equal(first, second), "two identical calls gave different bits"


@pytest.mark.parametrize("make_x", [
    pytest.param(lambda x: x[:, :, ::2, :], id="strided-rows"),
    pytest.param(lambda x: x.transpose(2, 3), id="transposed-hw"),
    pytest.param(lambda x: x[:, 4:], id="channel-slice"),
    pytest.param(lambda x: x[..., 1:], id="column-slice"),
])
def test_other_strides(make_x, device):
    base = torch.randn(3, 40, 10, 9, device=device)
    ref, fused = _pair(device, c=make_x(base).shape[1])
    x_ref = make_x(base).detach().requires_grad_()
    x_fused = make_x(base).detach().requires_grad_()
    g = torch.randn(x_ref.shape, device=device)
    y_ref, y_fused = ref(x_ref), fused(x_fused)
    y_ref.backward(g)
    y_fused.backward(g)
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_expanded_and_channels_last_upstream_gradients(device):
    ref, fused = _pair(device)
    x = torch.randn(2, 40, 6, 6, device=device)
    for grad in (torch.ones(()).to(device).expand(2, 40, 6, 6),
                 torch.randn(2, 40, 6, 6, device=device).to(memory_format=torch.channels_last)):
        x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref(x_ref).backward(grad)
        fused(x_fused).backward(grad)
        torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def _alignment(x, residual=None):
    from se_fused.spec import spatial_strides
    from se_fused.triton_kernels.schedule import choose_schedule, vector_alignment

    n, c, h, w = x.shape
    channel_contiguous = spatial_strides(x)[1] == 1
    sched = choose_schedule(n, c, 8, h * w, channel_contiguous, x.element_size(), x.device)
    views = [(t, spatial_strides(t)) for t in (x, residual) if t is not None]
    return vector_alignment(sched, channel_contiguous, c, h * w, x.element_size(), *views)


def _cl(t):
    return t.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("make_x, residual_layout, expected", [
    (lambda: torch.randn(2, 16, 14, 14), None, (4, 1)),  # rows of 196: 16-byte starts in float32
    (lambda: torch.randn(2, 16, 14, 14, dtype=torch.bfloat16), None, (4, 1)),  # 8-byte starts
    (lambda: torch.randn(2, 16, 7, 7), None, (1, 1)),  # rows of 49: any start
    (lambda: torch.randn(2, 16, 16, 16), None, (4, 1)),  # Triton knows it already; the hint is true too
    (lambda: _cl(torch.randn(2, 72, 5, 5, dtype=torch.bfloat16)), None, (1, 8)),
    (lambda: _cl(torch.randn(2, 40, 3, 3, dtype=torch.float16)), None, (1, 8)),
    (lambda: _cl(torch.randn(2, 120, 5, 5)), None, (1, 4)),
    (lambda: _cl(torch.randn(2, 6, 5, 5)), None, (1, 2)),
    (lambda: torch.randn(2 * 16 * 196 + 1)[1:].view(2, 16, 14, 14), None, (1, 1)),  # the data starts off 16 bytes
    (lambda: torch.randn(3, 16, 14, 14)[1:], None, (4, 1)),  # a batch slice: still on 16 bytes
    (lambda: torch.randn(2, 16, 14, 14), "channels_last", (1, 1)),  # views contiguous along different axes
    (lambda: torch.randn(2, 16, 14, 14), "nchw_odd", (1, 1)),  # a residual whose data starts off alignment
])
def test_vector_alignment_is_promised_only_when_true(make_x, residual_layout, expected):
    x = make_x()
    residual = None
    if residual_layout == "channels_last":
        residual = _cl(torch.randn(x.shape, dtype=x.dtype))
    elif residual_layout == "nchw_odd":
        residual = torch.randn(x.numel() + 3, dtype=x.dtype)[3:].view(x.shape)
    assert _alignment(x, residual) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, channels_last, out_act", [
    ((3, 24, 14, 14), False, None), ((2, 72, 5, 5), True, None), ((2, 40, 6, 6), True, "silu"),
    ((2, 20, 14, 14), False, "relu"),
], ids=["nchw-14x14", "channels_last-72", "channels_last-40-tail", "nchw-14x14-tail"])
def test_rows_on_4_and_8_element_starts_meet_the_accuracy_rule(shape, channels_last, out_act, dtype, device):
    """Shapes whose rows start on multiples of 2-8 elements but not 16: the kernels' strides pass through
    aligned_view's rounding, so a wrong promise would move rows (and fail here under the interpreter too)."""
    from se_reference import Case, check_against_reference

    n, c, h, w = shape
    check_against_reference(Case(n, c, h, w, 6, act="silu"), "triton", device, dtype, channels_last=channels_last,
                            out_act=out_act, residual=out_act is not None)
