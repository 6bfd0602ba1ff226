"""``KronLaplace`` and its Kronecker factors against laplace-torch 0.3's ``KronLaplace`` with the
curvlinops empirical-Fisher backend (the oracle of ``../shared/methods-next.md``), and the properties
every Laplace keeps (deterministic samples, checkpoints, bad input)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayeskern as bk
from bayeskern.curvature.kron import kronecker_factors, kronecker_layers

laplace = pytest.importorskip("laplace", reason="laplace-torch is the oracle (pip install '.[test]')")
curvature = pytest.importorskip("laplace.curvature")


class Pool(nn.Module):
    """A token axis: a Linear over (batch, tokens, features), mean over tokens, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(x)).mean(1))


def _case(kind: str) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(0)
    if kind == "mlp":
        net: nn.Module = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x = torch.randn(40, 5)
    elif kind == "conv":
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 3)
        )
        x = torch.randn(24, 2, 4, 4)
    else:
        net = Pool()
        x = torch.randn(30, 5, 4)
    y = torch.randint(0, 3, (x.shape[0],))
    return net, DataLoader(TensorDataset(x, y), batch_size=16)


def _oracle(net: nn.Module, loader: DataLoader, prior_precision: float = 1.0):
    la = laplace.KronLaplace(net, "classification", backend=curvature.CurvlinopsEF, prior_precision=prior_precision)
    la.fit(loader)
    return la


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors.values()])


@pytest.mark.parametrize("kind", ["mlp", "conv", "tokens"])
def test_factors_equal_laplace_torch(kind):
    net, loader = _case(kind)
    names = [n for n, _ in net.named_parameters()]
    nll = lambda out, y: nn.functional.cross_entropy(out, y, reduction="sum")  # noqa: E731
    found = kronecker_factors(net, loader, nll, names)
    oracle = _oracle(net, loader).H_facs.kfacs
    assert found.num_examples == len(loader.dataset)
    for name, expected in zip(names, oracle):
        torch.testing.assert_close(found.g[name], expected[0], rtol=1e-5, atol=1e-6)
        if name.endswith("weight"):
            torch.testing.assert_close(found.a(name), expected[1], rtol=1e-5, atol=1e-6)
        else:
            assert found.a(name).item() == 1.0


@pytest.mark.parametrize("kind", ["mlp", "conv", "tokens"])
@pytest.mark.parametrize("prior_precision", [0.3, 4.0])
def test_evidence_and_marginal_std_equal_laplace_torch(kind, prior_precision):
    net, loader = _case(kind)
    la = _oracle(net, loader, prior_precision)
    mine = bk.KronLaplace(net, prior_mean="zero", prior_precision=prior_precision, seed=0).fit(loader, progress=False)
    assert mine.log_marginal_likelihood() == pytest.approx(float(la.log_marginal_likelihood()), rel=1e-5)
    covariance = la.posterior_precision.bmm(torch.eye(la.n_params).unsqueeze(0), exponent=-1).squeeze(0)
    torch.testing.assert_close(_flat(mine.std()), covariance.diagonal().sqrt(), rtol=1e-4, atol=1e-6)


def test_samples_have_the_kronecker_covariance():
    net, loader = _case("mlp")
    la = _oracle(net, loader, 0.5)
    mine = bk.KronLaplace(net, prior_mean="zero", prior_precision=0.5, seed=1).fit(loader, progress=False)
    covariance = la.posterior_precision.bmm(torch.eye(la.n_params).unsqueeze(0), exponent=-1).squeeze(0).double()
    draws = torch.stack([_flat(mine.sample(i)) for i in range(6000)]).double() - _flat(mine.mean()).double()
    assert draws.mean(0).abs().max() < 5 * covariance.diagonal().sqrt().max() / math.sqrt(6000)
    error = (torch.cov(draws.T) - covariance).abs().max() / covariance.abs().max()
    assert error < 0.08  # Monte-Carlo error of a 6000-sample covariance
    torch.testing.assert_close(_flat(mine.sample(3)), _flat(mine.sample(3)), rtol=0, atol=0)


def test_temperature_scales_the_covariance_and_not_the_evidence():
    net, loader = _case("mlp")
    la = bk.KronLaplace(net, prior_precision=2.0, seed=0).fit(loader, progress=False)
    std, evidence = _flat(la.std()), la.log_marginal_likelihood()
    la.temperature = 0.25
    torch.testing.assert_close(_flat(la.std()), std * 0.5, rtol=1e-6, atol=0)
    assert la.log_marginal_likelihood() == evidence
    la.temperature = 0.0
    torch.testing.assert_close(_flat(la.sample(0)), _flat(la.mean()), rtol=0, atol=0)


def test_parameters_without_kronecker_form_get_the_diagonal_fisher():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    kron = bk.KronLaplace(net, seed=0).fit(loader, progress=False)
    diag = bk.DiagLaplace(net, seed=0).fit(loader, progress=False)
    assert kron.kron_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert sorted(kron.fisher) == ["1.bias", "1.weight"]
    for name in ("1.weight", "1.bias"):
        torch.testing.assert_close(kron.fisher[name], diag.fisher[name])
        torch.testing.assert_close(kron.std()[name], diag.std()[name])
    assert kron.log_likelihood == pytest.approx(diag.log_likelihood)
    assert set(kronecker_layers(net, ["1.weight", "2.weight"])) == {"2.weight"}


def test_prior_precision_maximises_the_evidence():
    net, loader = _case("mlp")
    la = bk.KronLaplace(net, prior_mean="zero", seed=0).fit(loader, progress=False)
    best = la.optimize_prior_precision()
    for factor in (0.8, 1.25):
        assert la.log_marginal_likelihood(best) > la.log_marginal_likelihood(best * factor)


def test_state_dict_round_trips_exactly(tmp_path):
    net, loader = _case("conv")
    la = bk.KronLaplace(net, prior_precision=0.7, temperature=0.5, seed=4).fit(loader, progress=False)
    path = tmp_path / "kron.pt"
    torch.save(la.state_dict(), path)
    restored = bk.KronLaplace(net, seed=9)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.seed == 4 and restored.prior_precision == 0.7 and restored.temperature == 0.5
    torch.testing.assert_close(_flat(restored.sample(2)), _flat(la.sample(2)), rtol=0, atol=0)
    assert restored.log_marginal_likelihood() == la.log_marginal_likelihood()


def test_the_sampled_predictive_runs_the_kronecker_samples():
    net, loader = _case("mlp")
    la = bk.KronLaplace(net, seed=0).fit(loader, progress=False)
    x = loader.dataset.tensors[0][:5]
    probs = bk.predict(la, x, pred_type="nn", num_samples=4).probs
    expected = torch.stack([torch.func.functional_call(net, la.sample(i), (x,)).softmax(-1) for i in range(4)]).mean(0)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_bad_input_names_the_argument():
    net, loader = _case("mlp")
    with pytest.raises(RuntimeError, match="call fit"):
        bk.KronLaplace(net, seed=0).sample(0)
    with pytest.raises(ValueError, match="prior_precision"):
        bk.KronLaplace(net, prior_precision=0.0, seed=0)
    with pytest.raises(ValueError, match="loader is empty"):
        bk.KronLaplace(net, seed=0).fit([], progress=False)
    with pytest.raises(ValueError, match="names"):
        kronecker_factors(net, loader, lambda o, y: o.sum(), ["1.weight"])


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_per_layer_evidence_equals_laplace_torch_at_its_layerwise_precision(structure):
    """laplace-torch tunes one precision per layer (weight and bias apart) by Adam on the evidence; at its
    precisions our evidence equals its own, and ours, each the exact per-layer maximiser, is not lower."""
    net, loader = _case("mlp")
    oracle_class = laplace.DiagLaplace if structure == "diag" else laplace.KronLaplace
    oracle = oracle_class(net, "classification", backend=curvature.CurvlinopsEF)
    oracle.fit(loader)
    oracle.optimize_prior_precision(method="marglik", prior_structure="layerwise", n_steps=300, verbose=False)
    theirs = oracle.prior_precision.detach()
    mine_class = bk.DiagLaplace if structure == "diag" else bk.KronLaplace
    mine = mine_class(net, prior_mean="zero", seed=0).fit(loader, progress=False)
    names = [n for n, _ in net.named_parameters()]
    at_theirs = dict(zip(names, theirs.tolist()))
    assert mine.log_marginal_likelihood(at_theirs) == pytest.approx(float(oracle.log_marginal_likelihood()), rel=1e-5)
    best = mine.optimize_prior_precision(per_layer=True)
    assert isinstance(best, dict) and list(best) == names and mine.prior_precision == best
    assert mine.log_marginal_likelihood() >= mine.log_marginal_likelihood(at_theirs) - 1e-9
    for name in names:  # each lambda_b is a maximum of the evidence along its own axis
        for factor in (0.9, 1.1):
            assert mine.log_marginal_likelihood({**best, name: best[name] * factor}) < mine.log_marginal_likelihood()
    scalar = mine.log_marginal_likelihood(mine._marglik_argmax(per_layer=False))
    assert mine.log_marginal_likelihood() >= scalar


def test_per_layer_precision_sets_each_parameters_posterior():
    net, loader = _case("mlp")
    diag = bk.DiagLaplace(net, seed=0).fit(loader, progress=False)
    kron = bk.KronLaplace(net, seed=0).fit(loader, progress=False)
    lams = {"0.weight": 0.5, "0.bias": 2.0, "2.weight": 7.0, "2.bias": 0.1}
    for la in (diag, kron):
        la.prior_precision = lams
    for name, lam in lams.items():
        torch.testing.assert_close(diag.std()[name], (diag.fisher[name] + lam).rsqrt())
        single = bk.KronLaplace(net, prior_precision=lam, seed=0).fit(loader, progress=False)
        torch.testing.assert_close(kron.std()[name], single.std()[name])
    restored = bk.KronLaplace(net, seed=1)
    restored.load_state_dict(kron.state_dict())
    assert restored.prior_precision == lams
    torch.testing.assert_close(_flat(restored.sample(0)), _flat(kron.sample(0)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="prior_precision: a dict needs one value per Bayesian parameter"):
        kron.prior_precision = {"0.weight": 1.0}
    with pytest.raises(ValueError, match=r"prior_precision\['0.bias'\]"):
        kron.prior_precision = {**lams, "0.bias": -1.0}
    with pytest.raises(ValueError, match="per_layer"):
        kron.optimize_prior_precision(method="val_nll", per_layer=True, val_loader=loader)


def test_factors_equal_an_explicit_per_example_computation_on_a_cnn():
    """G = sum_n sum_t g g^T and A = (1/N) sum_n (1/T) sum_t a a^T, computed here example by example
    from autograd's output gradients and F.unfold's patches."""
    net, loader = _case("conv")
    conv = net[2]  # Conv2d(3, 2, 2, stride=2): 4 output positions, patches of 3*2*2
    nll = lambda out, y: nn.functional.cross_entropy(out, y, reduction="sum")  # noqa: E731
    found = kronecker_factors(net, loader, nll, ["2.weight", "2.bias"])
    x, y = loader.dataset.tensors
    g_sum, a_sum = torch.zeros(2, 2), torch.zeros(12, 12)
    inputs: dict[str, torch.Tensor] = {}
    handle = conv.register_forward_hook(lambda m, args, out: inputs.update(a=args[0], out=out))
    for n in range(len(x)):
        logits = net(x[n : n + 1])
        (grad,) = torch.autograd.grad(nll(logits, y[n : n + 1]), inputs["out"])
        g = grad[0].flatten(1).T  # (positions, channels)
        a = nn.functional.unfold(inputs["a"], 2, stride=2)[0].T.detach()  # (positions, 12)
        g_sum += g.T @ g
        a_sum += a.T @ a / a.shape[0]
    handle.remove()
    torch.testing.assert_close(found.g["2.weight"], g_sum, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(found.a("2.weight"), a_sum / len(x), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(found.g["2.bias"], g_sum, rtol=1e-4, atol=1e-6)


def test_glm_variances_equal_explicit_jacobians_on_a_cnn():
    net, loader = _case("conv")
    la = bk.KronLaplace(net, prior_precision=0.5, seed=0).fit(loader, progress=False)
    x = loader.dataset.tensors[0][:5]
    mean = la.mean()
    jac = torch.func.jacrev(lambda w: torch.func.functional_call(net, w, (x,)))(mean)  # (N, C, *shape)
    rows = torch.cat([jac[n].reshape(5, 3, -1) for n in la.names], dim=-1).double()  # (N, C, P)
    variance = la.functional_variance({n: jac[n] for n in la.names})
    # against a dense Sigma formed independently: T (G kron A + lambda I)^-1 blockwise, inverted directly
    dense = _dense_covariance(la)
    expected = torch.einsum("ncp,pq,ncq->nc", rows, dense, rows)
    torch.testing.assert_close(variance, expected, rtol=1e-6, atol=1e-9)
    std = torch.cat([t.double().flatten() for t in la.std().values()])
    torch.testing.assert_close(std.square(), dense.diagonal(), rtol=1e-5, atol=1e-12)


def _dense_covariance(la) -> torch.Tensor:
    """T (F + lambda I)^-1 with F's Kronecker blocks formed explicitly (G kron A) and its diagonal ones."""
    blocks = []
    for name in la.names:
        if name in la.factors:
            g, a = (t.double() for t in la.factors[name])
            block = torch.kron(g, a)
        else:
            block = torch.diag(la.fisher[name].double().flatten())
        eye = torch.eye(block.shape[0], dtype=torch.float64)
        blocks.append(la.temperature * torch.linalg.inv(block + la.precision_of(name) * eye))
    return torch.block_diag(*blocks)


def test_mc_fisher_factors_are_unbiased_for_a_gaussian_likelihood():
    """fisher_type="mc": targets drawn from the model, y ~ N(f, sigma^2), so the output gradient
    g = (f - y) / sigma^2 has E[g g^T] = 1 / sigma^2: G of the last Linear estimates N / sigma^2 (here
    within 4 standard errors), while A, the inputs' second moment, is exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(3000, 3)
    y = torch.randn(3000, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=500)
    sigma = 0.5
    mc = bk.KronLaplace(net, likelihood="regression", noise_std=sigma, fisher_type="mc", seed=3)
    mc.fit(loader, progress=False)
    g, a = mc.factors["2.weight"]
    expected = len(x) / sigma**2
    assert abs(float(g) - expected) < 4 * expected * math.sqrt(2 / len(x))
    hidden = torch.tanh(net[0](x)).detach()
    torch.testing.assert_close(a, hidden.T @ hidden / len(x), rtol=1e-5, atol=1e-6)
    empirical = bk.KronLaplace(net, likelihood="regression", noise_std=sigma, seed=3).fit(loader, progress=False)
    assert not torch.equal(empirical.factors["2.weight"][0], g)  # the true targets give another G


def test_a_factor_the_symmetric_solver_cannot_decompose_takes_the_svd(monkeypatch):
    """When LAPACK's eigh fails to converge (ill-conditioned factors of real convolutions), the SVD of the
    positive semi-definite factor gives the same posterior."""
    net, loader = _case("conv")
    la = bk.KronLaplace(net, seed=0).fit(loader, progress=False)
    expected_std, expected_evidence = _flat(la.std()), la.log_marginal_likelihood()

    def failing(matrix):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    fresh = bk.KronLaplace(net, seed=0).fit(loader, progress=False)
    torch.testing.assert_close(_flat(fresh.std()), expected_std, rtol=1e-5, atol=1e-7)
    assert fresh.log_marginal_likelihood() == pytest.approx(expected_evidence, rel=1e-7)


def test_an_in_place_operation_after_a_layer_leaves_its_factors_alone():
    """``ReLU(inplace=True)`` after a layer rewrites the tensor the layer returned: the factors are
    those of the same network without in-place operations."""
    factors = []
    for inplace in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(5, 7), nn.ReLU(inplace=inplace), nn.Linear(7, 7), nn.ReLU(inplace), nn.Linear(7, 3)
        )
        _, loader = _case("mlp")
        factors.append(bk.KronLaplace(net, seed=0).fit(loader, progress=False).factors)
    for name, (g, a) in factors[0].items():
        torch.testing.assert_close(factors[1][name][0], g, msg=name)
        torch.testing.assert_close(factors[1][name][1], a, msg=name)
