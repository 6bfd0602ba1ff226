"""bayeskern: fast approximate Bayesian posteriors over the weights of any PyTorch nn.Module."""
from . import distributed, metrics, ops, plots
from .posteriors import (
    VI,
    BayesSGLD,
    DiagLaplace,
    GaussianPrior,
    MCDropout,
    Posterior,
    SampleBank,
    select_parameters,
)
from .predictive import Prediction, predict

__version__ = "0.1.0"

__all__ = [
    "BayesSGLD",
    "DiagLaplace",
    "GaussianPrior",
    "MCDropout",
    "Posterior",
    "Prediction",
    "SampleBank",
    "VI",
    "__version__",
    "distributed",
    "metrics",
    "ops",
    "plots",
    "predict",
    "select_parameters",
]
