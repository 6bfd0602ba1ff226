"""The posterior families; each obeys ``bayeskern.protocol.Posterior``, so predict, checkpoints and the
CLI treat them alike."""

from ..protocol import Posterior
from .diag_laplace import DiagLaplace
from .diagonal_gaussian import DiagonalGaussian
from .ivon import IVON
from .kron_laplace import KronLaplace
from .laplace import Laplace
from .mc_dropout import MCDropout
from .prior import GaussianPrior
from .sample_bank import SampleBank
from .selection import select_parameters
from .sgld import BayesSGLD
from .vi import VI

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
    "SampleBank",
    "select_parameters",
]
