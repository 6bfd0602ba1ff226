"""The CPU peak-memory tracker of the benchmark suite (benchmarks/memory.py) on known allocation patterns."""

import importlib.util
from pathlib import Path

import torch

_SPEC = importlib.util.spec_from_file_location(
    "bench_memory", Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
)
_memory = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_memory)
AllocationTracker, peak_bytes = _memory.AllocationTracker, _memory.peak_bytes


def test_tracker_counts_live_storages_and_their_peak():
    with AllocationTracker() as tracker:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(2000, dtype=torch.float64)  # 16000 B
        view = b.view(40, 50)  # shares b's storage: nothing new
        b.add_(1.0)  # in place: nothing new
        del a
        c = torch.empty(500)  # 2000 B, after a was freed
    assert tracker.peak == 4000 + 16000
    assert tracker.live == 16000 + 2000
    del b
    assert tracker.live == 16000 + 2000  # the view keeps the storage alive
    del view, c
    assert tracker.live == 0


def test_tracker_ignores_views_and_updates_of_outside_tensors():
    outside = torch.zeros(1000)
    with AllocationTracker() as tracker:
        outside.add_(1.0)  # in place on a tensor created before: nothing allocated
        view = outside[:10]
        fresh = outside * 2  # 4000 B
        fresh_view = fresh[:10]
        del fresh
    assert tracker.peak == tracker.live == 4000  # the view keeps fresh's storage alive
    del view, fresh_view
    assert tracker.live == 0


def test_tracker_sees_tensors_autograd_saves():
    x = torch.randn(256, requires_grad=True)  # created outside: not counted
    with AllocationTracker() as tracker:
        y = x.exp()  # output (1 KiB) saved for backward
        loss = y.sum()
        del y  # still held by the graph
        held = tracker.live
        loss.backward()
        del loss
    assert held == 256 * 4 + 4  # exp's output and the scalar sum
    assert tracker.live == 256 * 4  # the graph is freed; x.grad was created by the backward
    x.grad = None
    assert tracker.live == 0
    assert tracker.peak >= held


def test_peak_bytes_of_a_step_on_cpu():
    def setup():
        w = torch.zeros(1000)  # 4000 B, kept by the step

        def step():
            return (w + 1).sum()  # 4000 B transient, 4 B result

        return step

    peak, step = peak_bytes(torch.device("cpu"), setup)
    assert peak == 4000 + 4000 + 4
    assert step().item() == 1000
