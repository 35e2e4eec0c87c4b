"""The float64 oracle and the accuracy rule every backend is held to.

Rule: for each output and gradient, the fused error against float64 math is at
most twice the error of eager PyTorch (``SEBlock``) in the same dtype, plus a
floor of a few units in the last place at the tensor's scale (the eager error
can be near zero by luck, and summation order legitimately differs).
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from se_fused import SEBlock

# About two ulps at unit scale for the half types; for float32/float64, room for a
# different summation order over up to ~10^5 terms.
ERROR_FLOOR = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 2e-5,
    torch.float64: 1e-11,
}

GRAD_NAMES = ("x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    c: int
    h: int
    w: int
    r: int
    act: str = "relu"
    gate: str = "sigmoid"
    bias: bool = True

    def __str__(self) -> str:
        return f"{self.n}x{self.c}x{self.h}x{self.w}-r{self.r}-{self.act}-{self.gate}{'' if self.bias else '-nobias'}"


def seeded(case: Case, *extra) -> torch.Generator:
    """A generator seeded from the case, so failures reproduce but every case gets its own data."""
    return torch.Generator().manual_seed(zlib.crc32(repr((case, extra)).encode()))


def make_block(case: Case, cls=SEBlock, **kwargs) -> SEBlock:
    return cls(case.c, rd_channels=case.r, bias=case.bias, act=case.act, gate=case.gate, **kwargs)


def oracle_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate):
    """The SE function written out in elementwise float64 ops, independent of every backend.

    Not SEBlock: torch's float64 hardsigmoid backward uses a float32 1/6 (a 1e-8 error).
    """
    z = x.mean((2, 3))
    a = z @ fc1_weight.flatten(1).T + (0 if fc1_bias is None else fc1_bias)
    h = torch.clamp(a, min=0) if act == "relu" else a / (1 + torch.exp(-a))
    e = h @ fc2_weight.flatten(1).T + (0 if fc2_bias is None else fc2_bias)
    s = 1 / (1 + torch.exp(-e)) if gate == "sigmoid" else torch.clamp(e + 3, 0, 6) / 6
    return x * s[:, :, None, None]


def oracle_tail(t, out_act):
    """The residual tail's activation in elementwise float64 ops."""
    if out_act == "relu":
        return torch.clamp(t, min=0)
    return t / (1 + torch.exp(-t)) if out_act == "silu" else t


class Oracle(torch.nn.Module):
    """`oracle_forward` with SEBlock's parameters, so it runs through `run_block` like the others."""

    def __init__(self, block: SEBlock) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act, self.gate = block.fc1, block.fc2, block.act, block.gate
        self.out_act = block.out_act

    def forward(self, x, residual=None):
        y = oracle_forward(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.act, self.gate)
        return oracle_tail(y if residual is None else y + residual, self.out_act)


def run_block(block, x, grad, residual=None):
    """Forward and backward; returns {"y": ..., "x": dx, "fc1.weight": ..., ...} (and "residual": its
    gradient when there is one)."""
    x = x.detach().clone().requires_grad_()
    args = (x,) if residual is None else (x, residual.detach().clone().requires_grad_())
    block.zero_grad(set_to_none=True)
    y = block(*args)
    y.backward(grad)
    out = {"y": y.detach(), "x": x.grad}
    if residual is not None:
        out["residual"] = args[1].grad
    out.update({name: p.grad for name, p in block.named_parameters()})
    return out


def check_against_reference(case: Case, backend: str, device, dtype, *, channels_last=False, param_dtype=None,
                            out_act=None, residual=False, residual_channels_last=None):
    """Run FusedSE with `backend` on `device` and assert the accuracy rule; with the residual tail
    y = out_act(x * s + residual) when `residual` (in its own layout if `residual_channels_last` is
    given) or `out_act` is set."""
    from se_fused import FusedSE

    param_dtype = param_dtype or dtype
    gen = seeded(case, dtype, channels_last, param_dtype, out_act, residual, residual_channels_last)
    oracle = make_block(case, out_act=out_act).double()
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            # weights ~ U(-2, 2)/sqrt(fan_in) (twice default init, so gates spread out), biases ~ U(-0.5, 0.5);
            # rounded to param_dtype so the oracle sees exactly the parameters the others get
            scale = 2 / p[0].numel() ** 0.5 if name.endswith("weight") else 0.5
            p.copy_(((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale).to(param_dtype))
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen).to(dtype)
    grad = torch.randn(x.shape, generator=gen).to(dtype)
    res = torch.randn(x.shape, generator=gen).to(dtype) if residual else None
    if channels_last:
        x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    if res is not None and (channels_last if residual_channels_last is None else residual_channels_last):
        res = res.to(memory_format=torch.channels_last)

    def on(device_, t):
        return None if t is None else t.to(device_)

    expected = run_block(Oracle(oracle), x.double(), grad.double(), None if res is None else res.double())
    eager = make_block(case, out_act=out_act).to(device=device, dtype=dtype)
    eager.load_state_dict(oracle.state_dict())
    eager_out = run_block(eager, x.to(device), grad.to(device), on(device, res))
    fused = make_block(case, FusedSE, backend=backend, out_act=out_act).to(device=device, dtype=param_dtype)
    fused.load_state_dict(oracle.state_dict())
    fused_out = run_block(fused, x.to(device), grad.to(device), on(device, res))

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert fused_out["y"].dtype == dtype and fused_out["x"].dtype == dtype
    assert fused_out["y"].is_contiguous(memory_format=memory_format), "y lost x's memory format"
    assert fused_out["x"].is_contiguous(memory_format=memory_format), "dx lost x's memory format"
    for name in ("y", "residual") + GRAD_NAMES:
        if name not in expected:
            continue
        full_size = name in ("y", "x", "residual")
        ref = expected[name]
        got = fused_out[name].cpu()
        assert got.dtype == (dtype if full_size else param_dtype), f"{name} has dtype {got.dtype}"
        err = (got.double() - ref).abs().max().item()
        eager_err = (eager_out[name].cpu().double() - ref).abs().max().item()
        floor = ERROR_FLOOR[dtype if full_size else param_dtype] * max(1.0, ref.abs().max().item())
        bound = 2 * eager_err + floor
        assert err <= bound, (f"{case} {dtype} channels_last={channels_last}: {name} error {err:.3g} exceeds "
                              f"{bound:.3g} (eager error {eager_err:.3g}, floor {floor:.3g})")
