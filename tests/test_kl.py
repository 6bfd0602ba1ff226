import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import bayeskern.ops as ops
from bayeskern.ops.kl import gaussian_kl


def oracle(mu, rho, prior_mean, prior_std):
    """KL and its gradients from torch.distributions, in float64."""
    mu64 = mu.detach().double().requires_grad_()
    rho64 = rho.detach().double().requires_grad_()
    m0 = torch.zeros_like(mu64) if prior_mean is None else prior_mean.double()
    sp = torch.as_tensor(prior_std, dtype=torch.float64).expand_as(mu64)
    kl = kl_divergence(Normal(mu64, F.softplus(rho64)), Normal(m0, sp)).sum()
    kl.backward()
    return kl, mu64.grad, rho64.grad


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("numel", [5, 16, 40_003])  # tails, one SIMD step, several parallel chunks
@pytest.mark.parametrize("zero_mean", [True, False])
def test_gaussian_kl_and_gradients_match_torch_distributions(backend, numel, zero_mean):
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    gen = torch.Generator().manual_seed(numel)
    mu = torch.randn(numel, generator=gen, requires_grad=True)
    rho = (3 * torch.randn(numel, generator=gen) - 2).requires_grad_()  # stds from ~1e-6 to ~10
    prior_mean = None if zero_mean else torch.randn(numel, generator=gen)
    with ops.use_backend(backend):
        kl = gaussian_kl(mu, rho, prior_mean, 0.7)
        (1.5 * kl).backward()
    want, grad_mu, grad_rho = oracle(mu, rho, prior_mean, 0.7)
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mu.grad.double(), 1.5 * grad_mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rho.grad.double(), 1.5 * grad_rho, rtol=1e-4, atol=1e-5)


def test_tensor_prior_std_and_float64_use_the_reference():
    mu = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    sp = torch.rand(4, 1, dtype=torch.float64) + 0.5
    kl = gaussian_kl(mu, rho, None, sp)
    kl.backward()
    want, grad_mu, grad_rho = oracle(mu, rho, None, sp)
    torch.testing.assert_close(kl, want)
    torch.testing.assert_close(mu.grad, grad_mu)
    torch.testing.assert_close(rho.grad, grad_rho)


def test_kernel_passes_opcheck():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("cpp unavailable")
    from bayeskern.ops.kl import _gaussian_kl

    mu, rho = torch.randn(33, requires_grad=True), torch.randn(33, requires_grad=True)
    torch.library.opcheck(_gaussian_kl, (mu, rho, torch.randn(33), 0.5))


@pytest.mark.parametrize("prior_std", [0.0, -1.0, float("inf")])
def test_non_positive_prior_std_is_rejected(prior_std):
    with pytest.raises(ValueError, match="prior_std"):
        gaussian_kl(torch.zeros(3), torch.zeros(3), None, prior_std)
