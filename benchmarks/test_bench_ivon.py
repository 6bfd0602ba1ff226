"""IVON against AdamW, the optimizer it replaces (issue 29), per model (``cases.py``).

* ``IVON train step <model>``: one training step -- forward, loss, backward, update -- with
  ``torch.optim.AdamW`` (the baseline; torch's default implementation) and with ``bayeskern.IVON``
  (forward and backward inside ``sampled_params(train=True)``, then ``step()``; one sample), its fused
  kernels (the backend the policy picks: C++ on CPU, Triton on CUDA) and its foreach implementation;
  the peak memory of each and, alternately timed, ``interleaved_ratio`` against AdamW.
* ``IVON optimizer <model>``: the optimizer's own work with the gradients in place: ``AdamW.step()``
  against IVON's draw, mean restore, gradient collection and update (``sampled_params(train=True)``
  around nothing, then ``step()``).

Every IVON entry records ``state_ratio``: the bytes of its persistent state over AdamW's (prior mean
zero, as AdamW decays towards zero; a pretrained prior mean adds one copy of the parameters).
"""

from __future__ import annotations

import cases
import pytest
import torch
import torch.nn.functional as F
from memory import Step

import bayeskern as bk

IMPLS = ["AdamW", "IVON fused", "IVON foreach"]


def _optimizer(impl: str, net: torch.nn.Module) -> torch.optim.Optimizer:
    if impl == "AdamW":
        return torch.optim.AdamW(net.parameters(), lr=1e-3)
    flags = {"foreach": True} if impl == "IVON foreach" else {"fused": True}
    return bk.IVON(net.parameters(), lr=0.1, num_data=cases.NUM_DATA, prior_mean="zero", seed=0, **flags)


def train_setup(name: str, impl: str, device: torch.device) -> Step:
    net = cases.model(name, device.type).train()
    x, y = cases.batches(name, device)[0]
    opt = _optimizer(impl, net)
    if impl == "AdamW":
        return lambda: cases.train_step(net, opt, x, y)

    def ivon_step() -> None:
        with opt.sampled_params(train=True):
            with cases.autocast(x.device):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()

    return ivon_step


def optimizer_setup(name: str, impl: str, device: torch.device) -> tuple[torch.optim.Optimizer, Step]:
    """The optimizer on the model with gradients in place, and its step (IVON: draw, restore,
    collect, update)."""
    net = cases.model(name, device.type)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = _optimizer(impl, net)
    if impl == "AdamW":
        return opt, opt.step

    def ivon_update() -> None:
        with opt.sampled_params(train=True):
            pass
        opt.step()

    return opt, ivon_update


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def state_ratio(name: str, impl: str, device: torch.device) -> float:
    """The persistent state bytes of ``impl`` over AdamW's on the model, after one step of each."""
    sizes = []
    for which in ("AdamW", impl):
        opt, step = optimizer_setup(name, which, device)
        step()
        sizes.append(_state_bytes(opt))
    return sizes[1] / sizes[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", cases.SELECTED)
def test_ivon_train_step(benchmark, bench_device, name, impl):
    cases.measure(
        benchmark,
        bench_device,
        lambda: train_setup(name, impl, bench_device),
        cases.group_name("IVON train step", name, bench_device),
        impl,
        name,
        baseline="AdamW",
    )
    if impl != "AdamW":
        benchmark.extra_info["state_ratio"] = state_ratio(name, impl, bench_device)
    if impl != "AdamW" and cases.INTERLEAVED_ROUNDS > 0:
        benchmark.extra_info["interleaved_ratio"] = cases.interleaved_ratio(
            train_setup(name, "AdamW", bench_device),
            train_setup(name, impl, bench_device),
            bench_device,
            cases.INTERLEAVED_ROUNDS,
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", cases.SELECTED)
def test_ivon_optimizer(benchmark, bench_device, name, impl):
    def setup() -> Step:
        _, step = optimizer_setup(name, impl, bench_device)
        step()  # the state exists from here on
        return step

    cases.measure(
        benchmark,
        bench_device,
        setup,
        cases.group_name("IVON optimizer", name, bench_device),
        impl,
        name,
        baseline="AdamW",
    )
