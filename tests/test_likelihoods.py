"""bayeskern.likelihoods: the one Gaussian NLL every posterior, the predictive and the app share,
against torch.distributions."""

import math

import pytest
import torch

from bayeskern.likelihoods import gaussian_nll, negative_log_likelihood


def test_gaussian_nll_is_minus_the_normal_log_density() -> None:
    g = torch.Generator().manual_seed(0)
    mean, target = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g).double()
    variance = torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.1
    expected = -torch.distributions.Normal(mean, variance.sqrt()).log_prob(target)
    torch.testing.assert_close(gaussian_nll(mean, target, variance), expected)
    torch.testing.assert_close(
        gaussian_nll(mean, target, 0.25), -torch.distributions.Normal(mean, 0.5).log_prob(target)
    )


def test_regression_likelihood_sums_outputs_and_averages_examples() -> None:
    g = torch.Generator().manual_seed(1)
    output, target = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    per_example = -torch.distributions.Normal(output, 0.3).log_prob(target).sum(-1)
    mean = negative_log_likelihood(output, target, "regression", 0.3)
    total = negative_log_likelihood(output, target.flatten(), "regression", 0.3, reduction="sum")
    assert math.isclose(float(mean), float(per_example.mean()), rel_tol=1e-6)
    assert math.isclose(float(total), float(per_example.sum()), rel_tol=1e-6)


@pytest.mark.parametrize("variance", [0.0, -1.0, torch.tensor([1.0, 0.0])])
def test_gaussian_nll_rejects_a_variance_that_is_not_positive(variance) -> None:
    with pytest.raises(ValueError, match="variance must be positive"):
        gaussian_nll(torch.zeros(2), torch.ones(2), variance)
