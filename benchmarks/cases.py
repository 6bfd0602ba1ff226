"""Models, inputs and settings shared by the method and peer-library overhead suites.

Environment (every variable optional):

* ``BAYESKERN_BENCH_QUICK=1``: tiny models and batches, to check a suite runs (all suites).
* ``BAYESKERN_BENCH_MODELS``: comma-separated names from ``MODELS`` (default ``mlp,resnet18,vit_tiny``;
  the device check uses ``resnet50,vit_base``).
* ``BAYESKERN_BENCH_BATCH``: batch size of every model (default: 512 for the MLP, as the targets of
  issues 3 and 8 are stated, 32 for images).
* ``BAYESKERN_BENCH_AMP=bf16``: run steps and predictions under CUDA bf16 autocast.
* ``BAYESKERN_BENCH_COMPILE``: ``1``/``0``, ``bayeskern.predict`` compiled (and the deterministic
  baseline under ``torch.compile``); default 1 on CUDA, 0 on CPU (compiling every model on a CPU
  takes minutes).
* ``BAYESKERN_BENCH_SAMPLES``: Monte-Carlo sample counts of the predict groups (default ``1,8,32``).
* ``BAYESKERN_BENCH_FISHER_BATCHES``: batches in one Fisher epoch (default 4).
* ``BAYESKERN_BENCH_ROUNDS``: timed rounds of every case (default 5; 1 in quick mode), after one
  warm-up round and the two calls that measure peak memory.
* ``BAYESKERN_BENCH_INTERLEAVED_ROUNDS``: rounds of each training step timed alternately with the
  deterministic step (``interleaved_ratio``; default 20; 2 in quick mode; 0 skips it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from bench_utils import QUICK, record, synchronize
from memory import Step, peak_bytes
from torch import nn

NUM_CLASSES = 10
NUM_DATA = 50_000  # N of the posteriors' data terms (its value does not change the cost)


def _env_ints(name: str, default: str) -> list[int]:
    return [int(s) for s in os.environ.get(name, default).split(",") if s]


SAMPLES = _env_ints("BAYESKERN_BENCH_SAMPLES", "1,4" if QUICK else "1,8,32")
FISHER_BATCHES = _env_ints("BAYESKERN_BENCH_FISHER_BATCHES", "2" if QUICK else "4")[0]
ROUNDS = int(os.environ.get("BAYESKERN_BENCH_ROUNDS", "1" if QUICK else "5"))
INTERLEAVED_ROUNDS = int(os.environ.get("BAYESKERN_BENCH_INTERLEAVED_ROUNDS", "2" if QUICK else "20"))
AMP = os.environ.get("BAYESKERN_BENCH_AMP", "")
if AMP not in ("", "bf16"):
    raise ValueError(f"BAYESKERN_BENCH_AMP must be empty or 'bf16', got {AMP!r}")


def compile_enabled(device: torch.device) -> bool:
    return os.environ.get("BAYESKERN_BENCH_COMPILE", "1" if device.type == "cuda" else "0") == "1"


def _mlp() -> nn.Module:
    width = 64 if QUICK else 1024
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, NUM_CLASSES)
    )


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


@dataclass(frozen=True)
class ModelCase:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # of one example
    batch: int  # default batch size


_IMAGE_BATCH = 4 if QUICK else 32
_VIT_TINY = dict(img_size=32, patch_size=4, **({"depth": 2} if QUICK else {}))
MODELS: dict[str, ModelCase] = {
    "mlp": ModelCase(_mlp, (784,), 8 if QUICK else 512),
    "resnet18": ModelCase(_timm("resnet18"), (3, 16, 16) if QUICK else (3, 32, 32), _IMAGE_BATCH),
    "vit_tiny": ModelCase(_timm("vit_tiny_patch16_224", **_VIT_TINY), (3, 32, 32), _IMAGE_BATCH),
    "resnet50": ModelCase(_timm("resnet50"), (3, 224, 224), _IMAGE_BATCH),
    "vit_base": ModelCase(_timm("vit_base_patch16_224"), (3, 224, 224), _IMAGE_BATCH),
}
SELECTED = os.environ.get("BAYESKERN_BENCH_MODELS", "mlp,resnet18,vit_tiny").split(",")
for _name in SELECTED:
    if _name not in MODELS:
        raise ValueError(f"BAYESKERN_BENCH_MODELS: unknown model {_name!r} (known: {', '.join(MODELS)})")


def batch_size(name: str) -> int:
    return int(os.environ.get("BAYESKERN_BENCH_BATCH", MODELS[name].batch))


@functools.cache
def model(name: str, device_type: str) -> nn.Module:
    """One instance per model and device for the whole session: compiled predictions reuse it."""
    torch.manual_seed(0)
    return MODELS[name].build().to(device_type)


def batches(name: str, device: torch.device, count: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    b = batch_size(name)
    return [
        (
            torch.randn(b, *MODELS[name].input_shape, generator=gen).to(device),
            torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device),
        )
        for _ in range(count)
    ]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``BAYESKERN_BENCH_AMP=bf16``; otherwise nothing."""
    if AMP == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def group_name(kind: str, name: str, device: torch.device, **extra) -> str:
    """One name per compared quantity, shared by every suite that times an implementation of it."""
    tags = "".join(f" {k}={v}" for k, v in extra.items())
    amp = f" {AMP}" if AMP and device.type == "cuda" else ""
    return f"{kind} {name} b{batch_size(name)}{tags} {device.type}{amp}"


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, loss=None) -> None:
    """One step: forward and loss (cross-entropy unless ``loss(x, y)`` is given) under ``autocast``,
    backward, update."""
    with autocast(x.device):
        value = F.cross_entropy(model(x), y) if loss is None else loss(x, y)
    opt.zero_grad(set_to_none=True)
    value.backward()
    opt.step()


def measure(
    benchmark,
    device: torch.device,
    setup: Callable[[], Step],
    group: str,
    impl: str,
    name: str,
    timed_setup: Callable[[], Step] | None = None,
    baseline: str = "deterministic",
    **info,
) -> None:
    """Peak memory of the case built by ``setup`` (which also warms it up), then the time of its
    step (or of the one ``timed_setup`` builds, where memory is tracked on a different step); the
    group's ratios are against the implementation named ``baseline``."""
    net = model(name, device.type)
    net.zero_grad(set_to_none=True)  # gradients left by an earlier case would lower the peak
    peak, step = peak_bytes(device, setup)
    if timed_setup is not None:
        step = timed_setup()

    def call():
        step()
        synchronize(device)

    record(
        benchmark,
        group,
        impl,
        baseline=impl == baseline,
        model=name,
        batch_size=batch_size(name),
        params=sum(p.numel() for p in net.parameters()),
        peak_bytes=peak,
        amp=AMP or "none",
        **info,
    )
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def interleaved_ratio(baseline: Step, step: Step, device: torch.device, rounds: int) -> float:
    """Median time of ``step`` over the median of ``baseline``, the two timed alternately round by
    round after one warm-up call each.  pytest-benchmark times each case's rounds back to back, and a
    machine's speed can drift over seconds to minutes (a shared CPU VM's does), so a ratio of two such
    means carries that drift; alternating cancels most of it."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for run in (baseline, step):
        run()
    synchronize(device)
    for _ in range(rounds):
        for k, run in enumerate((baseline, step)):
            start = time.perf_counter()
            run()
            synchronize(device)
            times[k].append(time.perf_counter() - start)
    return statistics.median(times[1]) / statistics.median(times[0])
