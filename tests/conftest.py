"""Test setup: Triton runs on the GPU when there is one, else in its CPU interpreter.

TRITON_INTERPRET must be set before se_fused's kernels are defined, so before
se_fused is imported anywhere in the session.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import se_fused  # noqa: E402
from se_fused.ops import cuda_kernels_available, extension_available  # noqa: E402
from se_fused.triton_kernels import interpreter_enabled  # noqa: E402

# Devices the Triton backend is tested on: the GPU, or the CPU under the interpreter.
TRITON_DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if interpreter_enabled() else [])

# Every fused backend with the device it runs on here.
BACKEND_DEVICES = (
    [("triton", d) for d in TRITON_DEVICES]
    + ([("cuda", "cuda")] if torch.cuda.is_available() and cuda_kernels_available() else [])
    + ([("cpp", "cpu")] if extension_available() else [])
)

if os.environ.get("SE_FUSED_REQUIRE_EXTENSION") == "1" and not extension_available():
    # CI builds the extension; a silently pure-Python install must not pass for a tested one.
    raise RuntimeError(f"SE_FUSED_REQUIRE_EXTENSION=1 but se_fused._C did not load: {se_fused.ops.EXTENSION_ERROR}")


@pytest.fixture(params=TRITON_DEVICES)
def device(request):
    """A device for the Triton backend."""
    return torch.device(request.param)


# ... and the PyTorch-ops backend, which shares their op contract and autograd.
ALL_BACKEND_DEVICES = BACKEND_DEVICES + [("torch", "cpu")]


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda bd: f"{bd[0]}-{bd[1]}")
def backend_device(request):
    """(backend name, device) for every fused backend available here."""
    backend, device = request.param
    return backend, torch.device(device)


@pytest.fixture(params=ALL_BACKEND_DEVICES, ids=lambda bd: f"{bd[0]}-{bd[1]}")
def any_backend_device(request):
    """(backend name, device) for every backend, the PyTorch-ops one included."""
    backend, device = request.param
    return backend, torch.device(device)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every buffer a kernel should write starts as NaN, so an unwritten element fails."""
    with se_fused.poison_outputs():
        yield


@pytest.fixture(autouse=True)
def untuned_launches(monkeypatch):
    """The Triton launchers take each regime's first configuration: tuning would time (and compile)
    every candidate of every new problem. tests/test_launch_configs.py checks the others and the tuner."""
    monkeypatch.setenv("SE_FUSED_AUTOTUNE", "0")


def interpreted(backend: str, device) -> bool:
    """Triton under its CPU interpreter (device: a name or a torch.device): every kernel operation runs in
    Python (tens of ms a ticket)."""
    return backend == "triton" and torch.device(device).type == "cpu"


def backend_params(cases, combos, case_id, combo_id):
    """pytest params (case, *combo, (backend, device)) for every case, combo and fused backend here,
    except that under the Triton interpreter case i runs in combo i mod len(combos) only: each
    combo still meets several cases, at a fraction of the interpreter's time. A GPU runs them all."""
    params = []
    for i, case in enumerate(cases):
        for j, combo in enumerate(combos):
            for backend, device in BACKEND_DEVICES:
                if interpreted(backend, device) and j != i % len(combos):
                    continue
                params.append(pytest.param(case, *combo, (backend, torch.device(device)),
                                           id=f"{backend}-{device}-{case_id(case)}-{combo_id(combo)}"))
    return params
