"""The posterior families; each obeys ``base.Posterior`` so predict, checkpoints and the CLI treat them alike."""
from .base import Posterior
from .mc_dropout import MCDropout
from .prior import GaussianPrior
from .selection import select_parameters
from .sgld import BayesSGLD
from .vi import VI

__all__ = ["BayesSGLD", "GaussianPrior", "MCDropout", "Posterior", "VI", "select_parameters"]
