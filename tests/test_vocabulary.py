"""One vocabulary (docs/vocabulary.md): the same name means the same thing, with the same default,
in every method; these tests check the meaning, not only that the names exist."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import bayeskern as bk
from bayeskern.posteriors.weight_posterior import WeightPosterior

N = 64


def mlp(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, outputs))


def data(outputs: int = 3, regression: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=g)
    y = torch.randn(N, outputs, generator=g) if regression else torch.randint(0, outputs, (N,), generator=g)
    return x, y


def posteriors(model: nn.Module, **common) -> dict[str, object]:
    """One posterior of each family over the same selection, ready to sample."""
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    la = bk.DiagLaplace(model, seed=0, **common).fit(loader, progress=False)
    selection = {k: v for k, v in common.items() if k != "new_params"}  # a bank has no prior
    bank = bk.SampleBank(model, seed=0, **selection)
    bank.update()
    return {
        "vi": bk.VI(model, num_data=N, seed=0, **common),
        "mc_dropout": bk.MCDropout(model, num_data=N, seed=0, **common),
        "laplace": la,
        "sample_bank": bank,
    }


CONSTRUCTORS = {
    "VI": (bk.VI, WeightPosterior),
    "MCDropout": (bk.MCDropout, WeightPosterior),
    "DiagLaplace": (bk.DiagLaplace,),
    "SampleBank": (bk.SampleBank,),
    "BayesSGLD": (bk.BayesSGLD,),
    "GaussianPrior": (bk.GaussianPrior,),
}


def _parameters(*functions) -> dict[str, inspect.Parameter]:
    out: dict[str, inspect.Parameter] = {}
    for fn in functions:
        for name, param in inspect.signature(fn).parameters.items():
            if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD:
                out.setdefault(name, param)
    return out


@pytest.mark.parametrize("label", CONSTRUCTORS)
def test_every_argument_after_the_model_is_keyword_only(label):
    params = list(_parameters(*CONSTRUCTORS[label]).values())
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD  # the model, or the optimizer's params
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), label
    predict = list(inspect.signature(bk.predict).parameters.values())
    assert [p.name for p in predict[:2]] == ["posterior", "inputs"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in predict[2:])


def test_a_shared_name_has_one_default_everywhere():
    shared: dict[str, dict[str, object]] = {}
    for label, functions in CONSTRUCTORS.items():
        for name, param in _parameters(*functions).items():
            shared.setdefault(name, {})[label] = param.default
    # BayesSGLD's params is the optimizer's (required) iterable of tensors, as in torch.optim
    for name in (
        "prior_mean",
        "prior_std",
        "new_params",
        "include_bias",
        "include_norm",
        "temperature",
        "likelihood",
        "noise_std",
        "seed",
        "train_samples",
        "params",
    ):
        defaults = {k: v for k, v in shared[name].items() if not (name == "params" and k == "BayesSGLD")}
        assert len(defaults) >= 2, name
        assert len({repr(d) for d in defaults.values()}) == 1, (name, defaults)
    assert shared["prior_mean"]["BayesSGLD"] == "pretrained"
    assert shared["seed"]["SampleBank"] is None


def test_old_names_are_gone():
    model = mlp()
    for cls, old in ((bk.VI, "kl_weight"), (bk.MCDropout, "kl_weight"), (bk.VI, "num_samples")):
        with pytest.raises(TypeError):
            cls(model, num_data=N, **{old: 1})
    with pytest.raises(TypeError):
        bk.DiagLaplace(model, sigma_noise=1.0)
    with pytest.raises(TypeError):
        bk.VI(model, "pretrained", num_data=N)  # keyword-only


def test_every_method_defaults_to_the_pretrained_weights_as_prior_mean():
    model = mlp()
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    methods = posteriors(model)
    for label in ("vi", "mc_dropout", "laplace"):
        prior = methods[label].prior
        for name in prior.names:
            assert torch.equal(prior.mean(name), pretrained[name]), (label, name)
    opt = bk.BayesSGLD(model.parameters(), lr=0.1, num_data=N)
    for p, name in zip(model.parameters(), pretrained):
        assert torch.equal(opt.state[p]["prior_mean"], pretrained[name])


def test_sgld_step_at_temperature_zero_pulls_towards_the_pretrained_weights():
    """Zero gradients, T = 0: a step at the pretrained weights stays there, and a step from moved
    weights is exactly the prior pull lr * (theta - theta0) / (N sp^2) back towards them."""
    model = mlp()
    pretrained = [p.detach().clone() for p in model.parameters()]
    opt = bk.BayesSGLD(model.parameters(), lr=0.5, num_data=N, prior_std=0.5, temperature=0.0, seed=0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, p0 in zip(model.parameters(), pretrained):
        assert torch.equal(p, p0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt.step()
    shrink = 1 - 0.5 / (N * 0.5**2)
    for p, p0 in zip(model.parameters(), pretrained):
        torch.testing.assert_close(p, p0 + shrink, rtol=1e-6, atol=1e-6)


def test_sgld_new_params_get_prior_mean_zero_through_named_parameters():
    model = mlp()
    opt = bk.BayesSGLD(model.named_parameters(), lr=0.1, num_data=N, new_params=["3.*"])
    for name, p in model.named_parameters():
        expected = torch.zeros_like(p) if name.startswith("3.") else p.detach()
        assert torch.equal(opt.state[p]["prior_mean"], expected), name
    with pytest.raises(ValueError, match="new_params needs named parameters"):
        bk.BayesSGLD(model.parameters(), lr=0.1, num_data=N, new_params=["3.*"])
    zero = bk.BayesSGLD(model.parameters(), lr=0.1, num_data=N, prior_mean="zero")
    assert all("prior_mean" not in zero.state[p] for p in model.parameters())


def test_new_params_mean_zero_in_every_posterior():
    model = mlp()
    for label, post in posteriors(model, new_params="3.*").items():
        if label == "sample_bank":
            continue  # a bank has no prior
        assert post.prior.is_zero_mean("3.weight") and not post.prior.is_zero_mean("0.weight"), label


@pytest.mark.parametrize("params", [None, "last_layer", ["0.*", "3.weight"]])
def test_sample_and_mean_have_the_same_keys_for_every_posterior(params):
    model = mlp()
    expected = bk.select_parameters(model, params)
    for label, post in posteriors(model, params=params).items():
        assert list(post.sample(0)) == expected, label
        assert list(post.mean()) == expected, label
        assert post.names == expected, label
        assert isinstance(post, bk.Posterior), label


def test_fixed_tensors_hold_the_point_estimates_and_buffers():
    model = mlp()
    methods = posteriors(model, params="last_layer")
    for label in ("laplace", "sample_bank"):
        assert methods[label].fixed_tensors() == {}
    vi = methods["vi"]
    fixed = vi.fixed_tensors()
    assert set(fixed) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    with torch.no_grad():
        vi.point._parameters["0/weight"].add_(1.0)  # a trained point estimate differs from the model
    x, _ = data()
    model.eval()
    expected = functional_call(model, {**vi.fixed_tensors(), **vi.sample(0)}, (x,)).softmax(-1)
    prediction = bk.predict(vi, x, num_samples=1, compile=False)
    torch.testing.assert_close(prediction.probs, expected)
    assert not torch.allclose(functional_call(model, vi.sample(0), (x,)).softmax(-1), expected)


def test_predict_reads_the_posteriors_observation_noise():
    model = mlp(outputs=2)
    x, y = data(outputs=2, regression=True)
    la = bk.DiagLaplace(model, likelihood="regression", noise_std=0.3, seed=0)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=16), progress=False)
    noisy = bk.predict(la, x, num_samples=4, compile=False)
    plain = bk.predict(la, x, num_samples=4, compile=False, noise_std=0.0)
    torch.testing.assert_close(noisy.variance, plain.variance + 0.3**2)
    vi = bk.VI(model, likelihood="regression", noise_std=0.2, num_data=N, seed=0)
    torch.testing.assert_close(
        bk.predict(vi, x, num_samples=3, compile=False).variance,
        bk.predict(vi, x, num_samples=3, compile=False, noise_std=0.0).variance + 0.2**2,
    )


def test_default_criterion_follows_the_likelihood():
    """VI's loss with the regression likelihood is the Gaussian NLL with the posterior's noise_std."""
    model = mlp(outputs=2)
    x, y = data(outputs=2, regression=True)
    post = bk.VI(model, likelihood="regression", noise_std=0.5, num_data=N, seed=3).eval()
    seed = post.rng_state.clone()
    loss = post.loss(x, y)
    post.rng_state.copy_(seed)
    sigma2 = 0.25

    def gaussian(f, t):
        return ((f - t).square().sum() / (2 * sigma2) + f.numel() * 0.5 * math.log(2 * math.pi * sigma2)) / len(f)

    torch.testing.assert_close(loss, post.loss(x, y, gaussian))
    post.rng_state.copy_(seed)
    assert not torch.allclose(loss, post.loss(x, y, F.mse_loss))


def test_integral_floats_count_as_whole_numbers():
    model = mlp()
    assert bk.VI(model, num_data=1e6, seed=0).num_data == 1_000_000
    assert bk.MCDropout(model, num_data=64.0, train_samples=2.0, seed=0).train_samples == 2
    opt = bk.BayesSGLD(model.parameters(), lr=0.1, num_data=1e6, seed=0)
    assert opt.param_groups[0]["num_data"] == 1_000_000
    with pytest.raises(ValueError, match=r"num_data must be a whole number >= 1, got 1.5"):
        bk.VI(model, num_data=1.5)
    with pytest.raises(ValueError, match=r"num_data must be >= 1, got 0"):
        bk.BayesSGLD(model.parameters(), lr=0.1, num_data=0.0)


def test_prior_mean_has_one_spec_everywhere():
    model = mlp()
    names = bk.select_parameters(model)
    given = [torch.full_like(p, 0.5) for p in model.parameters()]
    by_name = dict(zip(names, given))
    for spec in (given, by_name):
        prior = bk.GaussianPrior(model, prior_mean=spec)
        assert all(torch.equal(prior.mean(n), by_name[n]) for n in names)
        vi = bk.VI(model, prior_mean=spec, num_data=N, seed=0)
        assert all(torch.equal(vi.prior.mean(n), by_name[n]) for n in names)
    opt = bk.BayesSGLD(model.named_parameters(), lr=0.1, num_data=N, prior_mean=by_name)
    assert all(torch.equal(opt.state[p]["prior_mean"], by_name[n]) for n, p in model.named_parameters())
    for bad in ("pretained", None, 3.0):
        with pytest.raises(ValueError, match="prior_mean"):
            bk.GaussianPrior(model, prior_mean=bad)
        with pytest.raises(ValueError, match="prior_mean"):
            bk.BayesSGLD(model.parameters(), lr=0.1, num_data=N, prior_mean=bad)


def test_temperature_means_the_same_tempered_posterior():
    """T scales a Laplace posterior's variance and the SGLD noise alike (both target p(theta | D)^(1/T)),
    and VI's regulariser is KL - (T - 1) H[q]."""
    model = mlp()
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    la = bk.DiagLaplace(model, seed=0).fit(loader, progress=False)
    base = la.std()
    la.temperature = 0.25
    for name, std in la.std().items():
        torch.testing.assert_close(std, base[name] * 0.5)
    vi = bk.VI(model, init_std=0.05, temperature=0.3, num_data=N, seed=0)
    torch.testing.assert_close(vi.regulariser(), vi.kl() + 0.7 * vi.entropy())
    d = sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(
        vi.entropy(), torch.tensor(d * (math.log(0.05) + 0.5 * (1 + math.log(2 * math.pi)))), rtol=1e-5, atol=1e-3
    )
