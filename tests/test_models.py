"""The SENet family: every SENet of timm converts, SE-Inception-v3 and SE-Inception-ResNet-v2 build,
train and match their eager twins, and SE's parameter count follows the paper's formula."""

import copy
from functools import partial

import pytest
import timm
import torch

import se_fused
from se_fused.debug import randomize_batch_norms
from se_fused.models import se_inception_resnet_v2, se_inception_v3

# timm's SENets (the SENet paper's networks) and how many SE modules each holds.
TIMM_SENETS = {
    "seresnet18": 8, "seresnet34": 16, "seresnet50": 16, "seresnet101": 33, "seresnet152": 50,
    "seresnext50_32x4d": 16, "seresnext101_32x4d": 33, "senet154": 50,
    "legacy_seresnet18": 8, "legacy_seresnet34": 16, "legacy_seresnet50": 16, "legacy_seresnet101": 33,
    "legacy_seresnet152": 50, "legacy_seresnext26_32x4d": 8, "legacy_seresnext50_32x4d": 16,
    "legacy_seresnext101_32x4d": 33, "legacy_senet154": 50,
}

# The C++ kernel where it is built (the model sizes make the Triton interpreter too slow for CI).
BACKEND = "cpp" if se_fused.ops.extension_available() else "torch"


@pytest.mark.parametrize("name", TIMM_SENETS)
def test_every_timm_senet_converts_and_computes_the_same(name):
    """float32: the converted model's error against float64 math at most 2x the original's; float64: equal."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    randomize_batch_norms(model, calibrate_with=torch.randn(4, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    converted = copy.deepcopy(model)
    assert se_fused.convert_se_modules(converted, backend=BACKEND) == TIMM_SENETS[name]
    assert not any(type(m).__name__ == "SEModule" for m in converted.modules())
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        scale = exact.abs().max().item()
        eager_error = (model(x).double() - exact).abs().max().item()
        fused_error = (converted(x).double() - exact).abs().max().item()
        assert fused_error <= 2 * eager_error + 1e-6 * scale
        torch.testing.assert_close(converted.double()(x.double()), exact, rtol=0, atol=1e-10 * scale)


# (builder without dropout, so that training-mode outputs are comparable; SE blocks)
BUILDERS = {"se_inception_v3": (partial(se_inception_v3, dropout=0.0), 11),
            "se_inception_resnet_v2": (partial(se_inception_resnet_v2, drop_rate=0.0), 40)}


@pytest.mark.parametrize("name", BUILDERS)
def test_se_model_trains_like_its_eager_twin(name):
    build, se_blocks = BUILDERS[name]
    torch.manual_seed(0)
    eager = build(num_classes=10, fused=False)
    randomize_batch_norms(eager, calibrate_with=torch.randn(4, 3, 75, 75))
    fused = build(num_classes=10, backend=BACKEND)
    assert fused.state_dict().keys() == eager.state_dict().keys()
    fused.load_state_dict(eager.state_dict())
    assert sum(type(m) is se_fused.FusedSE for m in fused.modules()) == se_blocks
    assert sum(type(m) is se_fused.SEBlock for m in eager.modules()) == se_blocks

    converted = copy.deepcopy(eager)
    assert se_fused.convert_se_modules(converted, backend=BACKEND) == se_blocks

    # float64, because training-mode BatchNorm over 2 samples of 1x1 maps amplifies rounding differences
    x = torch.randn(2, 3, 75, 75, dtype=torch.float64)  # the smallest input both networks take
    outputs = {}
    for label, model in (("eager", eager), ("fused", fused), ("converted", converted)):
        model.double().train()
        out = model(x)
        out.square().mean().backward()
        outputs[label] = (out.detach(), {n: p.grad for n, p in model.named_parameters()})
    out_eager, grads_eager = outputs["eager"]
    scale = out_eager.abs().max().item()
    for label in ("fused", "converted"):
        out, grads = outputs[label]
        torch.testing.assert_close(out, out_eager, rtol=0, atol=1e-9 * scale)
        for n, g in grads_eager.items():
            torch.testing.assert_close(grads[n], g, rtol=0, atol=1e-7 * g.abs().max().item(), msg=n)


def test_se_inception_v3_compiles_fullgraph():
    torch.manual_seed(0)
    model = se_inception_v3(num_classes=10, backend=BACKEND).eval()
    x = torch.randn(1, 3, 75, 75)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


# SE-ResNet-50 / SE-ResNeXt-50 stages: (blocks N_s, output channels C_s).
RESNET50_STAGES = ((3, 256), (4, 512), (6, 1024), (3, 2048))


@pytest.mark.parametrize("base,se_net", [("resnet50", "seresnet50"), ("resnext50_32x4d", "seresnext50_32x4d")])
@pytest.mark.parametrize("r", [2, 4, 8, 16, 32])
def test_se_parameters_follow_the_papers_formula(base, se_net, r):
    """SENet paper §4: SE adds (2/r) · Σ_s N_s · C_s² weights (plus here each fc's bias, C/r + C per block)."""
    from timm.layers import SEModule

    def count(model):
        return sum(p.numel() for p in model.parameters())

    se_layer = partial(SEModule, rd_ratio=1 / r)
    with torch.device("meta"):
        added = count(timm.create_model(se_net, block_args=dict(attn_layer=se_layer))) - count(timm.create_model(base))
    weights = sum(2 * n * c * c // r for n, c in RESNET50_STAGES)
    biases = sum(n * (c // r + c) for n, c in RESNET50_STAGES)
    assert added == weights + biases
    if r == 16:
        assert round(weights / 1e6, 1) == 2.5  # the paper's "~2.5 million additional parameters"
