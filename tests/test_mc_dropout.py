import pytest
import torch
import torch.nn.functional as F
from posterior_checks import train_wrapped_timm_model
from torch import nn

import bayeskern.ops as ops
from bayeskern.ops import philox
from bayeskern.posteriors.mc_dropout import MCDropout
from bayeskern.posteriors.weight_posterior import step_seed


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def keep_mask(seed, offset, shape, p, stream):
    return philox.uniform(seed, offset, shape.numel(), stream).view(shape) >= p


@pytest.mark.parametrize("mode", ["scale", "prior"])
def test_loss_and_gradients_match_an_independent_computation(backend, mode):
    """On every backend (the C++ one fuses the first draw with the regulariser)."""
    p, sp, n = 0.3, 0.5, 40
    model = mlp()
    post = MCDropout(
        model,
        p=p,
        prior_mean="pretrained",
        prior_std=sp,
        num_data=n,
        train_samples=2,
        mode=mode,
        new_params="2.*",
        seed=5,
    )
    with torch.no_grad():  # move mu away from the prior mean so the regulariser is not zero
        for q in post.mu.parameters():
            q.add_(0.1)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    with ops.use_backend(backend):
        loss = post.loss(x, y)
        loss.backward()

    mus = {name: post.mu.get_parameter(name.replace(".", "/")).detach().clone().requires_grad_() for name in post.names}
    theta0 = {name: (torch.zeros_like(t) if name.startswith("2.") else t) for name, t in model.state_dict().items()}
    seed = step_seed(5, 0)
    nll = 0.0
    for s in range(2):
        w = {}
        for name, mu in mus.items():
            keep = keep_mask(seed, post.offsets[name], mu.shape, p, s)
            w[name] = torch.where(keep, mu / (1 - p), 0.0) if mode == "scale" else torch.where(keep, mu, theta0[name])
        h = torch.tanh(F.linear(x, w["0.weight"], w["0.bias"]))
        nll = nll + F.cross_entropy(F.linear(h, w["2.weight"], w["2.bias"]), y) / 2
    reg = sum(((1 - p) / (2 * sp**2) * (mus[k] - theta0[k]).square()).sum() for k in mus)
    expected = nll + reg / n
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(post.regulariser(), reg.detach())
    for name, mu in mus.items():
        torch.testing.assert_close(post.mu.get_parameter(name.replace(".", "/")).grad, mu.grad)


@pytest.mark.parametrize("mode", ["scale", "prior"])
def test_mean_and_std_are_the_moments_of_the_samples(mode):
    torch.manual_seed(0)
    model = nn.Linear(10, 10, bias=False)
    post = MCDropout(
        model, p=0.2, prior_mean={"weight": torch.randn(10, 10)}, prior_std=1.0, num_data=1, mode=mode, seed=0
    )
    draws = torch.stack([post.sample(i)["weight"] for i in range(3000)])
    mean, std = post.mean()["weight"], post.std()["weight"]
    z = (draws.mean(0) - mean) / (std / 3000**0.5)
    assert z.abs().max() < 5
    torch.testing.assert_close(draws.std(0), std, rtol=0.1, atol=1e-6)
    if mode == "prior":  # a dropped weight takes the prior mean exactly
        dropped = draws != model.weight
        theta0 = post.prior.mean("weight").expand_as(draws)
        assert torch.equal(draws[dropped], theta0[dropped])


def test_tiny_prior_std_keeps_mu_at_pretrained_weights():
    model = mlp()
    post = MCDropout(model, p=0.1, prior_mean="pretrained", prior_std=1e-3, num_data=16, seed=0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    opt = torch.optim.Adam(post.parameters(), lr=0.05)
    for _ in range(100):
        loss = post.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (post.mean()["0.weight"] - model[0].weight).abs().max() < 1e-2


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"p": 1.0}, "p"),
        ({"p": -0.1}, "p"),
        ({"mode": "zero"}, "mode"),
        ({"num_data": 0}, "num_data"),
        ({"prior_std": -1.0}, "prior_std"),
        ({"train_samples": 0}, "train_samples"),
    ],
)
def test_bad_arguments_are_rejected_by_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        MCDropout(mlp(), **{"num_data": 10, **kwargs})


@pytest.mark.parametrize("mode", ["scale", "prior"])
def test_timm_models_train_under_mc_dropout_without_modification(mode):
    train_wrapped_timm_model(
        lambda model: MCDropout(model, p=0.1, num_data=100, mode=mode, new_params=["fc.*", "head.*"])
    )
