"""Beyond accuracy: NaN and Inf behave as in eager, threads, sizes past 2**31 elements, hidden-width limits."""

import contextlib
import fcntl
import os
import tempfile
import threading

import pytest
import torch

import se_fused
from conftest import BACKEND_DEVICES
from se_fused import FusedSE, SEBlock
from se_fused.ops import extension_available


def _pair(backend, device, act="relu", gate="sigmoid", c=12, r=5):
    torch.manual_seed(3)
    ref = SEBlock(c, rd_channels=r, act=act, gate=gate).to(device)
    fused = FusedSE(c, rd_channels=r, act=act, gate=gate, backend=backend).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _run(block, x, g):
    x = x.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    y = block(x)
    y.backward(g)
    return {"y": y.detach(), "x": x.grad, **{name: p.grad for name, p in block.named_parameters()}}


@pytest.mark.parametrize("where", ["x", "grad"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("act,gate", [("relu", "sigmoid"), ("silu", "hard_sigmoid")])
def test_nan_and_inf_propagate_as_in_eager(where, value, act, gate, any_backend_device):
    """One non-finite value: every output and gradient is NaN / ±Inf exactly where eager's is (AMP's
    GradScaler skips a step only if the non-finite value reaches the gradients)."""
    backend, device = any_backend_device
    ref, fused = _pair(backend, device, act, gate)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 12, 4, 5, generator=gen).to(device)
    g = torch.randn(x.shape, generator=gen).to(device)
    (x if where == "x" else g)[1, 7, 2, 3] = value
    expected, got = _run(ref, x, g), _run(fused, x, g)
    assert not torch.isfinite(expected["fc1.weight"]).all()  # the case reaches the weight gradients
    for name, ref_value in expected.items():
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(got[name]).cpu(), kind(ref_value).cpu()), f"{name}: {kind.__name__} differs"
        finite = torch.isfinite(ref_value)
        torch.testing.assert_close(got[name][finite], ref_value[finite], rtol=1e-4, atol=1e-5, msg=name)


def test_threads_share_the_workspaces_safely(any_backend_device):
    """Several Python threads calling the kernels at once get what one thread alone gets, bit for bit."""
    backend, device = any_backend_device
    shapes = [(2, 40, 9, 9), (5, 24, 7, 7), (1, 64, 12, 12), (3, 40, 5, 5)]
    blocks = {c: _pair(backend, device, c=c, r=6)[1] for c in {s[1] for s in shapes}}
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(s, generator=gen).to(device), torch.randn(s, generator=gen).to(device)) for s in shapes]
    alone = [_run(blocks[x.shape[1]], x, g) for x, g in data]
    results, errors = [None] * len(data), []

    def work(i):
        try:
            x, g = data[i]
            for _ in range(3):  # no zero_grad across threads sharing a block: compare y and dx only
                xr = x.detach().clone().requires_grad_()
                y = blocks[x.shape[1]](xr)
                (dx,) = torch.autograd.grad(y, xr, g)
                results[i] = (y, dx)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (y, dx), expected in zip(results, alone):
        assert torch.equal(y, expected["y"]) and torch.equal(dx, expected["x"])


def _available_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


@contextlib.contextmanager
def _one_big_memory_test_at_a_time():
    """An inter-process lock: each case below holds ~13 GiB, and under pytest-xdist two at once passed
    their free-memory check together and ran a 23 GiB machine out of memory (the OOM killer took a worker)."""
    with open(os.path.join(tempfile.gettempdir(), "se_fused_big_memory_test.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.mark.skipif(not extension_available(), reason="needs the C++ kernel (CI builds it)")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_more_than_2_to_the_31_elements(channels_last):
    """The C++ kernel indexes with 64 bits: x of 2**31 + 65536 bfloat16 elements, forward and backward."""
    with _one_big_memory_test_at_a_time():
        h, w = 32768, 32769  # 2 channels x 32768 x 32769 > 2**31: channel 1 ends past element 2**31
        need = 3 * 2 * h * w * 2 + (1 << 30)
        if _available_memory_bytes() < need:
            pytest.skip(f"needs {need / 2**30:.1f} GiB of free memory")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.zeros(1, 2, h, w, dtype=torch.bfloat16).contiguous(memory_format=memory_format)
        marks = {(0, 0, 0): 1.5, (1, 0, 0): 2.0, (1, h - 1, w - 1): 4.0, (0, h - 1, w - 1): -3.0}
        for (c, i, j), v in marks.items():
            x[0, c, i, j] = v
        gen = torch.Generator().manual_seed(6)
        w1, w2 = torch.randn(3, 2, generator=gen), torch.randn(2, 3, generator=gen)
        b1, b2 = torch.randn(3, generator=gen), torch.randn(2, generator=gen)
        y, z, a, e = torch.ops.se_fused.se_forward(x, w1, b1, w2, b2, "silu", "sigmoid")

        p = h * w
        z_expected = torch.tensor([[1.5 - 3.0, 2.0 + 4.0]], dtype=torch.float64) / p
        torch.testing.assert_close(z.double(), z_expected, rtol=1e-6, atol=0)
        s = torch.sigmoid(e[0])
        assert torch.count_nonzero(y).item() == len(marks)  # every other element written, as 0 (poisoned: NaN)
        for (c, i, j), v in marks.items():
            torch.testing.assert_close(y[0, c, i, j].float(), (v * s[c]).bfloat16().float())
        del y

        dx, *_ = torch.ops.se_fused.se_backward(x, x, w1, w2, z, a, e, "silu", "sigmoid", True, True, True, False)
        assert torch.isfinite(dx.float().sum())  # nothing left poisoned
        ref_s, ref_z, ref_a, ref_e = (t.double() for t in (s, z, a, e))
        ds = torch.tensor([[1.5**2 + 3.0**2, 2.0**2 + 4.0**2]], dtype=torch.float64)
        from se_fused.torch_backend import activation_backward, gate_backward

        dz = activation_backward(gate_backward(ds, ref_e, "sigmoid") @ w2.double(), ref_a, "silu") @ w1.double()
        for (c, i, j), v in list(marks.items()) + [((1, h - 1, 0), 0.0), ((0, h // 2, w // 2), 0.0)]:
            expected = v * ref_s[c] + dz[0, c] / p  # dx = g·s + dz/P with g = x
            torch.testing.assert_close(dx[0, c, i, j].double(), expected.bfloat16().double(), rtol=1e-2, atol=1e-12)


WIDE_HIDDEN = 8193  # one past the limit the CUDA kernels had while they kept R accumulators in shared memory


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_every_kernel_tiles_any_hidden_width(backend, device):
    """No kernel family limits R: a very wide MLP gives the PyTorch backend's result."""
    gen = torch.Generator().manual_seed(6)
    x, g = torch.randn(2, 4, 2, 2, generator=gen).to(device), torch.randn(2, 4, 2, 2, generator=gen).to(device)
    w1 = torch.randn(WIDE_HIDDEN, 4, generator=gen).to(device) / 2
    w2 = torch.randn(4, WIDE_HIDDEN, generator=gen).to(device) / WIDE_HIDDEN ** 0.5
    for name, got, expected in zip(("y", "x.grad", "w1.grad", "w2.grad"), _grads(backend, x, g, w1, w2),
                                   _grads("torch", x, g, w1, w2)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)


def _grads(backend, x, g, w1, w2):
    x, w1, w2 = (t.detach().clone().requires_grad_() for t in (x, w1, w2))
    y = se_fused.squeeze_excite(x, w1, None, w2, None, backend=backend)
    y.backward(g)
    return y.detach(), x.grad, w1.grad, w2.grad
