"""bayeskern: fast approximate Bayesian posteriors over the weights of any PyTorch nn.Module.

``import bayeskern`` loads torch and the package only. ``bayeskern.plots`` (matplotlib) is loaded
on first access; it and the scipy/scikit-learn parts of ``bayeskern.metrics`` come with
``pip install 'bayeskern[app]'``.
"""

import importlib as _importlib
from types import ModuleType as _ModuleType

from . import distributed, metrics, ops
from .posteriors import (
    IVON,
    VI,
    BayesSGLD,
    DiagLaplace,
    DiagonalGaussian,
    GaussianPrior,
    KronLaplace,
    Laplace,
    MCDropout,
    Posterior,
    SampleBank,
    select_parameters,
)
from .predictive import Prediction, predict

__version__ = "0.1.0"

__all__ = [
    "IVON",
    "VI",
    "BayesSGLD",
    "DiagLaplace",
    "DiagonalGaussian",
    "GaussianPrior",
    "KronLaplace",
    "Laplace",
    "MCDropout",
    "Posterior",
    "Prediction",
    "SampleBank",
    "__version__",
    "distributed",
    "metrics",
    "ops",
    "plots",
    "predict",
    "select_parameters",
]


_LAZY_SUBMODULES = ("plots",)
"""Submodules imported on first attribute access (PEP 562): they pull in heavy optional packages."""


def __getattr__(name: str) -> _ModuleType:
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)  # also binds it on the package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
