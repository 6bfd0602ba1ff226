"""The fused training draws against drawing and regularising tensor by tensor (kernel level).

Over the parameter list of a timm resnet18 (resnet50 on CUDA), one forward and backward of the
draw and its prior term (upstream gradients g_k for the drawn tensors and c for the term):

* ``vi draw+KL``: ``eager`` (the PyTorch composition ``mu + softplus(rho) * randn_like(mu)`` and the
  Gaussian KL formula, the baseline), ``per_tensor`` (bayeskern's ``gaussian_sample`` and
  ``gaussian_kl`` for each tensor) and ``fused`` (``gaussian_sample_kl``);
* ``mc_dropout draw+L2``: ``eager`` (``mu * bernoulli_(1 - p) / (1 - p)`` and the squared distance),
  ``per_tensor`` (``weight_dropout`` and the prior's ``neg_log_prob``) and ``fused``
  (``weight_dropout_l2``).

The per-tensor and fused implementations run on the device's default backend.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from bench_utils import QUICK, record, synchronize

import bayeskern.ops as ops
from bayeskern.ops.philox import tensor_offsets

P = 0.1
PRIOR_STD = 1.0
TERM_GRAD = 1e-5  # the prior term's weight in the loss, 1 / N


def _parameters(device: torch.device) -> tuple[str, list[torch.Tensor]]:
    name = "resnet18" if QUICK or device.type == "cpu" else "resnet50"
    model = timm.create_model(name, pretrained=False, num_classes=10)
    return name, [p.detach().to(device) for p in model.parameters()]


def _gaussian_impls(mus, rhos, means, offsets):
    def eager():
        samples = [mu + F.softplus(rho) * torch.randn_like(mu) for mu, rho in zip(mus, rhos)]
        kl = sum(
            (
                torch.log(torch.tensor(PRIOR_STD))
                - torch.log(F.softplus(rho))
                + (F.softplus(rho) ** 2 + (mu - m0) ** 2) / (2 * PRIOR_STD**2)
                - 0.5
            ).sum()
            for mu, rho, m0 in zip(mus, rhos, means)
        )
        return samples, kl

    def per_tensor():
        samples = [ops.gaussian_sample(mu, rho, 1, offset) for mu, rho, offset in zip(mus, rhos, offsets)]
        return samples, sum(ops.gaussian_kl(mu, rho, m0, PRIOR_STD) for mu, rho, m0 in zip(mus, rhos, means))

    def fused():
        return ops.gaussian_sample_kl(mus, rhos, means, [PRIOR_STD] * len(mus), 1, offsets)

    return {"eager": eager, "per_tensor": per_tensor, "fused": fused}


def _dropout_impls(mus, means, offsets):
    def l2():
        return sum(((mu - m0) ** 2).sum() for mu, m0 in zip(mus, means)) * ((1 - P) / (2 * PRIOR_STD**2))

    def eager():
        return [mu * torch.empty_like(mu).bernoulli_(1 - P) / (1 - P) for mu in mus], l2()

    def per_tensor():
        return [ops.weight_dropout(mu, P, 1, offset) for mu, offset in zip(mus, offsets)], l2()

    def fused():
        return ops.weight_dropout_l2(mus, P, means, [PRIOR_STD] * len(mus), 1, offsets)

    return {"eager": eager, "per_tensor": per_tensor, "fused": fused}


@pytest.mark.parametrize("impl", ["eager", "per_tensor", "fused"])
@pytest.mark.parametrize("kind", ["vi draw+KL", "mc_dropout draw+L2"])
def test_draw_forward_backward(benchmark, bench_device, kind, impl):
    model_name, params = _parameters(bench_device)
    mus = [p.clone().requires_grad_() for p in params]
    means = [p.clone() for p in params]
    offsets = tensor_offsets([p.shape for p in params])
    upstream = [torch.randn_like(p) for p in params]
    if kind.startswith("vi"):
        rhos = [torch.full_like(p, -7.0).requires_grad_() for p in params]
        leaves, draw = [*mus, *rhos], _gaussian_impls(mus, rhos, means, offsets)[impl]
    else:
        leaves, draw = mus, _dropout_impls(mus, means, offsets)[impl]

    term_grad = torch.tensor(TERM_GRAD, device=bench_device)

    def call():
        samples, term = draw()
        grads = torch.autograd.grad((*samples, term), leaves, (*upstream, term_grad.to(term.dtype)))
        synchronize(bench_device)
        return grads

    record(
        benchmark,
        f"{kind} fwd+bwd {model_name} params {bench_device.type}",
        impl,
        baseline=impl == "eager",
        params=sum(p.numel() for p in params),
        tensors=len(params),
    )
    benchmark.pedantic(call, rounds=1 if QUICK else 10, iterations=1, warmup_rounds=1)
