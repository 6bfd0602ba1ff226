"""Overhead of each posterior against the deterministic network, per model (issue 8).

Groups (models and sizes from ``cases.py``; every entry records ``peak_bytes``, see ``memory.py``):

* ``train step <model>``: one optimizer step (forward, loss, backward, update) of the deterministic
  network with SGD + momentum (the baseline), VI (S = 1, SGD + momentum on mu and rho),
  MC-dropout (SGD + momentum) and SGLD (``BayesSGLD`` on the network's own parameters).  Each
  method's step is also timed alternately with the deterministic one (``interleaved_ratio``, see
  ``cases.interleaved_ratio``), which a drifting machine speed moves far less.  Laplace
  has no training step of its own (it fits the Fisher around a deterministic MAP): see below.
* ``Fisher epoch <model> x<batches>``: ``DiagLaplace.fit`` over the batches against one plain
  forward + backward per batch (the baseline); run in float32 (no autocast).
* ``predict <model> S=<S>``: ``bayeskern.predict`` with S samples of VI, MC-dropout, SGLD (a
  ``SampleBank`` holding S iterates) and Laplace (fitted on one batch) against S deterministic
  forwards under ``no_grad`` (the baseline; ``torch.compile``d when predict is compiled).
  Compilation happens before timing and before tracking memory.  On CPU, peak memory is tracked
  with predict uncompiled.

Kernel-level ratios against the eager composition are in test_bench_ops.py and test_bench_sgld.py;
the peer libraries' steps join these groups from test_bench_peers.py.
"""

from __future__ import annotations

import functools

import cases
import pytest
import torch
import torch.nn.functional as F
from memory import Step

from bayeskern.posteriors import VI, BayesSGLD, DiagLaplace, MCDropout, SampleBank
from bayeskern.predictive import predict


def train_setup(name: str, impl: str, device: torch.device) -> Step:
    net = cases.model(name, device.type).train()
    x, y = cases.batches(name, device)[0]
    trained, loss = net, None
    if impl == "vi":
        trained = VI(net, init_std=1e-3, num_data=cases.NUM_DATA, train_samples=1, seed=0).train()
    elif impl == "mc_dropout":
        trained = MCDropout(net, p=0.1, num_data=cases.NUM_DATA, seed=0).train()
    if trained is not net:
        loss = trained.loss
    if impl == "sgld":
        opt = BayesSGLD(net.parameters(), lr=1e-6, num_data=cases.NUM_DATA, prior_mean="zero", seed=0)
    else:
        opt = torch.optim.SGD(trained.parameters(), lr=1e-3, momentum=0.9)
    return lambda: cases.train_step(trained, opt, x, y, loss)


@pytest.mark.parametrize("impl", ["deterministic", "vi", "mc_dropout", "sgld"])
@pytest.mark.parametrize("name", cases.SELECTED)
def test_train_step(benchmark, bench_device, name, impl):
    cases.measure(
        benchmark,
        bench_device,
        lambda: train_setup(name, impl, bench_device),
        cases.group_name("train step", name, bench_device),
        impl,
        name,
    )
    if impl != "deterministic" and cases.INTERLEAVED_ROUNDS > 0:
        ratio = cases.interleaved_ratio(
            train_setup(name, "deterministic", bench_device),
            train_setup(name, impl, bench_device),
            bench_device,
            cases.INTERLEAVED_ROUNDS,
        )
        benchmark.extra_info["interleaved_ratio"] = ratio


def _plain_epoch(net, batches) -> None:
    for x, y in batches:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y, reduction="sum").backward()


@pytest.mark.parametrize("impl", ["deterministic", "laplace"])
@pytest.mark.parametrize("name", cases.SELECTED)
def test_fisher_epoch(benchmark, bench_device, name, impl):
    def setup() -> Step:
        net = cases.model(name, bench_device.type).eval()
        batches = cases.batches(name, bench_device, cases.FISHER_BATCHES)
        if impl == "deterministic":
            return lambda: _plain_epoch(net, batches)
        return lambda: DiagLaplace(net, prior_mean="zero", seed=0).fit(batches, progress=False)

    group = cases.group_name("Fisher epoch", name, bench_device, batches=cases.FISHER_BATCHES)
    cases.measure(benchmark, bench_device, setup, group, impl, name, batches=cases.FISHER_BATCHES)


@functools.cache
def _compiled_model(name: str, device_type: str):
    return torch.compile(cases.model(name, device_type))


def _posterior(impl: str, name: str, device: torch.device, num_samples: int):
    net = cases.model(name, device.type)
    if impl == "vi":
        return VI(net, init_std=1e-2, num_data=cases.NUM_DATA, seed=0)
    if impl == "mc_dropout":
        return MCDropout(net, p=0.1, num_data=cases.NUM_DATA, seed=0)
    if impl == "sgld":
        bank = SampleBank(net, burnin=0, thin=1, max_samples=num_samples, device=device)
        for _ in range(num_samples):
            bank.update()
        return bank
    return DiagLaplace(net, prior_mean="zero", seed=0).fit(cases.batches(name, device), progress=False)


def predict_setup(name: str, impl: str, device: torch.device, num_samples: int, compile: bool) -> Step:
    net = cases.model(name, device.type).eval()
    x = cases.batches(name, device)[0][0]
    if impl == "deterministic":
        forward = _compiled_model(name, device.type) if compile else net

        def forwards():
            with torch.no_grad(), cases.autocast(device):
                return [forward(x) for _ in range(num_samples)]

        return forwards
    post = _posterior(impl, name, device, num_samples)

    def run():
        with cases.autocast(device):
            return predict(post, x, num_samples=num_samples, compile=compile)

    return run


@pytest.mark.parametrize("impl", ["deterministic", "vi", "mc_dropout", "sgld", "laplace"])
@pytest.mark.parametrize("num_samples", cases.SAMPLES)
@pytest.mark.parametrize("name", cases.SELECTED)
def test_predict(benchmark, bench_device, name, num_samples, impl):
    compile = cases.compile_enabled(bench_device)
    tracked_compiled = compile and bench_device.type == "cuda"  # the CPU tracker runs eagerly
    if tracked_compiled:  # compile before tracking memory (the compiled graphs are cached per model)
        predict_setup(name, impl, bench_device, num_samples, True)()
    timed_setup = None
    if compile and not tracked_compiled:
        timed_setup = lambda: predict_setup(name, impl, bench_device, num_samples, True)  # noqa: E731
    group = cases.group_name("predict", name, bench_device, S=num_samples)
    cases.measure(
        benchmark,
        bench_device,
        lambda: predict_setup(name, impl, bench_device, num_samples, tracked_compiled),
        group,
        impl,
        name,
        timed_setup=timed_setup,
        samples=num_samples,
        compile=compile,
    )
