"""Per-example curvature: sums of squared per-example gradients in about one backward pass.

``squared_gradients(model, batches, loss_fn, names)`` is the entry point (``driver.py``); the
closed-form per-op rules live in ``rules.py``, the tracing of parameter uses in ``tracing.py``
and the torch.func fallback for everything else in ``fallback.py``.
"""

from .driver import SquaredGradients, squared_gradients
from .tracing import Plan

__all__ = ["Plan", "SquaredGradients", "squared_gradients"]
