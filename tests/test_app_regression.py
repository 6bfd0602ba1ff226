"""Tabular regression in the fine-tuning application: the metrics against analytic values, the data."""

import math

import pytest
import torch

from bayeskern.app.data import DataOptions, load_dataset
from bayeskern.app.errors import UsageError
from bayeskern.app.regression import Z_95, regression_report


def test_report_of_a_standard_normal_predictive_on_hand_values():
    targets = torch.tensor([0.0, 1.0, 2.0])
    report = regression_report(torch.zeros(3), torch.ones(3), targets)
    assert report["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert report["nll"] == pytest.approx(0.5 * math.log(2 * math.pi) + (0 + 0.5 + 2) / 3)
    assert report["coverage90"] == pytest.approx(2 / 3)  # |2| lies outside +-1.645


def test_report_in_target_units_scales_rmse_and_shifts_nll():
    g = torch.Generator().manual_seed(0)
    mean, variance, targets = (
        torch.randn(20, generator=g),
        torch.rand(20, generator=g) + 0.1,
        torch.randn(20, generator=g),
    )
    unit, scaled = regression_report(mean, variance, targets), regression_report(mean, variance, targets, scale=7.0)
    assert scaled["rmse"] == pytest.approx(7 * unit["rmse"])
    assert scaled["nll"] == pytest.approx(unit["nll"] + math.log(7.0))  # density of 7 y: p(y) / 7
    assert scaled["coverage90"] == unit["coverage90"]


def test_a_calibrated_gaussian_covers_ninety_percent_and_has_the_entropy_as_nll():
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(200_000, generator=g), 0.5
    targets = mean + std * torch.randn(200_000, generator=g)
    report = regression_report(mean, torch.full_like(mean, std**2), targets)
    assert report["coverage90"] == pytest.approx(0.9, abs=0.003)
    assert report["nll"] == pytest.approx(0.5 * math.log(2 * math.pi * math.e * std**2), abs=0.005)
    assert report["rmse"] == pytest.approx(std, rel=0.005)
    assert pytest.approx(1.6448536269514722) == Z_95


def test_diabetes_splits_are_standardised_regression_splits():
    splits = load_dataset("diabetes", DataOptions(seed=0))
    assert splits.likelihood == "regression" and splits.num_classes == 1
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [265, 88, 89]
    x, y = splits.train.tensors
    assert x.shape == (265, 10) and y.shape == (265, 1)
    assert y.mean().abs() < 1e-5 and (y.std() - 1).abs() < 1e-5
    assert 70 < splits.target_scale < 85  # the disease score's std
    with pytest.raises(UsageError, match="--train-per-class needs classes"):
        load_dataset("diabetes", DataOptions(train_per_class=5))
