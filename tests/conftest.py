"""Test configuration: Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test module
imports bayeskern.  Set BAYESKERN_TEST_DEVICE=cuda (benchmarks/device_check.sh does) to run the op
tests on a GPU with compiled Triton kernels instead.
"""

import os
import sys

import pytest
import torch

# The checkout's root must not be on sys.path: its Triton folder ``kernels/`` (installed as
# ``bayeskern.kernels``) would shadow the PyPI package ``kernels`` that transformers imports.
# ``python -m pytest`` puts the current directory first; bayeskern itself comes from the install.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

if os.environ.get("BAYESKERN_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the op tests run on."""
    return torch.device(os.environ.get("BAYESKERN_TEST_DEVICE", "cpu"))


def _available_or_skip(name: str, device: torch.device) -> str:
    """A backend that cannot run is skipped, unless BAYESKERN_REQUIRE_BACKENDS (comma-separated,
    set by .ci/run) names it: then its absence is a failure, so CI cannot go green on a silently
    missing extension or Triton.
    """
    from bayeskern.ops import available_backends

    if name not in available_backends(device):
        required = os.environ.get("BAYESKERN_REQUIRE_BACKENDS", "").split(",")
        if name in required:
            pytest.fail(f"backend {name!r} is required but unavailable on {device}")
        pytest.skip(f"backend {name!r} unavailable on {device}")
    return name


# Triton's CPU interpreter is slow: its cases belong to the full run, not the fast loop (-m "not slow").
_TRITON = pytest.param("triton", marks=pytest.mark.slow)


@pytest.fixture(params=["reference", _TRITON, "cpp"])
def backend(request, device) -> str:
    """Each op backend that can run on the test device."""
    return _available_or_skip(request.param, device)


@pytest.fixture(params=[_TRITON, "cpp"])
def kernel_backend(request, device) -> str:
    """Each compiled (non-reference) backend that can run on the test device."""
    return _available_or_skip(request.param, device)
