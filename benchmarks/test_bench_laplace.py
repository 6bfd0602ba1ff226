"""Diagonal-Fisher benchmarks: ``DiagLaplace.fit`` against one plain forward+backward pass.

Implementations (every one in a group processes the same batches of random inputs):

* ``plain``    -- one ordinary forward + backward per batch (``loss.backward()``), the baseline;
* ``bayeskern`` -- ``DiagLaplace(model).fit(batches)``: per-example squared gradients of every
  parameter (including its one-off planning forward on the first batch);
* ``loop``     -- the prior art (BayesDLL): a batch-size-1 backward per example, squares summed;
* ``vmap``     -- ``torch.func.vmap(grad)`` per-example gradients, squared and summed.

Two groups per model: ``diag Fisher ...`` (plain vs bayeskern over several batches: the ratio to
one plain pass) and ``diag Fisher prior art ...`` (all four over fewer batches, so the slow
baselines stay short; bayeskern's planning forward weighs more there, which only penalises it).
Targets (docs/design.md sections 6-7; benchmarks/README.md, "Targets"): bayeskern <= 1.5x plain
for the MLPs, <= 3x for ResNet-18 and the ViT; >= 20x faster than the loop.  ``extra_info`` names
the model, batch size and batch count.

On CUDA (``BAYESKERN_BENCH_DEVICE=cuda``, as the device check runs it) the models are timm's
ResNet-50 and ViT-B/16 at 224 px, batch 64.  ``BAYESKERN_BENCH_QUICK=1`` shrinks every model and batch
for a smoke run.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from bench_utils import QUICK, record, synchronize
from torch import nn
from torch.func import functional_call, grad, vmap

from bayeskern.posteriors import DiagLaplace


def _mlp(*widths: int) -> nn.Module:
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _vit() -> nn.Module:
    depth, dim, heads = (1, 32, 2) if QUICK else (6, 192, 3)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=dim, depth=depth, num_heads=heads, num_classes=10
    )


# name -> (builder, input shape of one example, batch size, batches timed, batches for the prior art)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, int, int]] = {
    "mlp-64-512-512-10": (lambda: _mlp(64, 512, 512, 10), (64,), 128, 8, 8),
    "mlp-256-1024-1024-10": (lambda: _mlp(256, 1024, 1024, 10), (256,), 256, 4, 2),
    "resnet18-32px": (lambda: timm.create_model("resnet18", num_classes=10), (3, 32, 32), 64, 4, 1),
    "vit-small-32px": (_vit, (3, 32, 32), 64, 4, 1),
}
if os.environ.get("BAYESKERN_BENCH_DEVICE", "cpu") == "cuda":  # the device check's sizes
    MODELS = {
        "resnet50-224px": (lambda: timm.create_model("resnet50", num_classes=10), (3, 224, 224), 64, 2, 1),
        "vit-b16-224px": (lambda: timm.create_model("vit_base_patch16_224", num_classes=10), (3, 224, 224), 64, 2, 1),
    }
if QUICK:
    MODELS = {
        "mlp-64-512-512-10": (lambda: _mlp(64, 32, 32, 10), (64,), 8, 2, 1),
        "resnet18-32px": (lambda: timm.create_model("resnet18", num_classes=10), (3, 16, 16), 4, 2, 1),
        "vit-small-32px": (_vit, (3, 32, 32), 4, 2, 1),
    }


def _sum_ce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, reduction="sum")


def _setup(name: str, device: torch.device, prior_art: bool):
    build, shape, batch, count, prior_art_count = MODELS[name]
    count = prior_art_count if prior_art else count
    torch.manual_seed(0)
    model = build().to(device).eval()
    batches = [
        (torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)) for _ in range(count)
    ]
    return model, batches


def _plain(model, batches):
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        _sum_ce(model(x), y).backward()


def _bayeskern(model, batches):
    return DiagLaplace(model, prior_mean="zero", seed=0).fit(batches, progress=False).fisher


def _loop(model, batches):
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        for i in range(len(y)):
            model.zero_grad(set_to_none=True)
            _sum_ce(model(x[i : i + 1]), y[i : i + 1]).backward()
            for n, p in params.items():
                fisher[n] += p.grad.square()
    return fisher


VMAP_CHUNK = 32


def _vmap(model, batches):
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, x, y):
        return _sum_ce(functional_call(model, {**p, **buffers}, (x[None],)), y[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        for chunk in range(0, len(y), VMAP_CHUNK):  # bounds the stacked per-example gradients
            piece = slice(chunk, chunk + VMAP_CHUNK)
            for n, g in per_example(params, x[piece], y[piece]).items():
                fisher[n] += g.square().sum(0)
    return fisher


IMPLS = {"plain": _plain, "bayeskern": _bayeskern, "loop": _loop, "vmap": _vmap}
SLOW = {"loop", "vmap"}  # one timed round is enough to see a 20x gap


def _bench(benchmark, device, model_name, impl, prior_art):
    model, batches = _setup(model_name, device, prior_art)
    batch = len(batches[0][1])
    kind = "diag Fisher prior art" if prior_art else "diag Fisher"
    group = f"{kind} {model_name} b{batch} x{len(batches)} {device.type}"
    record(benchmark, group, impl, baseline=impl == "plain", model=model_name, batches=len(batches), batch_size=batch)
    fn = IMPLS[impl]

    def call():
        out = fn(model, batches)
        synchronize(device)
        return out

    slow = impl in SLOW  # the first calls of a shape are slow on CPU (oneDNN/MKL set-up): warm up twice
    benchmark.pedantic(call, rounds=1 if slow else 5, iterations=1, warmup_rounds=0 if slow else 2)


@pytest.mark.parametrize("impl", ["plain", "bayeskern"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_diag_fisher(benchmark, bench_device, model_name, impl):
    _bench(benchmark, bench_device, model_name, impl, prior_art=False)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_diag_fisher_prior_art(benchmark, bench_device, model_name, impl):
    _bench(benchmark, bench_device, model_name, impl, prior_art=True)
