"""bayeskern: fast approximate Bayesian posteriors over the weights of any PyTorch nn.Module."""
from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
