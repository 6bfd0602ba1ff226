"""torch.compile sees the ops: fullgraph compilation, gradients, and no recompiles per seed."""

import torch
import torch._dynamo

import bayeskern.ops as ops


def _perturbed_linear(x, mu, rho, seed, p):
    w = ops.gaussian_sample(mu, rho, seed, 0)
    w = ops.weight_dropout(w, p, seed, 0, stream=1)
    return torch.tanh(x @ w).sum()


def test_fullgraph_compile_matches_eager_without_recompiles():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g)
    mu = torch.randn(16, 4, generator=g, requires_grad=True)
    rho = torch.full((16, 4), -2.0, requires_grad=True)
    compiled = torch.compile(_perturbed_linear, fullgraph=True)
    for seed in (3, 4):
        seed_t = torch.tensor(seed)
        with torch._dynamo.config.patch(error_on_recompile=seed == 4):
            loss = compiled(x, mu, rho, seed_t, 0.25)
            grads = torch.autograd.grad(loss, (mu, rho))
        expected = _perturbed_linear(x, mu, rho, seed_t, 0.25)
        expected_grads = torch.autograd.grad(expected, (mu, rho))
        torch.testing.assert_close(loss, expected)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want)
