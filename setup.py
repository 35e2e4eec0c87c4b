"""Build script. The package is pure Python today (Triton kernels compile at first use)."""

from setuptools import setup

setup()
