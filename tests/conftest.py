"""Test configuration: Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test module
imports bayeskern.  Set BAYESKERN_TEST_DEVICE=cuda (benchmarks/device_check.sh does) to run the op
tests on a GPU with compiled Triton kernels instead.
"""
import os

import pytest
import torch

if os.environ.get("BAYESKERN_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the op tests run on."""
    return torch.device(os.environ.get("BAYESKERN_TEST_DEVICE", "cpu"))
