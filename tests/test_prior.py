import math

import pytest
import timm
import torch
from torch import nn

from bayeskern.posteriors.prior import GaussianPrior
from bayeskern.posteriors.selection import select_parameters


class Net(nn.Module):
    """Names chosen to mislead a name heuristic: a Linear called ``norm``, a LayerNorm called ``proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Linear(3, 4)
        self.proj = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.scale = nn.Parameter(torch.ones(4))  # a plain parameter of the root module
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.proj(self.norm(x))) * self.scale)


def names(model, **kw):
    return select_parameters(model, **kw)


def test_default_selects_every_parameter_in_registration_order():
    model = Net()
    assert names(model) == [n for n, _ in model.named_parameters()]


def test_globs_and_names_select_matching_parameters():
    model = Net()
    assert names(model, params="head.*") == ["head.weight", "head.bias"]
    assert names(model, params=["scale", "norm.weight"]) == ["scale", "norm.weight"]  # root's own parameters come first


def test_unmatched_glob_is_an_error_naming_it():
    with pytest.raises(ValueError, match="nothere"):
        names(Net(), params=["head.*", "nothere.*"])


def test_predicate_receives_name_and_parameter():
    model = Net()
    picked = names(model, params=lambda n, p: p.dim() == 2)
    assert picked == ["norm.weight", "head.weight"]


def test_norm_and_bias_options_follow_module_types_not_names():
    model = Net()
    no_norm = names(model, include_norm=False)
    assert no_norm == ["scale", "norm.weight", "norm.bias", "head.weight", "head.bias"]
    no_bias = names(model, include_bias=False)
    # LayerNorm/BatchNorm biases are norm parameters, governed by include_norm only
    assert no_bias == ["scale", "norm.weight", "proj.weight", "proj.bias", "bn.weight", "bn.bias", "head.weight"]


def test_last_layer_is_last_module_owning_parameters():
    model = Net()
    assert names(model, params="last_layer") == ["head.weight", "head.bias"]
    assert names(model, params="last_layer", include_bias=False) == ["head.weight"]
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.LayerNorm(3))
    assert names(seq, params="last_layer", include_norm=False) == ["0.weight", "0.bias"]


def test_last_layer_of_timm_models_is_the_classifier():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert names(resnet, params="last_layer") == ["fc.weight", "fc.bias"]
    assert not any(n.startswith("bn") for n in names(resnet, include_norm=False))


def test_tied_parameter_is_selected_once():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    assert names(model) == ["0.weight"]


def test_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match="selects no parameter"):
        names(Net(), params=lambda n, p: False)
    with pytest.raises(ValueError, match="params"):
        names(Net(), params=3)


def test_pretrained_mean_is_a_frozen_snapshot_and_new_params_get_zero():
    model = Net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prior = GaussianPrior(model, prior_mean="pretrained", prior_std=0.5, new_params="head.*")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for name in prior.names:
        expected = torch.zeros_like(before[name]) if name.startswith("head.") else before[name]
        assert torch.equal(prior.mean(name), expected), name
    assert prior.is_zero_mean("head.weight") and not prior.is_zero_mean("norm.weight")
    assert prior.mean("head.weight").shape == (2, 4)


def test_zero_and_explicit_means():
    model = Net()
    zero = GaussianPrior(model, prior_mean="zero", prior_std=1.0)
    assert all(torch.equal(zero.mean(n), torch.zeros_like(p)) for n, p in model.named_parameters())
    given = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    given["bn.running_mean"] = torch.ones(4)  # buffers in a state dict are ignored
    prior = GaussianPrior(model, prior_mean=given, prior_std=1.0, params="norm.*")
    assert prior.names == ["norm.weight", "norm.bias"]
    assert torch.equal(prior.mean("norm.weight"), given["norm.weight"])


def test_mean_with_wrong_shape_or_missing_entry_names_the_parameter():
    model = Net()
    bad = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    bad["head.weight"] = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"head\.weight.*\(4, 2\)"):
        GaussianPrior(model, prior_mean=bad, prior_std=1.0)
    del bad["head.weight"]
    with pytest.raises(ValueError, match=r"head\.weight"):
        GaussianPrior(model, prior_mean=bad, prior_std=1.0)
    GaussianPrior(model, prior_mean=bad, prior_std=1.0, new_params=["head.weight"])  # a fresh head needs no entry
    with pytest.raises(ValueError, match=r"^prior_mean must be"):
        GaussianPrior(model, prior_mean="pretraind", prior_std=1.0)


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan"), {"*": -2.0}, {"*": torch.tensor([1.0, 0.0, 1.0, 1.0])}])
def test_non_positive_std_is_rejected(std):
    with pytest.raises(ValueError, match=r"^prior_std\b.* must be"):
        GaussianPrior(Net(), prior_mean="zero", prior_std=std, params="proj.*")


def test_per_parameter_std_mapping_first_match_wins():
    model = Net()
    per_row = torch.tensor([[1.0], [2.0]])
    prior = GaussianPrior(model, prior_mean="zero", prior_std={"head.weight": per_row, "head.*": 3.0}, params="head.*")
    assert torch.equal(prior.std("head.weight"), per_row)
    assert prior.std("head.bias") == 3.0
    with pytest.raises(ValueError, match=r"head\.bias"):
        GaussianPrior(model, prior_mean="zero", prior_std={"head.weight": 1.0}, params="head.*")
    with pytest.raises(ValueError, match="broadcastable"):
        GaussianPrior(model, prior_mean="zero", prior_std={"*": torch.ones(3)}, params="head.*")


def test_neg_log_prob_and_its_gradient_match_torch_distributions():
    torch.manual_seed(0)
    model = Net()
    prior = GaussianPrior(
        model,
        prior_mean="pretrained",
        prior_std={"head.weight": torch.tensor([[0.5], [2.0]]), "*": 0.7},
        new_params="head.*",
    )
    theta = {n: (p.detach() + torch.randn_like(p)).requires_grad_() for n, p in model.named_parameters()}
    twin = {n: t.detach().clone().requires_grad_() for n, t in theta.items()}
    log_p = 0.0
    const = 0.0
    for name, theta0, sp in prior.items():
        sp_full = torch.as_tensor(sp).expand_as(theta[name])
        log_p = log_p + torch.distributions.Normal(theta0, sp_full).log_prob(twin[name]).sum()
        const = const + (torch.log(sp_full) + 0.5 * math.log(2 * math.pi)).sum()
    value = prior.neg_log_prob(theta)
    torch.testing.assert_close(value, -log_p - const)
    (3 * value).backward()
    (-3 * log_p).backward()
    for name in prior.names:
        torch.testing.assert_close(theta[name].grad, twin[name].grad, msg=name)


def test_state_dict_round_trip_and_device_dtype_moves():
    model = Net()
    prior = GaussianPrior(model, prior_mean="pretrained", prior_std=1.0, new_params="head.*")
    other = GaussianPrior(Net(), prior_mean="pretrained", prior_std=1.0, new_params="head.*")
    other.load_state_dict(prior.state_dict())
    for name in prior.names:
        assert torch.equal(other.mean(name), prior.mean(name))
    prior.to(torch.float64)
    assert prior.mean("norm.weight").dtype == torch.float64
    assert prior.mean("head.weight").dtype == torch.float64
