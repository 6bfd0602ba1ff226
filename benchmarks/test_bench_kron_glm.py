"""K-FAC fitting and the linearised (GLM) predictive against their baselines and laplace-torch.

Groups (every implementation of a group processes the same inputs; ``extra_info`` names the model,
batch size and batch count):

* ``K-FAC fit <model>``: ``plain`` (one forward + backward per batch, the baseline), ``bayeskern``
  (``KronLaplace(model).fit(batches)``: the Kronecker factors, and the diagonal blocks of parameters
  without one), ``laplace-torch`` (its ``KronLaplace`` with the curvlinops backend).  Target
  (issue 28): bayeskern <= 1.5x plain.
* ``GLM probit <model>``: ``forward`` (one no-grad forward per batch, the baseline), ``bayeskern``
  (``predict(la, x, pred_type="glm")``, the probit), ``laplace-torch`` (``la(x, pred_type="glm",
  link_approx="probit")``), both over the same fitted K-FAC posterior.  Target: bayeskern <= (2C + 2)x
  the forward for C <= 10 outputs, and faster than laplace-torch.
* ``GLM MC vs nn <model>``: ``nn`` (``predict(la, x, pred_type="nn", num_samples=S)``, the baseline)
  and ``glm-mc`` (``pred_type="glm", link_approx="mc"`` at the same S) over a LoRA posterior.
  Target: glm-mc <= 1.5x nn.

On CUDA (``BAYESKERN_BENCH_DEVICE=cuda``) the same models at the batch sizes below; ``BAYESKERN_BENCH_QUICK=1``
shrinks everything for a smoke run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from bench_utils import QUICK, record, synchronize
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayeskern as bk

laplace = pytest.importorskip("laplace", reason="laplace-torch (the '[oracles]' extra) is a compared implementation")
curvature = pytest.importorskip("laplace.curvature")

OUTPUTS = 10
PROBIT_BATCH = 32  # examples per batch of the probit groups: laplace-torch's full Jacobians took 14 GB at 128


def _mlp() -> nn.Module:
    width = 32 if QUICK else 512
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, OUTPUTS))


def _cnn() -> nn.Module:
    channels = 8 if QUICK else 32
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, OUTPUTS),
    )


# name -> (builder, input shape of one example, batch size, batches)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, int]] = {
    "mlp-64-512-512-10": (_mlp, (64,), 128, 4),
    "cnn-32px": (_cnn, (3, 32, 32), 64, 4),
}
if QUICK:
    MODELS = {"mlp-64-512-512-10": (_mlp, (64,), 8, 2), "cnn-32px": (_cnn, (3, 8, 8), 4, 2)}


def _setup(name: str, device: torch.device):
    build, shape, batch, count = MODELS[name]
    torch.manual_seed(0)
    model = build().to(device).eval()
    batches = [
        (torch.randn(batch, *shape, device=device), torch.randint(0, OUTPUTS, (batch,), device=device))
        for _ in range(count)
    ]
    return model, batches


def _plain(model, batches):
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()


def _kron(model, batches):
    return bk.KronLaplace(model, prior_mean="zero", seed=0).fit(batches, progress=False)


def _laplace_torch(model, batches):
    """laplace-torch reads ``len(loader.dataset)``: the same batches, as a DataLoader."""
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=len(batches[0][1]))
    la = laplace.KronLaplace(model, "classification", backend=curvature.CurvlinopsEF)
    la.fit(loader)
    return la


FIT = {"plain": _plain, "bayeskern": _kron, "laplace-torch": _laplace_torch}


def _time(benchmark, device, fn, slow: bool = False):
    def call():
        out = fn()
        synchronize(device)
        return out

    benchmark.pedantic(call, rounds=1 if slow or QUICK else 3, iterations=1, warmup_rounds=0 if QUICK else 1)


@pytest.mark.parametrize("impl", list(FIT))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_kron_fit(benchmark, bench_device, model_name, impl):
    model, batches = _setup(model_name, bench_device)
    batch = len(batches[0][1])
    group = f"K-FAC fit {model_name} b{batch} x{len(batches)} {bench_device.type}"
    record(benchmark, group, impl, baseline=impl == "plain", model=model_name, batches=len(batches), batch_size=batch)
    _time(benchmark, bench_device, lambda: FIT[impl](model, batches))


@pytest.mark.parametrize("impl", ["forward", "bayeskern", "laplace-torch"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_glm_probit(benchmark, bench_device, model_name, impl):
    model, batches = _setup(model_name, bench_device)
    batch = len(batches[0][1])
    batch = min(batch, PROBIT_BATCH)
    group = f"GLM probit {model_name} b{batch} x{len(batches)} C{OUTPUTS} {bench_device.type}"
    record(benchmark, group, impl, baseline=impl == "forward", model=model_name, batches=len(batches), batch_size=batch)
    inputs = [x[:PROBIT_BATCH] for x, _ in batches]  # laplace-torch holds (batch, C, all weights) Jacobians
    if impl == "forward":

        @torch.no_grad()
        def run():
            return [model(x) for x in inputs]

    elif impl == "bayeskern":
        la = _kron(model, batches)

        def run():
            return bk.predict(la, inputs, pred_type="glm", link_approx="probit").probs

    else:
        oracle = _laplace_torch(model, batches)

        def run():
            return [oracle(x, pred_type="glm", link_approx="probit") for x in inputs]

    _time(benchmark, bench_device, run)


def _lora_model():
    """A BERT-style classifier from a config (random weights) with LoRA r=8 on query and value."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    size = (32, 2, 2) if QUICK else (256, 4, 4)
    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=size[0],
        num_hidden_layers=size[1],
        num_attention_heads=size[2],
        intermediate_size=4 * size[0],
        num_labels=3,
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).eval()
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    return peft.get_peft_model(base, lora).eval()


@pytest.mark.parametrize("impl", ["nn", "glm-mc"])
def test_glm_mc_against_nn_on_lora(benchmark, bench_device, impl):
    model = _lora_model().to(bench_device)
    batch, length, samples = (4, 8, 4) if QUICK else (32, 32, 16)
    torch.manual_seed(1)
    inputs = {
        "input_ids": torch.randint(0, 1000, (batch, length), device=bench_device),
        "attention_mask": torch.ones(batch, length, dtype=torch.long, device=bench_device),
    }
    labels = torch.randint(0, 3, (batch,), device=bench_device)
    la = bk.KronLaplace(model, params="lora", prior_mean="zero", seed=0).fit(
        [{**inputs, "labels": labels}], progress=False
    )
    group = f"GLM MC vs nn LoRA-BERT b{batch} L{length} S{samples} {bench_device.type}"
    record(benchmark, group, impl, baseline=impl == "nn", model="lora-bert", batch_size=batch, samples=samples)
    pred_type, link = ("nn", "probit") if impl == "nn" else ("glm", "mc")
    _time(
        benchmark,
        bench_device,
        lambda: bk.predict(la, inputs, pred_type=pred_type, link_approx=link, num_samples=samples, compile=False),
    )
