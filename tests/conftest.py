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
from se_fused.triton_kernels import interpreter_enabled  # noqa: E402

# Devices the Triton backend is tested on: the GPU, or the CPU under the interpreter.
TRITON_DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if interpreter_enabled() else [])


@pytest.fixture(params=TRITON_DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every buffer a kernel should write starts as NaN, so an unwritten element fails."""
    with se_fused.poison_outputs():
        yield
