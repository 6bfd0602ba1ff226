"""gaussian_sample: every backend against the reference, gradients, memory, compile, bad input."""

import pytest
import torch
import torch.nn.functional as F

import bayeskern.ops as ops
from bayeskern.ops import philox
from bayeskern.ops.sample import reference_gaussian_sample

DTYPE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _inputs(shape, dtype, device, requires_grad=False, rho_scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    rho = (torch.randn(shape, generator=g) * rho_scale).to(device=device, dtype=dtype)
    return mu.requires_grad_(requires_grad), rho.requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, offset", [((0,), 0), ((1,), 3), ((7, 5), 1), ((3, 4, 33), 6), ((4099,), 2**31 + 1)])
def test_forward_matches_reference(backend, device, dtype, shape, offset):
    mu, rho = _inputs(shape, dtype, device)
    with ops.use_backend(backend):
        w = ops.gaussian_sample(mu, rho, 1234, offset)
    expected = reference_gaussian_sample(mu.float(), rho.float(), 1234, offset).to(dtype)
    assert w.dtype == dtype and w.shape == mu.shape and w.is_contiguous()
    rtol, atol = DTYPE_TOL[dtype]
    torch.testing.assert_close(w, expected, rtol=rtol, atol=atol)


def test_reference_is_mu_plus_softplus_rho_times_philox_normal():
    mu, rho = _inputs((10, 3), torch.float32, "cpu")
    eps = philox.normal(5, 8, 30).view(10, 3)
    torch.testing.assert_close(reference_gaussian_sample(mu, rho, 5, 8), mu + F.softplus(rho) * eps)


def test_non_contiguous_inputs_use_logical_order(backend, device):
    mu, rho = _inputs((6, 9), torch.float32, device)
    mu_t, rho_t = mu.t(), rho.t()  # transposed views
    with ops.use_backend(backend):
        w = ops.gaussian_sample(mu_t, rho_t, 3, 0)
    torch.testing.assert_close(w, reference_gaussian_sample(mu_t.contiguous(), rho_t.contiguous(), 3, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(backend, device, dtype):
    mu, rho = _inputs((5, 130), dtype, device, requires_grad=True)
    upstream = torch.randn(5, 130, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    with ops.use_backend(backend):
        grad_mu, grad_rho = torch.autograd.grad(ops.gaussian_sample(mu, rho, 99, 2, stream=4), (mu, rho), upstream)
    ref_mu, ref_rho = (t.detach().float().requires_grad_() for t in (mu, rho))
    ref = reference_gaussian_sample(ref_mu, ref_rho, 99, 2, stream=4)
    exp_mu, exp_rho = torch.autograd.grad(ref, (ref_mu, ref_rho), upstream.float())
    rtol, atol = DTYPE_TOL[dtype]
    torch.testing.assert_close(grad_mu, exp_mu.to(dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(grad_rho, exp_rho.to(dtype), rtol=rtol, atol=atol)


def test_gradcheck_float64():
    mu, rho = _inputs((3, 4), torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, r: reference_gaussian_sample(m, r, 7, 1), (mu, rho))
    assert torch.autograd.gradcheck(lambda m, r: ops.gaussian_sample(m, r, 7, 1), (mu, rho))


def test_backward_saves_no_noise_tensor(backend, device):
    mu, rho = _inputs((64, 64), torch.float32, device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with ops.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        w = ops.gaussian_sample(mu, rho, 0, 0)
    w.sum().backward()
    big = [t for t in saved if t.numel() >= mu.numel()]
    assert all(t.data_ptr() == rho.data_ptr() for t in big), "only rho itself may be saved"
    assert all(t.numel() == 1 for t in saved if t.numel() < mu.numel())


def test_softplus_is_safe_for_extreme_rho(backend, device):
    rho = torch.tensor([-1e4, -200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 1e4], device=device)
    mu = torch.zeros_like(rho, requires_grad=True)
    rho.requires_grad_()
    with ops.use_backend(backend):
        w = ops.gaussian_sample(mu, rho, 1, 0)
        w.sum().backward()
    assert torch.isfinite(w).all() and torch.isfinite(rho.grad).all()
    torch.testing.assert_close(w, reference_gaussian_sample(mu.detach(), rho.detach(), 1, 0), rtol=1e-5, atol=1e-6)


def test_samples_have_requested_moments(backend, device):
    n = 200_000
    mu = torch.full((n,), 2.0, device=device)
    rho = torch.full((n,), 0.5, device=device)
    with ops.use_backend(backend):
        w = ops.gaussian_sample(mu, rho, 42, 0).double()
    std = F.softplus(torch.tensor(0.5)).item()
    assert abs(w.mean().item() - 2.0) < 5 * std / n**0.5
    assert abs(w.std().item() / std - 1) < 5 * (2 / n) ** 0.5


def test_backends_agree_on_the_same_draw(device):
    mu, rho = _inputs((1000,), torch.float32, device)
    draws = {}
    for name in ops.available_backends(device):
        with ops.use_backend(name):
            draws[name] = ops.gaussian_sample(mu, rho, 77, 5)
    for name, w in draws.items():
        torch.testing.assert_close(w, draws["reference"], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=torch.zeros(3)), "rho has shape"),
        (dict(rho=torch.zeros(4, dtype=torch.float64)), "rho has dtype"),
        (dict(mu=torch.zeros(4, dtype=torch.int64), rho=torch.zeros(4, dtype=torch.int64)), "mu must be a floating"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(offset=-1), "offset"),
        (dict(stream=-2), "stream"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(mu=torch.zeros(4), rho=torch.zeros(4), seed=0, offset=0, stream=0) | kwargs
    with pytest.raises(ValueError, match=match):
        ops.gaussian_sample(args["mu"], args["rho"], args["seed"], args["offset"], stream=args["stream"])


def test_opcheck():
    mu, rho = _inputs((4, 8), torch.float32, "cpu", requires_grad=True)
    torch.library.opcheck(torch.ops.bayeskern.gaussian_sample.default, (mu, rho, philox.seed_tensor(3), 4, 0))
