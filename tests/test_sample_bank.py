"""SampleBank: burn-in/thinning/ring-buffer semantics, Welford moments, determinism, checkpoints."""

import numpy as np
import pytest
import torch
from torch.func import functional_call

from bayeskern.ops import philox
from bayeskern.posteriors.sample_bank import SampleBank
from bayeskern.predictive import predict
from bayeskern.protocol import Posterior


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def chain(model, bank, steps, seed=0):
    """Drive the bank with random iterates; returns the parameter values after each step (as numpy)."""
    gen = torch.Generator().manual_seed(seed)
    history, kept = [], []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        history.append({n: p.detach().clone().numpy() for n, p in model.named_parameters()})
        kept.append(bank.update())
    return history, kept


def test_burnin_thin_and_ring_buffer_keep_the_newest_thinned_iterates():
    model = net()
    bank = SampleBank(model, burnin=2, thin=3, max_samples=2)
    history, kept = chain(model, bank, 12)
    # steps t = 1..12 kept when t > 2 and (t - 2) % 3 == 0: t = 5, 8, 11; the ring holds 8 and 11
    assert [t + 1 for t, k in enumerate(kept) if k] == [5, 8, 11]
    assert len(bank) == 2
    for index, t in [(0, 8), (1, 11), (2, 8), (5, 11)]:
        sample = bank.sample(index)
        for name, value in sample.items():
            np.testing.assert_array_equal(value.numpy(), history[t - 1][name])
    mean = bank.mean()
    for name in mean:
        np.testing.assert_allclose(mean[name].numpy(), (history[7][name] + history[10][name]) / 2, rtol=1e-6)


@pytest.mark.parametrize("mode", ["samples", "moments"])
def test_mean_and_variance_match_numpy(mode):
    model = net()
    bank = SampleBank(model, burnin=5, thin=2, max_samples=100, mode=mode)
    history, kept = chain(model, bank, 60)
    kept_values = [h for h, k in zip(history, kept) if k]
    assert len(kept_values) == len(bank) == 27
    mean, var = bank.mean(), bank.variance()
    for name in mean:
        stack = np.stack([h[name] for h in kept_values]).astype(np.float64)
        np.testing.assert_allclose(mean[name].numpy(), stack.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var[name].numpy(), stack.var(0), rtol=1e-4, atol=1e-6)


def test_moments_samples_are_the_philox_draws_of_their_index():
    model = net()
    bank = SampleBank(model, burnin=0, thin=1, max_samples=1, mode="moments", seed=13)
    chain(model, bank, 10)
    mean, var = bank.mean(), bank.variance()
    offsets = {"0.weight": 0, "0.bias": 12, "2.weight": 16, "2.bias": 24}  # numels 12, 4, 8, 2 rounded up to 4
    for index in (0, 1, 7):
        sample = bank.sample(index)
        assert all(torch.equal(sample[n], bank.sample(index)[n]) for n in sample)
        for name, value in sample.items():
            eps = philox.normal(13, offsets[name], value.numel(), stream=index).view(value.shape)
            torch.testing.assert_close(value, mean[name] + var[name].sqrt() * eps, rtol=1e-5, atol=1e-6)
    assert not torch.equal(bank.sample(0)["0.weight"], bank.sample(1)["0.weight"])


@pytest.mark.parametrize("mode", ["samples", "moments"])
def test_state_dict_round_trip_is_exact(mode):
    model = net()
    bank = SampleBank(model, burnin=1, thin=2, max_samples=3, mode=mode, seed=5)
    chain(model, bank, 11)
    restored = SampleBank(model, burnin=0, thin=1, max_samples=1, mode=mode)
    restored.load_state_dict(bank.state_dict())
    assert (restored.burnin, restored.thin, restored.max_samples, restored.num_updates) == (1, 2, 3, 11)
    for index in range(4):
        a, b = bank.sample(index), restored.sample(index)
        assert all(torch.equal(a[n], b[n]) for n in a)
    # both continue identically (same step count, same ring position)
    chain(model, bank, 4, seed=1)
    chain(model, restored, 4, seed=1)
    assert all(torch.equal(bank.mean()[n], restored.mean()[n]) for n in bank.names)
    with pytest.raises(ValueError, match="mode"):
        SampleBank(
            model, burnin=0, thin=1, max_samples=1, mode="samples" if mode == "moments" else "moments"
        ).load_state_dict(bank.state_dict())


def test_storage_dtype_and_device_and_model_dtype_of_samples(device):
    model = net().to(device)
    bank = SampleBank(model, burnin=0, thin=1, max_samples=2, device="cpu", dtype=torch.float16)
    bank.update()
    stored = bank.state_dict()["samples"][0]
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in stored.values())
    sample = bank.sample(0)
    for name, p in model.named_parameters():
        assert sample[name].dtype == p.dtype and sample[name].device == p.device
        torch.testing.assert_close(sample[name], p.detach().half().float(), rtol=0, atol=0)


def test_params_selects_the_bayesian_parameters():
    model = net()
    bank = SampleBank(model, burnin=0, thin=1, max_samples=2, params="last_layer")
    bank.update()
    assert set(bank.sample(0)) == {"2.weight", "2.bias"}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(burnin=-1), "burnin"),
        (dict(thin=0), "thin"),
        (dict(max_samples=0), "max_samples"),
        (dict(mode="all"), "mode"),
        (dict(dtype=torch.int32), "dtype"),
        (dict(likelihood="ranking"), "likelihood"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        SampleBank(net(), **(dict(burnin=0, thin=1, max_samples=1) | kwargs))


def test_empty_bank_says_why():
    bank = SampleBank(net(), burnin=5, thin=1, max_samples=1)
    bank.update()
    with pytest.raises(RuntimeError, match="burnin=5"):
        bank.sample(0)


def test_is_a_posterior_that_predict_runs():
    model = net()
    bank = SampleBank(model, burnin=0, thin=1, max_samples=4)
    history, _ = chain(model, bank, 4)
    assert isinstance(bank, Posterior)
    x = torch.randn(5, 3)
    pred = predict(bank, x, num_samples=4, compile=False)
    expected = torch.stack(
        [functional_call(model, {n: torch.from_numpy(v) for n, v in h.items()}, (x,)).softmax(-1) for h in history]
    ).mean(0)
    torch.testing.assert_close(pred.probs, expected, rtol=1e-5, atol=1e-6)
