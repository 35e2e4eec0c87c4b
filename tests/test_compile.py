"""Whole converted models under torch.compile(fullgraph=True) and torch.export, every backend;
CUDA graph capture on the first call (GPU only)."""

import pytest
import timm
import torch

import se_fused
from conftest import ALL_BACKEND_DEVICES, interpreted

# Three models (their activations, gates and block structures) for the compiled kernels; the smallest
# only for the interpreter (Triton in Python, at a small size) and for the PyTorch-ops backend, whose
# ops go through the same functional layer and fake kernels (CI's time is short).
MODELS = ["mobilenetv3_large_100", "efficientnet_b0", "seresnet50"]
CASES = [(model, backend, device) for backend, device in ALL_BACKEND_DEVICES for model in MODELS
         if model == "mobilenetv3_large_100" or not (interpreted(backend, device) or backend == "torch")]


def _converted(model_name, backend, device, seed=0, fuse_residual=False):
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False).to(device)
    for m in model.modules():  # timm zero-inits some BN weights, hiding the SE path from the gradients checked
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    assert se_fused.convert_se_modules(model, backend=backend, fuse_residual=fuse_residual) > 0
    return model


def _forward_backward(run, model, x):
    model.zero_grad(set_to_none=True)
    loss = run(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if ".se." in n}


@pytest.mark.parametrize("model_name,backend,device", CASES, ids=[f"{m}-{b}-{d}" for m, b, d in CASES])
def test_compile_fullgraph_forward_and_backward(model_name, backend, device):
    torch._dynamo.reset()
    model = _converted(model_name, backend, device).train()
    size = 16 if interpreted(backend, device) else 32  # the interpreter: 1x1 maps at the end
    x = torch.randn(2, 3, size, size, device=device)
    loss, grads = _forward_backward(model, model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fake kernels, AOT forward + backward
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # compiles and runs
        compiled_loss, compiled_grads = _forward_backward(compiled, model, x)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
    assert grads
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    ran = {e.name.split(".")[0] for e in prof.events() if e.name.startswith("se_fused::")}
    suffix = "" if backend in ("cpp", "cuda") else f"_{backend}"
    assert ran == {f"se_fused::se_forward{suffix}", f"se_fused::se_backward{suffix}"}, ran


TAIL_CASES = [(b, d) for b, d in ALL_BACKEND_DEVICES if not interpreted(b, d)]  # interpreter: too slow


@pytest.mark.parametrize("backend,device", TAIL_CASES, ids=[f"{b}-{d}" for b, d in TAIL_CASES])
def test_compile_fullgraph_with_the_fused_residual_tail(backend, device):
    """SE-ResNet-18 with fuse_residual=True (generated block classes, residual and out_act through
    the ops) traces fullgraph forward and backward and computes what it computes eagerly."""
    torch._dynamo.reset()
    model = _converted("seresnet18", backend, device, fuse_residual=True).train()
    assert any(type(m).__name__ == "BasicBlockWithFusedTail" for m in model.modules())
    x = torch.randn(2, 3, 32, 32, device=device)
    loss, grads = _forward_backward(model, model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grads = _forward_backward(compiled, model, x)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_compile_with_inductor_keeps_the_ops():
    """The default backend (Inductor, C++ codegen on the CPU) around fused blocks, both activations and
    gates: same results, and the fused ops run inside the compiled code. (A small network: Inductor
    compiles a whole timm model in a minute of CI's time; the converted models run under aot_eager above.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.BatchNorm2d(24), torch.nn.ReLU(),
        se_fused.FusedSE(24, rd_channels=6), torch.nn.Conv2d(24, 40, 1), torch.nn.Hardswish(),
        se_fused.FusedSE(40, rd_channels=10, act="silu", gate="hard_sigmoid")).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(x)
        compiled(x)  # compiles
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert sum(e.name.startswith("se_fused::se_forward") for e in prof.events()) == 2


@pytest.mark.parametrize("backend,device", ALL_BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in ALL_BACKEND_DEVICES])
def test_export(backend, device):
    block = se_fused.FusedSE(24, rd_channels=6, act="silu", backend=backend).to(device)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, padding=1), block).to(device).eval()
    x = torch.randn(2, 3, 8, 8, device=device)
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("se_fused" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


if torch.cuda.is_available():

    @pytest.mark.parametrize("backend", ["cuda", "triton"])
    def test_cuda_graph_capture_on_the_first_call(backend):
        """No warm-up: the workspace a captured launch uses belongs to the graph, and eager calls after
        the capture use their own."""
        torch.manual_seed(0)
        block = se_fused.FusedSE(40, rd_channels=6, backend=backend).cuda()
        stream = torch.cuda.Stream()  # a stream se_fused has never seen
        x = torch.randn(3, 40, 9, 9, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.no_grad():
            with torch.cuda.graph(graph, stream=stream):
                y = block(x)
            for _ in range(3):
                x.copy_(torch.randn_like(x))
                graph.replay()
                eager = block(x)  # eager calls between replays on the same stream
                torch.testing.assert_close(y, eager)
                torch.testing.assert_close(y, se_fused.SEBlock.forward(block, x), rtol=1e-5, atol=1e-5)
        torch.cuda.synchronize()
