"""DiagLaplace against exact Bayesian linear regression, torch.func per-example gradients and the Philox spec."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from bayeskern.ops import philox
from bayeskern.posteriors import DiagLaplace
from bayeskern.predictive import predict
from bayeskern.protocol import Posterior

SIGMA = 0.5


# ---------------------------------------------------------------- Bayesian linear regression


def regression_data(n=8, scales=(1.0, 2.0, 3.0)):
    """X with orthogonal columns (X^T X = diag(scales^2)), so the exact posterior is diagonal."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, len(scales), dtype=torch.float64))
    x = q * torch.tensor(scales, dtype=torch.float64)
    y = x @ torch.tensor([0.7, -0.3, 0.2], dtype=torch.float64) + SIGMA * torch.randn(n, dtype=torch.float64)
    return x, y


def exact_posterior(x, y, lam):
    precision = x.T @ x / SIGMA**2 + lam * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(precision, x.T @ y / SIGMA**2), precision


def exact_log_evidence(x, y, lam):
    cov = SIGMA**2 * torch.eye(len(y), dtype=x.dtype) + x @ x.T / lam
    return float(torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y))


def linear_model(weight):
    model = nn.Linear(weight.numel(), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight.view(1, -1))
    return model


def batches(x, y, size):
    y = y.float() if y.dtype.is_floating_point else y
    return [(x[i : i + size].float(), y[i : i + size]) for i in range(0, len(y), size)]


def test_mc_fisher_of_linear_regression_recovers_xtx_over_noise_variance():
    x, y = regression_data()
    repeats = 2000  # the dataset repeated: F / repeats averages 2000 independent MC Fishers
    model = linear_model(exact_posterior(x, y, 1.0)[0])
    la = DiagLaplace(model, likelihood="regression", fisher_type="mc", noise_std=SIGMA, seed=3)
    la.fit(batches(x.repeat(repeats, 1), y.repeat(repeats), 4000), progress=False)
    estimate = la.fisher["weight"].double().flatten() / repeats
    expected = (x.square().sum(0)) / SIGMA**2  # diag(X^T X) / sigma^2
    # each term is z^2 x^2 / sigma^2 with z ~ N(0, 1): variance 2 x^4 / sigma^4
    std_error = (2 * x.pow(4).sum(0) / repeats).sqrt() / SIGMA**2
    assert ((estimate - expected).abs() < 5 * std_error).all(), (estimate, expected, std_error)


def test_laplace_posterior_of_linear_regression_is_the_exact_posterior():
    x, y = regression_data()
    repeats, lam = 1000, 2.0
    xs, ys = x.repeat(repeats, 1), y.repeat(repeats)
    mean, precision = exact_posterior(xs, ys, lam)
    la = DiagLaplace(
        linear_model(mean),
        likelihood="regression",
        prior_mean="zero",
        prior_precision=lam,
        fisher_type="mc",
        noise_std=SIGMA,
        seed=1,
    )
    la.fit(batches(xs, ys, 4000), progress=False)
    torch.testing.assert_close(la.mean()["weight"].double().flatten(), mean, rtol=1e-6, atol=1e-6)
    got = la.posterior_precision["weight"].double().flatten()
    std_error = (2 * xs.pow(4).sum(0)).sqrt() / SIGMA**2
    assert ((got - precision.diagonal()).abs() < 5 * std_error).all()
    draws = torch.stack([la.sample(s)["weight"].double().flatten() for s in range(2000)])
    exact_std = precision.diagonal().rsqrt()
    assert ((draws.mean(0) - mean).abs() < 5 * exact_std / math.sqrt(2000)).all()
    torch.testing.assert_close(draws.std(0), got.rsqrt(), rtol=0.1, atol=0)


def golden_section_max(f, low, high, iterations=200):
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(iterations):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (a, high) if f(a) < f(b) else (low, b)
    return 0.5 * (low + high)


def test_marglik_finds_the_prior_precision_maximising_the_exact_evidence():
    x, y = regression_data()
    best = math.exp(golden_section_max(lambda u: exact_log_evidence(x, y, math.exp(u)), -8.0, 8.0))
    mean, _ = exact_posterior(x, y, best)
    la = DiagLaplace(
        linear_model(mean),
        likelihood="regression",
        prior_mean="zero",
        prior_precision=1.0,
        noise_std=SIGMA,
        seed=0,
    )
    la.fit(batches(x, y, 3), progress=False)
    state = la.state_dict()
    state["fisher"] = {"weight": (x.square().sum(0) / SIGMA**2).float().view(1, -1)}  # the exact GGN = Hessian
    la.load_state_dict(state)
    assert la.optimize_prior_precision(method="marglik") == pytest.approx(best, rel=1e-4)
    assert la.log_marginal_likelihood() == pytest.approx(exact_log_evidence(x, y, best), rel=1e-5)


def test_marglik_warns_and_stops_at_the_bound_when_theta_star_is_the_prior_mean():
    x, y = regression_data()
    la = DiagLaplace(
        linear_model(exact_posterior(x, y, 1.0)[0]),
        likelihood="regression",
        prior_mean="pretrained",
        noise_std=SIGMA,
    )
    la.fit(batches(x, y, 4), progress=False)
    with pytest.warns(RuntimeWarning, match="still grows"):
        lam = la.optimize_prior_precision(method="marglik")
    assert lam == pytest.approx(1e12)
    assert la.log_marginal_likelihood(1e6) < la.log_marginal_likelihood(1e12)


# ---------------------------------------------------------------- classification


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def class_data(n=10):
    torch.manual_seed(1)
    return torch.randn(n, 4), torch.randint(0, 3, (n,))


def per_class_sq_grads(model, x):
    """g[n, c] = (d CE(f(x_n), c) / d theta)^2 for every example n and class c, plus p[n, c]."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    classes = torch.arange(3)

    def loss(p, xb, c):
        return F.cross_entropy(functional_call(model, p, (xb[None],)), c[None])

    per_class = vmap(vmap(grad(loss), in_dims=(None, None, 0)), in_dims=(None, 0, None))(params, x, classes)
    return {k: v.square() for k, v in per_class.items()}, model(x).softmax(-1).detach()


def test_empirical_fisher_and_tempered_posterior_precision_of_an_mlp():
    """Tempered posterior precision (F + lambda) / T and std sqrt(T / (F + lambda)); the evidence is the T = 1 one."""
    model = mlp()
    x, y = class_data()
    la = DiagLaplace(model, prior_mean="zero", prior_precision=0.5, temperature=2.0, seed=0)
    la.fit(batches(x, y, 4), progress=False)
    squares, _ = per_class_sq_grads(model, x)
    log_det, distance, count = 0.0, 0.0, 0
    for name, sq in squares.items():
        expected = sq[torch.arange(len(y)), y].sum(0)
        torch.testing.assert_close(la.fisher[name], expected, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(la.posterior_precision[name], (expected + 0.5) / 2.0, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(la.std()[name], (2.0 / (expected + 0.5)).sqrt(), rtol=1e-4, atol=1e-7)
        log_det += float((expected.double() + 0.5).log().sum())
        distance += float(dict(model.named_parameters())[name].detach().double().square().sum())
        count += expected.numel()
    log_lik = -float(F.cross_entropy(model(x), y, reduction="sum").detach())
    assert la.log_likelihood == pytest.approx(log_lik, rel=1e-5)
    evidence = log_lik - 0.5 * 0.5 * distance + 0.5 * count * math.log(0.5) - 0.5 * log_det
    assert la.log_marginal_likelihood() == pytest.approx(evidence, rel=1e-5)


def test_mc_fisher_of_an_mlp_is_an_unbiased_ggn_diagonal():
    model = mlp()
    x, y = class_data(6)
    repeats = 500
    la = DiagLaplace(model, fisher_type="mc", seed=5).fit(
        batches(x.repeat(repeats, 1), y.repeat(repeats), 1000), progress=False
    )
    squares, probs = per_class_sq_grads(model, x)
    for name, sq in squares.items():
        weights = probs.view(*probs.shape, *([1] * (sq.dim() - 2)))
        expected = (weights * sq).sum((0, 1))  # E_{y ~ p} of the squared gradient = GGN diagonal
        variance = ((weights * sq.square()).sum(1) - (weights * sq).sum(1).square()).sum(0)
        error = (la.fisher[name] / repeats - expected).abs()
        assert (error <= 5 * (variance / repeats).sqrt() + 1e-6).all(), name


def test_samples_follow_the_philox_spec_and_are_deterministic_in_index():
    model = mlp()
    x, y = class_data()
    la = DiagLaplace(model, prior_precision=3.0, seed=11).fit(batches(x, y, 5), progress=False)
    first, again, other = la.sample(4), la.sample(4), la.sample(5)
    for name, offset in la.offsets.items():
        theta = la.mean()[name]
        eps = philox.normal(11, offset, theta.numel(), 4).view(theta.shape)
        torch.testing.assert_close(first[name], theta + eps * la.std()[name], rtol=1e-5, atol=1e-6)
        assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])


def test_diag_laplace_obeys_the_posterior_protocol_and_predicts():
    model = mlp()
    x, y = class_data()
    la = DiagLaplace(model, seed=0).fit(batches(x, y, 5), progress=True)
    assert isinstance(la, Posterior)
    pred = predict(la, x, num_samples=3, compile=False)
    assert pred.probs.shape == (10, 3)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(10))


def test_state_dict_round_trip_restores_samples_and_evidence():
    model = mlp()
    x, y = class_data()
    la = DiagLaplace(model, prior_precision=2.0, prior_mean="pretrained", seed=7).fit(batches(x, y, 5), progress=False)
    restored = DiagLaplace(model, prior_mean="pretrained")
    restored.load_state_dict(la.state_dict())
    for name in la.names:
        assert torch.equal(restored.sample(2)[name], la.sample(2)[name])
    assert restored.log_marginal_likelihood() == la.log_marginal_likelihood()


def test_last_layer_laplace_covers_only_the_head():
    model = mlp()
    x, y = class_data()
    la = DiagLaplace(model, params="last_layer", seed=0).fit(batches(x, y, 5), progress=False)
    assert la.names == ["2.weight", "2.bias"] and set(la.fisher) == set(la.sample(0)) == {"2.weight", "2.bias"}


def test_val_nll_picks_the_grid_value_with_the_lowest_predictive_nll():
    model = mlp()
    x, y = class_data(20)
    la = DiagLaplace(model, seed=2).fit(batches(x[:10], y[:10], 5), progress=False)
    grid = [0.01, 1.0, 100.0]
    chosen = la.optimize_prior_precision(
        method="val_nll", val_loader=batches(x[10:], y[10:], 5), grid=grid, pred_type="nn", num_samples=8
    )

    def nll(lam):  # independent Monte-Carlo predictive NLL
        la.prior_precision = lam
        probs = sum(functional_call(model, la.sample(s), (x[10:],)).softmax(-1) for s in range(8)) / 8
        return float(-probs[torch.arange(10), y[10:]].log().mean())

    scores = [nll(lam) for lam in grid]
    assert chosen == grid[scores.index(min(scores))]


def test_val_nll_never_picks_a_precision_whose_predictive_overflows(monkeypatch):
    model = mlp()
    x, y = class_data(20)
    la = DiagLaplace(model, seed=2).fit(batches(x[:10], y[:10], 5), progress=False)
    scores = {0.01: float("nan"), 1.0: 0.7, 100.0: 0.9, 1e4: float("inf")}
    monkeypatch.setattr(la, "validation_nll", lambda *args, **kwargs: scores[la.prior_precision])
    assert la.optimize_prior_precision(method="val_nll", val_loader=[], grid=list(scores)) == 1.0
    monkeypatch.setattr(la, "validation_nll", lambda *args, **kwargs: float("nan"))
    with pytest.raises(ValueError, match="not finite for any prior precision"):
        la.optimize_prior_precision(method="val_nll", val_loader=[], grid=[0.1, 1.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"likelihood": "poisson"}, "^likelihood must be"),
        ({"fisher_type": "kfac"}, "^fisher_type must be"),
        ({"prior_precision": 0.0}, "^prior_precision must be"),
        ({"prior_precision": -1.0}, "^prior_precision must be"),
        ({"temperature": -1.0}, "^temperature must be"),
        ({"noise_std": -2.0}, "^noise_std must be"),
        ({"params": "nothing.*"}, "params"),
    ],
)
def test_diag_laplace_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiagLaplace(mlp(), **kwargs)


def test_diag_laplace_rejects_empty_loader_bad_method_and_use_before_fit():
    la = DiagLaplace(mlp(), seed=0)
    with pytest.raises(RuntimeError, match="fit"):
        la.sample(0)
    with pytest.raises(ValueError, match="empty"):
        la.fit([], progress=False)
    x, y = class_data()
    la.fit(batches(x, y, 5), progress=False)
    with pytest.raises(ValueError, match=r"^method must be"):
        la.optimize_prior_precision(method="cv")
    with pytest.raises(ValueError, match="val_loader"):
        la.optimize_prior_precision(method="val_nll")
