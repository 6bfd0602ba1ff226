import copy
import math

import pytest
import torch
import torch.nn.functional as F
from posterior_checks import assert_unchanged, snapshot, train_wrapped_timm_model
from torch import nn
from torch.distributions import Normal, kl_divergence

import bayeskern.ops as ops
from bayeskern.ops import philox
from bayeskern.posteriors.vi import VI
from bayeskern.posteriors.weight_posterior import step_seed


def mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


@pytest.mark.slow  # a subprocess or a long chain
def test_mean_field_vi_recovers_bayesian_linear_regression_posterior():
    """Exact posterior N(m, Lambda^-1), Lambda = X^T X / sigma^2 + I / sp^2; the mean-field optimum
    has mean m and variances 1 / diag(Lambda)."""
    torch.manual_seed(0)
    n, d, sigma, sp = 40, 3, 0.5, 1.0
    X = torch.randn(n, d)
    y = X @ torch.randn(d) + sigma * torch.randn(n)
    precision = X.T @ X / sigma**2 + torch.eye(d) / sp**2
    exact_mean = torch.linalg.solve(precision, X.T @ y / sigma**2)
    mean_field_var = 1 / torch.diag(precision)

    post = VI(
        nn.Linear(d, 1, bias=False), prior_mean="zero", prior_std=sp, init_std=0.05, num_data=n, train_samples=8, seed=1
    )

    def gaussian_nll(out, target):  # mean over the batch, so loss * N is the negative ELBO
        return (out.squeeze(-1) - target).square().mean() / (2 * sigma**2)

    steps = 1500
    opt = torch.optim.Adam(post.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = post.loss(X, y, gaussian_nll)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    mean = post.mean()["weight"].squeeze(0)
    var = post.std()["weight"].squeeze(0) ** 2
    assert ((mean - exact_mean).abs() < 0.1 * mean_field_var.sqrt()).all(), (mean, exact_mean)
    assert ((var / mean_field_var - 1).abs() < 0.1).all(), (var, mean_field_var)


def adam_to_optimum(rho_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-field VI on Bayesian linear regression from init_std 1e-3, trained as README shows (plain
    Adam at lr 1e-3, 1000 steps): the posterior std and the mean-field optimum 1 / sqrt(diag(Lambda))."""
    torch.manual_seed(0)
    n, d, sigma = 200, 3, 0.5
    X = torch.randn(n, d)
    y = X @ torch.randn(d) + sigma * torch.randn(n)
    optimum = (1 / torch.diag(X.T @ X / sigma**2 + torch.eye(d))).sqrt()
    post = VI(
        nn.Linear(d, 1, bias=False),
        prior_mean="zero",
        init_std=1e-3,
        rho_scale=rho_scale,
        num_data=n,
        train_samples=4,
        likelihood="regression",
        noise_std=sigma,
        seed=0,
    )
    opt = torch.optim.Adam(post.parameters(), lr=1e-3)
    for _ in range(1000):
        loss = post.loss(X, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return post.std()["weight"].squeeze(0), optimum


def test_std_reaches_the_mean_field_optimum_under_plain_adam():
    """The optimum (about 0.035) is 3.5 e-folds above the initial std: at the default rho_scale the std
    gets there (within the jitter of a single-sample gradient at a constant lr); at rho_scale = 1
    Adam's steps, at most about lr in rho each, move it by one e-fold at most."""
    std, optimum = adam_to_optimum(30.0)
    assert ((std / optimum - 1).abs() < 0.25).all(), (std, optimum)
    std, optimum = adam_to_optimum(1.0)
    assert (std < 0.1 * optimum).all(), (std, optimum)


def test_rho_scale_travels_with_the_checkpoint():
    """A posterior built with another rho_scale adopts the checkpoint's, so its stds are the saved ones;
    a checkpoint from before rho_scale existed (no such key) was trained at rho_scale = 1."""
    post = VI(mlp(), init_std=0.05, rho_scale=10.0, num_data=10, seed=3)
    other = VI(mlp(), init_std=0.05, num_data=10, seed=3)
    other.load_state_dict(post.state_dict())
    assert float(other.rho_scale) == 10.0
    for name, std in post.std().items():
        torch.testing.assert_close(other.std()[name], std)
    old = {k: v for k, v in post.state_dict().items() if k != "rho_scale"}
    other.load_state_dict(old)
    assert float(other.rho_scale) == 1.0
    rho = post.rho.get_parameter("0/weight").detach()
    torch.testing.assert_close(other.std()["0.weight"], F.softplus(rho))


def hand_loss(post: VI, x, y, seed: int, temperature: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The VI loss written independently: w = mu + s * eps, s = softplus(rho_scale * rho), eps from the
    Philox spec; the regulariser is KL - (T - 1) H, H = sum log s + (D / 2)(1 + log 2 pi)."""
    leaves = [post.mu.get_parameter(n.replace(".", "/")).detach().clone().requires_grad_() for n in post.names]
    leaves += [post.rho.get_parameter(n.replace(".", "/")).detach().clone().requires_grad_() for n in post.names]
    kappa = float(post.rho_scale)
    mus, rhos = dict(zip(post.names, leaves[: len(post.names)])), dict(zip(post.names, leaves[len(post.names) :]))
    nll = 0.0
    for s in range(post.train_samples):
        w = {}
        for name in post.names:
            eps = philox.normal(seed, post.offsets[name], mus[name].numel(), s).view(mus[name].shape)
            w[name] = mus[name] + F.softplus(kappa * rhos[name]) * eps.to(mus[name].dtype)
        h = torch.tanh(F.linear(x, w["0.weight"], w["0.bias"]))
        nll = nll + F.cross_entropy(F.linear(h, w["2.weight"], w["2.bias"]), y)
    kl = sum(
        kl_divergence(Normal(mus[n], F.softplus(kappa * rhos[n])), Normal(post.prior.mean(n), post.prior.std(n))).sum()
        for n in post.names
    )
    numel = sum(rhos[n].numel() for n in post.names)
    log_stds = sum(torch.log(F.softplus(kappa * rhos[n])).sum() for n in post.names)
    entropy = log_stds + 0.5 * numel * (1 + math.log(2 * math.pi))
    regulariser = kl - (temperature - 1) * entropy
    return nll / post.train_samples + regulariser / post.num_data, leaves


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("prior_mean", ["pretrained", "zero"])
def test_reparameterised_gradient_matches_independent_autograd(backend, prior_mean, temperature):
    """On every backend (the C++ one fuses the first draw with the KL); T != 1 adds the entropy term."""
    post = VI(
        mlp(),
        prior_mean=prior_mean,
        prior_std=0.5,
        init_std=0.2,
        num_data=50,
        temperature=temperature,
        train_samples=3,
        seed=123,
    )
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with ops.use_backend(backend):
        loss = post.loss(x, y)
        loss.backward()
    expected, leaves = hand_loss(post, x, y, step_seed(123, 0), temperature)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    ours = [post.mu.get_parameter(n.replace(".", "/")).grad for n in post.names]
    ours += [post.rho.get_parameter(n.replace(".", "/")).grad for n in post.names]
    for got, want in zip(ours, (leaf.grad for leaf in leaves)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences_float64():
    post = VI(mlp(torch.float64), prior_mean="zero", prior_std=1.0, init_std=0.3, num_data=20, train_samples=2, seed=7)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))

    def loss_at_step0():
        post.rng_state[1] = 0  # the same weight noise every evaluation
        return post.loss(x, y)

    loss_at_step0().backward()
    h = 1e-6
    for param in (post.mu.get_parameter("0/weight"), post.rho.get_parameter("2/weight")):
        for idx in [(0, 0), (1, 2)]:
            with torch.no_grad():
                param[idx] += h
                up = loss_at_step0()
                param[idx] -= 2 * h
                down = loss_at_step0()
                param[idx] += h
            torch.testing.assert_close(param.grad[idx], (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


def train(post, x, y, steps=60, lr=0.05):
    opt = torch.optim.Adam(post.parameters(), lr=lr)
    for _ in range(steps):
        loss = post.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_tiny_prior_std_keeps_pretrained_weights_and_zero_mean_pulls_to_zero():
    torch.manual_seed(1)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    model = mlp()
    w0 = model[0].weight.detach().clone()
    anchored = VI(model, prior_mean="pretrained", prior_std=1e-3, init_std=1e-3, num_data=32, seed=0)
    train(anchored, x, y)
    assert (anchored.mean()["0.weight"] - w0).abs().max() < 1e-2
    shrunk = VI(model, prior_mean="zero", prior_std=0.05, init_std=1e-3, num_data=32, seed=0)
    train(shrunk, x, y)
    assert shrunk.mean()["0.weight"].norm() < 0.2 * w0.norm()


def test_initialisation_and_deterministic_samples():
    model = mlp()
    post = VI(model, init_std=0.01, num_data=10, params="0.*", seed=3)
    assert post.names == ["0.weight", "0.bias"]
    assert torch.equal(post.mean()["0.weight"], model[0].weight)
    torch.testing.assert_close(post.std()["0.bias"], torch.full((5,), 0.01))
    assert set(post.std()) == {"0.weight", "0.bias"}
    a, b = post.sample(4), post.sample(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], post.sample(5)["0.weight"])
    assert set(a) == {"0.weight", "0.bias"}  # the Bayesian tensors only
    fixed = post.fixed_tensors()
    assert set(fixed) == {"2.weight", "2.bias"}
    assert torch.equal(fixed["2.weight"], model[2].weight)  # point estimates are returned unchanged
    eps = (a["0.weight"] - model[0].weight) / 0.01
    torch.testing.assert_close(eps, philox.normal(3, 0, 15, 4).view(5, 3), rtol=1e-3, atol=1e-3)


def test_sample_is_the_reparameterised_draw_and_follows_updates_of_rho():
    post = VI(mlp(), init_std=0.05, num_data=10, seed=3)
    mu, rho = post.mu.get_parameter("0/weight"), post.rho.get_parameter("0/weight")

    def expected():
        seed = int(post.rng_state[0])
        scaled = post.rho_scale * rho.detach()  # s = softplus(rho_scale * rho)
        return ops.reference_gaussian_sample(mu.detach(), scaled, seed, post.offsets["0.weight"], stream=2)

    torch.testing.assert_close(post.sample(2)["0.weight"], expected())
    with torch.no_grad():
        rho.add_(1.0)  # as an optimizer step does: the cached std must follow
    torch.testing.assert_close(post.sample(2)["0.weight"], expected())


def test_batchnorm_running_stats_update_on_the_wrapper_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    before, ids = snapshot(model), {n: id(p) for n, p in model.named_parameters()}
    post = VI(model, num_data=10, seed=0).train()
    post.loss(torch.randn(8, 3) + 3, torch.randint(0, 2, (8,))).backward()
    stats = post.fixed_tensors()
    assert not torch.allclose(stats["1.running_mean"], before["1.running_mean"])
    assert int(stats["1.num_batches_tracked"]) == 1
    post.eval()
    assert not model.training
    post.loss(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    assert int(post.fixed_tensors()["1.num_batches_tracked"]) == 1
    assert_unchanged(model, before, ids)


def test_cpu_bf16_autocast_trains():
    post = VI(mlp(), init_std=0.1, num_data=10, seed=0)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    full = post.loss(x, y)
    post.rng_state[1] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = post.loss(x, y)
    mixed.backward()
    torch.testing.assert_close(mixed.float(), full, rtol=5e-2, atol=5e-2)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in post.parameters())


def test_state_dict_round_trip_resumes_training_identically():
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def make(seed):
        post = VI(mlp(), init_std=0.1, num_data=10, train_samples=2, seed=seed)
        opt = torch.optim.SGD(post.parameters(), lr=0.1, momentum=0.9)
        return post, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def steps(post, opt, sched, n):
        losses = []
        for _ in range(n):
            loss = post.loss(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        return losses

    post, opt, sched = make(seed=11)
    steps(post, opt, sched, 2)
    saved = copy.deepcopy((post.state_dict(), opt.state_dict(), sched.state_dict()))
    expected = steps(post, opt, sched, 2)
    resumed, opt2, sched2 = make(seed=99)
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert steps(resumed, opt2, sched2, 2) == expected


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"init_std": 0.0}, "init_std"),
        ({"init_std": -1.0}, "init_std"),
        ({"prior_std": 0.0}, "prior_std"),
        ({"num_data": 0}, "num_data"),
        ({"train_samples": 0}, "train_samples"),
        ({"temperature": -1.0}, "temperature"),
        ({"rho_scale": 0.0}, "rho_scale"),
        ({"rho_scale": float("nan")}, "rho_scale"),
        ({"likelihood": "poisson"}, "likelihood"),
    ],
)
def test_bad_arguments_are_rejected_by_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        VI(mlp(), **{"num_data": 10, **kwargs})


def test_timm_models_train_under_vi_without_modification():
    train_wrapped_timm_model(lambda model: VI(model, init_std=1e-3, num_data=100, new_params=["fc.*", "head.*"]))


def test_inputs_move_to_the_device_of_the_models_weights():
    """A posterior over a model on another device sends its inputs there (checked with 'meta',
    which computes shapes only, standing in for a GPU)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to("meta")
    post = VI(model, num_data=10, seed=0)
    out = post(torch.randn(5, 3))
    assert out.device.type == "meta" and out.shape == (5, 2)
    assert post.loss(torch.randn(5, 3), torch.zeros(5, dtype=torch.long)).device.type == "meta"
