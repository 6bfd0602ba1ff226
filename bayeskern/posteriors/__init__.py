"""The posterior families; each obeys ``base.Posterior`` so predict, checkpoints and the CLI treat them alike."""
from .base import Posterior

__all__ = ["Posterior"]
