"""Packaging for bayeskern.

The package is pure Python: ``kernels/`` ships as ``bayeskern.kernels`` and the C++/CUDA
sources in ``csrc/`` ship as package data, JIT-compiled with ninja on first use
(``bayeskern.ops.extension``).  Nothing here imports torch, so pip never needs an isolated
build environment; install with ``pip install --no-build-isolation``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["bayeskern", "bayeskern.*"]), "bayeskern.kernels", "bayeskern.csrc"],
    package_dir={"bayeskern.kernels": "kernels", "bayeskern.csrc": "csrc"},
    package_data={
        "bayeskern": ["py.typed"],
        "bayeskern.csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh"],
    },
)
