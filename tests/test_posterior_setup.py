"""``PosteriorSetup``: the selection, prior, Philox offsets and seed every posterior over a model holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayeskern as bk
from bayeskern.ops import philox
from bayeskern.posteriors.setup import PosteriorSetup


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_setup_selects_places_and_seeds_like_its_parts():
    net = _net()
    setup = PosteriorSetup.build(net, include_norm=False, prior_std=0.5, seed=7)
    names = bk.select_parameters(net, include_norm=False)
    assert setup.names == names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    shapes = dict(net.named_parameters())
    assert setup.offsets == philox.named_offsets({n: shapes[n].shape for n in names})
    assert setup.seed == 7
    assert setup.prior is not None and setup.prior.names == names and setup.prior.std("0.weight") == 0.5
    torch.testing.assert_close(setup.prior.mean("2.weight"), net[2].weight, rtol=0, atol=0)


def test_setup_without_prior_and_bad_seed():
    setup = PosteriorSetup.build(_net(), params="last_layer", with_prior=False, seed=0)
    assert setup.prior is None and setup.names == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="without a prior"):
        setup.require_prior()
    with pytest.raises(ValueError, match="seed"):
        PosteriorSetup.build(_net(), seed=-1)


@pytest.mark.parametrize("kind", ["vi", "mc_dropout", "laplace", "bank"])
def test_every_posterior_holds_one_setup(kind):
    net = _net()
    posterior = {
        "vi": lambda: bk.VI(net, num_data=8, include_norm=False, seed=3),
        "mc_dropout": lambda: bk.MCDropout(net, num_data=8, include_norm=False, seed=3),
        "laplace": lambda: bk.DiagLaplace(net, include_norm=False, seed=3),
        "bank": lambda: bk.SampleBank(net, include_norm=False, seed=3),
    }[kind]()
    setup = posterior.setup
    assert isinstance(setup, PosteriorSetup)
    assert posterior.names is setup.names
    assert setup.seed == 3
    if kind != "bank":
        assert posterior.prior is setup.prior


@pytest.mark.parametrize("kind", ["laplace", "bank"])
def test_a_loaded_state_brings_its_seed(kind):
    make = {
        "laplace": lambda seed: bk.DiagLaplace(_net(), seed=seed),
        "bank": lambda seed: bk.SampleBank(_net(), seed=seed),
    }[kind]
    source, target = make(11), make(12)
    if kind == "laplace":
        source.fit([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))], progress=False)
    target.load_state_dict(source.state_dict())
    assert target.seed == target.setup.seed == 11
