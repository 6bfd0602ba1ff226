"""bayeskern: fast approximate Bayesian posteriors over the weights of any PyTorch nn.Module."""
from . import metrics, ops, plots
from .posteriors import Posterior

__version__ = "0.1.0"

__all__ = ["Posterior", "metrics", "ops", "plots", "__version__"]
