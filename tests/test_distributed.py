"""A converted model trained data-parallel: DistributedDataParallel and FSDP2 (fully_shard) over two
CPU processes (gloo) give the gradients one process gets on the whole batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import se_fused
from conftest import ALL_BACKEND_DEVICES

BATCH, WORLD = 8, 2
CPU_BACKENDS = [b for b, d in ALL_BACKEND_DEVICES if d == "cpu"]


def _model(backend: str) -> torch.nn.Module:
    """A small network with two SE blocks (no BatchNorm: per-rank batch statistics would differ), converted."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), se_fused.SEBlock(16, rd_channels=4),
        torch.nn.Conv2d(16, 24, 3, stride=2, padding=1), torch.nn.SiLU(),
        se_fused.SEBlock(24, rd_channels=6, act="silu", gate="hard_sigmoid"),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(24, 5))
    assert se_fused.convert_se_modules(model, backend=backend) == 2
    return model


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 8, 8, generator=gen), torch.randint(0, 5, (BATCH,), generator=gen)


def _loss(model, x, target):
    return torch.nn.functional.cross_entropy(model(x), target)


def _worker(rank: int, port: int, mode: str, backend: str, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model(backend)
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            wrapped = fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        x, target = _data()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        _loss(wrapped, x[shard], target[shard]).backward()
        grads = {}
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = grad.detach().clone()
        if rank == 0:
            torch.save(grads, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])  # FSDP2's fully_shard: torch >= 2.6 (we need >= 2.11)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_data_parallel_gradients_match_one_process(mode, backend, tmp_path):
    model = _model(backend)
    x, target = _data()
    _loss(model, x[:BATCH // WORLD], target[:BATCH // WORLD]).backward()
    rank0_alone = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    _loss(model, x, target).backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert not torch.allclose(rank0_alone["2.fc1.weight"], expected["2.fc1.weight"])  # the test can fail
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(_free_port(), mode, backend, str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
