"""Helpers shared by the benchmark suites (see conftest.py for the conventions)."""

import os

import torch

QUICK = os.environ.get("BAYESKERN_BENCH_QUICK") == "1"  # every suite: tiny sizes, to check it runs
SIZES = [int(s) for s in os.environ.get("BAYESKERN_BENCH_SIZES", f"{2**20},{2**24}").split(",")]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def size_label(numel: int) -> str:
    return f"{numel / 2**20:g}M" if numel >= 2**20 else f"{numel}"


def record(benchmark, group: str, impl: str, baseline: bool = False, **info) -> None:
    """Name the benchmark's group and implementation for the report."""
    benchmark.group = group
    benchmark.extra_info.update(group=group, impl=impl, baseline=baseline, **info)
