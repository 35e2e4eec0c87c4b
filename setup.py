"""Build script: the package, plus the se_fused._C extension when a compiler allows.

* torch with CUDA and nvcc found: CUDAExtension (C++ CPU kernel + CUDA kernels).
* otherwise: CppExtension (C++ CPU kernel only).
* no working compiler: the pure-Python package; the Triton and PyTorch backends still serve.

Environment:
  TORCH_CUDA_ARCH_LIST    architectures to build (default without a visible GPU: "8.0;9.0+PTX")
  MAX_JOBS                parallel compile jobs (ninja)
  SE_FUSED_NO_EXTENSION=1 skip the extension
  SE_FUSED_NO_CUDA=1      build the CPU kernel only
  SE_FUSED_REQUIRE_CUDA=1 fail the install unless the CUDA extension builds (CI uses it)
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

from setuptools import setup

REQUIRE_CUDA = os.environ.get("SE_FUSED_REQUIRE_CUDA") == "1"


def log(message: str) -> None:
    print(f"se_fused setup: {message}", file=sys.stderr)


def pip_cuda_include_dirs() -> list[str]:
    """CUDA headers that pip's nvidia-* wheels install (torch's headers include cublas, cusparse, ...)."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "*", "include"))
    return sorted(set(found))


def cuda_arch_list(torch) -> str:
    """The architectures torch's build will target: TORCH_CUDA_ARCH_LIST, else the visible GPUs'."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def extension_setup() -> dict:
    if os.environ.get("SE_FUSED_NO_EXTENSION") == "1":
        log("SE_FUSED_NO_EXTENSION=1: pure-Python install")
        return {}
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # before torch guesses from an nvcc on PATH
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        if REQUIRE_CUDA:
            raise
        log(f"torch is not importable at build time ({err}); pure-Python install")
        return {}

    # the schema and the CPU implementation, its kernel built per instruction set (csrc/cpu/se_cpu.h)
    sources = ["csrc/se_fused.cpp", "csrc/cpu/se_cpu.cpp"] + sorted(glob.glob("csrc/cpu/se_cpu_isa_*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]  # no -std: torch picks the standard its headers need
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("SE_FUSED_NO_CUDA") != "1"
    if REQUIRE_CUDA and not with_cuda:
        raise RuntimeError(f"SE_FUSED_REQUIRE_CUDA=1 but torch.version.cuda={torch.version.cuda}, "
                           f"CUDA_HOME={CUDA_HOME}")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        archs = cuda_arch_list(torch)
        log(f"building CUDA + CPU kernels for TORCH_CUDA_ARCH_LIST={archs}")
        ext = CUDAExtension(
            "se_fused._C",
            sources + ["csrc/cuda/se_cuda_ops.cpp", "csrc/cuda/se_cuda.cu"],
            include_dirs=pip_cuda_include_dirs(),
            # a C string literal (torch shell-quotes each flag, so the list's ';' is safe)
            extra_compile_args={"cxx": cxx_flags + [f'-DSE_FUSED_CUDA_ARCH_LIST="{archs}"'],
                                # --threads=0: one architecture's compile per core (sm_80 and sm_90 at once)
                                "nvcc": ["-O3", "--resource-usage", "--threads=0"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        log("building the CPU kernel only (no CUDA torch or no nvcc)")
        ext = CppExtension("se_fused._C", sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """A failed build leaves a working pure-Python install, unless SE_FUSED_REQUIRE_CUDA=1."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure degrades the same way
                if REQUIRE_CUDA:
                    raise
                log(f"the extension failed to build ({err}); installing without it "
                    "(backend='triton' and 'torch' still work)")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**extension_setup())
