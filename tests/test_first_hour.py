"""What a new user meets first: the README's quickstart, `python -m se_fused`, and the messages for the
mistakes a newcomer makes (each message here, word for word where it matters)."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import se_fused

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                          env=env)


def _without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_readme_quickstart_runs_on_this_machine():
    """The quickstart's code block, exactly as the README shows it (it picks the device itself)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README lacks the <!-- quickstart --> python block"
    out = _python(block.group(1), env=_without_interpreter())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "runs on" in out.stdout, out.stdout


def test_python_m_se_fused_reports_what_was_built():
    out = subprocess.run([sys.executable, "-m", "se_fused"], capture_output=True, text=True, timeout=600,
                         env=_without_interpreter())
    assert out.returncode == 0, out.stdout + out.stderr
    for item in ("se_fused._C", "C++ CPU kernel", "CUDA kernels", "Triton", "GPU", "backend='auto' on cpu tensors",
                 "self-check against SEBlock"):
        assert item in out.stdout, (item, out.stdout)
    if se_fused.ops.extension_available():
        assert re.search(r"cpp on cpu\s+ok", out.stdout), out.stdout


def test_triton_interpret_set_after_import_is_explained():
    out = _python("""
        import os, torch, se_fused
        os.environ["TRITON_INTERPRET"] = "1"   # too late: the kernels were built for the GPU at import
        try:
            se_fused.FusedSE(8, rd_channels=2, backend="triton")(torch.randn(2, 8, 3, 3))
        except RuntimeError as err:
            print("RAISED:", err)
    """, env=_without_interpreter())
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1 is set now, but it was not when se_fused was imported" in out.stdout, out.stdout


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    out = _python("""
        import torch, se_fused
        try:
            se_fused.FusedSE(8, rd_channels=2, backend="triton")(torch.randn(2, 8, 3, 3))
        except RuntimeError as err:
            print("RAISED:", err)
    """, env=_without_interpreter())
    assert out.returncode == 0, out.stderr
    assert ("RAISED: backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "se_fused is imported, or move x to a CUDA device.") in out.stdout, out.stdout


def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors, got x on cpu"):
        se_fused.FusedSE(8, rd_channels=2, backend="cuda")(torch.randn(2, 8, 3, 3))


def test_cpp_backend_on_another_device():
    with pytest.raises(RuntimeError, match="backend='cpp' is the C\\+\\+ CPU kernel and needs CPU tensors, got x on meta"):
        se_fused.squeeze_excite(torch.randn(2, 8, 3, 3, device="meta"), torch.randn(2, 8, device="meta"), None,
                                torch.randn(8, 2, device="meta"), None, backend="cpp")


def test_module_on_the_wrong_channel_count_names_both():
    with pytest.raises(ValueError, match=r"FusedSE has 64 channels but x has 32"):
        se_fused.FusedSE(64)(torch.randn(1, 32, 4, 4))


def test_repr_says_what_auto_runs():
    expected = se_fused.functional.resolve_backend("auto", "cpu")
    assert f"backend='auto' (runs '{expected}' on cpu)" in repr(se_fused.FusedSE(16))


def test_help_documents_the_constructor_and_forward():
    doc = se_fused.FusedSE.__doc__ + se_fused.FusedSE.forward.__doc__
    for word in ("channels", "reduction", "rd_channels", "bias", "act", "gate", "backend", "channels_last",
                 "bfloat16"):
        assert word in doc, word


def test_without_triton_the_other_backends_work_and_triton_is_a_clear_error():
    """Platforms without Triton (macOS, Windows, aarch64 wheels): import, auto, cpp and torch still work."""
    out = _python("""
        import sys
        sys.modules["triton"] = None  # what an absent package looks like to `import triton`
        import torch, se_fused
        x = torch.randn(2, 8, 3, 3, requires_grad=True)
        for backend in ("auto", "torch") + (("cpp",) if se_fused.ops.extension_available() else ()):
            y = se_fused.FusedSE(8, rd_channels=2, backend=backend)(x)
            y.sum().backward()
            print("OK", backend)
        try:
            se_fused.FusedSE(8, rd_channels=2, backend="triton")(x)
        except RuntimeError as err:
            print("RAISED:", err)
    """, env=_without_interpreter())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK auto" in out.stdout and "OK torch" in out.stdout, out.stdout
    assert "RAISED: backend='triton' needs Triton, which did not import" in out.stdout, out.stdout
