"""One SGLD optimizer step over a whole parameter set, per implementation.

Parameter sets: ``resnet18`` (the 62 tensors of torchvision's resnet18, 11.7M parameters) and
``100M`` (100 tensors of 1M; skipped when ``BAYESKERN_BENCH_SKIP_BIG=1``).  In each group:

* ``eager`` (the baseline): ``torch.optim.SGD(foreach=True).step()`` then ``p.add_(randn_like(p), alpha=s)``
  per parameter -- what SGLD costs written in plain PyTorch;
* ``sgd``: the ``SGD(foreach=True)`` step alone (no noise);
* ``torch.randn``: ``torch.randn`` of as many elements as the set holds (the noise alone);
* ``BayesSGLD <backend>``: ``BayesSGLD.step()`` with the fused kernel of that backend (gradient
  finiteness check included), ``BayesSGLD foreach`` (torch._foreach ops + Philox noise tensors), and
  ``sgld_step_ <backend>``: the kernel op alone.

The reference backend is a slow specification and is not timed; Triton is timed only on CUDA.
``BAYESKERN_BENCH_QUICK=1`` replaces the sets by a 1M-parameter one to check the suite runs.
"""

import math
import os

import pytest
import torch
from bench_utils import QUICK, record, size_label, synchronize

import bayeskern.ops as ops
from bayeskern.ops.philox import tensor_offsets
from bayeskern.ops.sgld import sgld_step_
from bayeskern.posteriors.sgld import BayesSGLD

LR, NUM_DATA = 1e-6, 50_000
NOISE_SCALE = math.sqrt(2 * LR / NUM_DATA)


def _resnet18_shapes() -> list[torch.Size]:
    import torchvision

    return [p.shape for p in torchvision.models.resnet18().parameters()]


def _parameter_sets() -> dict[str, list[torch.Size]]:
    if QUICK:
        return {"1M": [torch.Size((1000, 1000))]}
    sets = {"resnet18": _resnet18_shapes()}
    if os.environ.get("BAYESKERN_BENCH_SKIP_BIG") != "1":
        sets["100M"] = [torch.Size((1000, 1000))] * 100
    return sets


SETS = _parameter_sets()
IMPLS = [
    "eager",
    "sgd",
    "torch.randn",
    "BayesSGLD foreach",
    "BayesSGLD cpp",
    "BayesSGLD triton",
    "sgld_step_ cpp",
    "sgld_step_ triton",
]


def _params(shapes, device):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _step_fn(impl: str, params: list[torch.Tensor], numel: int, device: torch.device):
    if impl == "torch.randn":
        return lambda: torch.randn(numel, device=device)
    if impl in ("eager", "sgd"):
        sgd = torch.optim.SGD(params, lr=LR, foreach=True)

        def eager():
            sgd.step()
            if impl == "eager":
                for p in params:
                    p.data.add_(torch.randn_like(p), alpha=NOISE_SCALE)

        return eager
    kind, backend = impl.split()
    if backend != "foreach" and (
        backend not in ops.available_backends(device) or (backend == "triton" and device.type == "cpu")
    ):
        pytest.skip(f"{backend} not timed on {device}")
    if kind == "sgld_step_":
        grads, offsets = [p.grad for p in params], tensor_offsets([p.shape for p in params])

        def op():
            with ops.use_backend(backend):
                sgld_step_(params, grads, lr=LR, num_data=NUM_DATA, seed=1, step=0, offsets=offsets)

        return op
    opt = BayesSGLD(
        params,
        lr=LR,
        num_data=NUM_DATA,
        prior_mean="zero",
        seed=1,
        **({"foreach": True} if backend == "foreach" else {"fused": True}),
    )

    if backend == "foreach":  # its noise comes from the automatically chosen backend
        return opt.step

    def step():
        with ops.use_backend(backend):
            opt.step()

    return step


@pytest.mark.parametrize("name", list(SETS))
@pytest.mark.parametrize("impl", IMPLS)
def test_sgld_step(benchmark, bench_device, name, impl):
    shapes = SETS[name]
    numel = sum(math.prod(s) for s in shapes)
    params = _params(shapes, bench_device)
    fn = _step_fn(impl, params, numel, bench_device)
    record(
        benchmark,
        f"SGLD step {name} ({size_label(numel)}) fp32 {bench_device.type}",
        impl,
        baseline=impl == "eager",
        numel=numel,
        bytes=12 * numel,
    )

    def call():
        fn()
        synchronize(bench_device)

    benchmark(call)
