"""Shared set-up of the benchmark suites.

Every benchmark records ``benchmark.extra_info``: ``group`` (what is compared), ``impl`` (which
implementation) and, on the implementation every other in the group is compared against,
``baseline=True``; ``bytes`` (memory traffic of one call) where bandwidth is reported;
``peak_bytes`` (memory.py) where peak memory is compared.
``python benchmarks/report.py results.json`` turns a ``--benchmark-json`` file into markdown tables;
``python benchmarks/report.py`` renders benchmarks/README.md from notes.md and results/*.json.

Run: ``pytest benchmarks/ --benchmark-only [--benchmark-json=results.json]`` (not part of the test
run).  Suites: test_bench_ops.py / test_bench_draw.py / test_bench_sgld.py (kernels against the eager
composition), test_bench_methods.py (each posterior against the deterministic network: training step, Fisher
epoch, predict, peak memory; models and sizes in cases.py), test_bench_peers.py (bayesian-torch,
IVON, laplace-torch in the same groups, where installed), test_bench_vi.py (predict compiled vs
eager), test_bench_laplace.py (Fisher against the per-example prior art), test_bench_kron_glm.py
(K-FAC fit and the GLM predictive against plain passes and laplace-torch), test_bench_lora.py (every
method over the LoRA adapters of a LLaMA-style transformers classifier against plain LoRA fine-tuning).

Sizes: ``BAYESKERN_BENCH_SIZES`` (comma-separated element counts, default 1M and 16M);
device: ``BAYESKERN_BENCH_DEVICE`` (default cpu); ``BAYESKERN_BENCH_QUICK=1``: every suite at tiny
sizes, to check it runs.  The process keeps freed CPU memory (``bayeskern.ops.retain_freed_memory``,
as ``bayeskern-finetune`` does) unless ``BAYESKERN_BENCH_RETAIN_MEMORY=0`` (glibc's defaults); the
JSON's machine info records which.
"""

import os
import sys

import pytest
import torch

# The checkout's root must not be on sys.path (as in tests/conftest.py): its Triton folder ``kernels/``
# (installed as ``bayeskern.kernels``) would shadow the PyPI package ``kernels`` that transformers
# imports (test_bench_lora.py).  ``python -m pytest`` puts the current directory first; bayeskern
# itself comes from the install.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

if os.environ.get("BAYESKERN_BENCH_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton cases are skipped on CPU (too slow to time)

from bayeskern.ops import retain_freed_memory  # noqa: E402  (after TRITON_INTERPRET)

RETAIN_MEMORY = os.environ.get("BAYESKERN_BENCH_RETAIN_MEMORY", "1") != "0" and retain_freed_memory()


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device(os.environ.get("BAYESKERN_BENCH_DEVICE", "cpu"))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the software and accelerator in the JSON, for the report's header."""
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["retain_freed_memory"] = RETAIN_MEMORY
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
