"""Shared set-up of the benchmark suites.

Every benchmark records ``benchmark.extra_info``: ``group`` (what is compared), ``impl`` (which
implementation) and, on the implementation every other in the group is compared against,
``baseline=True``; ``bytes`` (memory traffic of one call) where bandwidth is reported.
``python benchmarks/report.py results.json`` turns a ``--benchmark-json`` file into the README table.

Sizes: ``BAYESKERN_BENCH_SIZES`` (comma-separated element counts, default 1M and 16M);
device: ``BAYESKERN_BENCH_DEVICE`` (default cpu).
"""
import os

import pytest
import torch

if os.environ.get("BAYESKERN_BENCH_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton cases are skipped on CPU (too slow to time)



@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device(os.environ.get("BAYESKERN_BENCH_DEVICE", "cpu"))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the software and accelerator in the JSON, for the report's header."""
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
