"""The peer libraries' steps, in the groups of test_bench_methods.py (same models, batches, names).

* ``train step``: bayesian-torch's mean-field layers (``dnn_to_bnn`` on a copy of the network,
  loss + KL / N, SGD + momentum) and the IVON optimizer (one sampled-weights forward/backward, then
  ``step``);
* ``Fisher epoch``: laplace-torch's diagonal Laplace ``fit`` (``hessian_structure="diag"``, its
  default backend) over the same batches.

Each is skipped when its package (the ``bench`` extra: ``bayesian-torch``, ``ivon-opt``,
``laplace-torch``) is not installed.  Compare against the deterministic baseline of the same run:
``pytest benchmarks/test_bench_methods.py benchmarks/test_bench_peers.py --benchmark-only``.
"""

from __future__ import annotations

import copy

import cases
import pytest
import torch
import torch.nn.functional as F
from memory import Step


def _bayesian_torch(name: str, device: torch.device) -> Step:
    dnn_to_bnn = pytest.importorskip("bayesian_torch.models.dnn_to_bnn")
    net = copy.deepcopy(cases.model(name, device.type))
    dnn_to_bnn.dnn_to_bnn(
        net,
        {
            "prior_mu": 0.0,
            "prior_sigma": 1.0,
            "posterior_mu_init": 0.0,
            "posterior_rho_init": -6.9,
            "type": "Reparameterization",
            "moped_enable": True,
            "moped_delta": 0.1,
        },
    )  # MOPED: posterior means from the pretrained weights, as bayeskern's VI
    net.to(device).train()
    x, y = cases.batches(name, device)[0]
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def loss(x, y):
        return F.cross_entropy(net(x), y) + dnn_to_bnn.get_kl_loss(net) / cases.NUM_DATA

    return lambda: cases.train_step(net, opt, x, y, loss)


def _ivon(name: str, device: torch.device) -> Step:
    ivon = pytest.importorskip("ivon")
    net = cases.model(name, device.type).train()
    x, y = cases.batches(name, device)[0]
    opt = ivon.IVON(net.parameters(), lr=1e-3, ess=cases.NUM_DATA)

    def step():
        with opt.sampled_params(train=True):
            with cases.autocast(device):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()

    return step


TRAIN = {"bayesian-torch": _bayesian_torch, "ivon": _ivon}


@pytest.mark.parametrize("impl", list(TRAIN))
@pytest.mark.parametrize("name", cases.SELECTED)
def test_train_step(benchmark, bench_device, name, impl):
    cases.measure(
        benchmark,
        bench_device,
        lambda: TRAIN[impl](name, bench_device),
        cases.group_name("train step", name, bench_device),
        impl,
        name,
    )


@pytest.mark.parametrize("name", cases.SELECTED)
def test_fisher_epoch(benchmark, bench_device, name):
    laplace = pytest.importorskip("laplace")

    def setup() -> Step:
        net = cases.model(name, bench_device.type).eval()
        data = torch.utils.data.TensorDataset(
            *map(torch.cat, zip(*cases.batches(name, bench_device, cases.FISHER_BATCHES)))
        )
        loader = torch.utils.data.DataLoader(data, batch_size=cases.batch_size(name))
        return lambda: laplace.Laplace(net, "classification", subset_of_weights="all", hessian_structure="diag").fit(
            loader
        )

    group = cases.group_name("Fisher epoch", name, bench_device, batches=cases.FISHER_BATCHES)
    cases.measure(benchmark, bench_device, setup, group, "laplace-torch", name, batches=cases.FISHER_BATCHES)
