"""Tabular regression: ``--dataset diabetes`` (scikit-learn's 442 patients, 10 features, a disease
progression score), fitted by every method with the Gaussian likelihood of ``bayeskern``
(``likelihood="regression"``, observation-noise std ``noise_std``).

Features and target are standardised with the training split's mean and std; the model is the
built-in ``mlp``.  The observation noise sigma is fitted on the validation split: the root mean
squared residual of the plain fit there (the maximum-likelihood sigma of held-out residuals), and
every method then uses it -- in its likelihood and in its predictive variance.

Reported on the test split, in the target's own units: RMSE, the mean Gaussian NLL of the
predictive ``N(mean, variance)`` and the coverage of its central 90% interval
``mean +- z_0.95 sqrt(variance)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..likelihoods import gaussian_nll

Z_95 = 1.6448536269514722  # the standard normal's 95% quantile: mean +- Z_95 sd holds 90%


def diabetes_splits(seed: int) -> tuple[tuple[TensorDataset, TensorDataset, TensorDataset], float]:
    """Seeded 60/20/20 train/val/test splits, standardised; and the target's std (to report in its units)."""
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x_all, y_all = load_diabetes(return_X_y=True)
    x = torch.tensor(x_all, dtype=torch.float32)
    y = torch.tensor(y_all, dtype=torch.float32)[:, None]
    index = torch.arange(len(y))
    train, rest = train_test_split(index, test_size=0.4, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed)
    x = (x - x[train].mean(0)) / x[train].std(0)
    y_std = float(y[train].std())
    y = (y - y[train].mean()) / y_std
    return tuple(TensorDataset(x[i], y[i]) for i in (train, val, test)), y_std  # type: ignore[return-value]


class MLP(nn.Module):
    """Two hidden ReLU layers and a linear output (``head``)."""

    def __init__(self, num_outputs: int, in_features: int = 10, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def regression_report(mean: Tensor, variance: Tensor, targets: Tensor, scale: float = 1.0) -> dict[str, float]:
    """RMSE, mean Gaussian NLL and central-90% coverage of ``N(mean, variance)`` for ``targets``,
    all in units ``scale`` times those given (NLL shifts by ``log scale``)."""
    mean, variance, targets = mean.double().flatten(), variance.double().flatten(), targets.double().flatten()
    residual = targets - mean
    nll = gaussian_nll(mean, targets, variance)
    return {
        "rmse": float(residual.square().mean().sqrt()) * scale,
        "nll": float(nll.mean()) + math.log(scale),
        "coverage90": float((residual.abs() <= Z_95 * variance.sqrt()).double().mean()),
    }
