"""The protocol every posterior obeys.

A posterior wraps an unmodified ``nn.Module`` and describes uncertainty over some of its parameters.
``sample(index)`` and ``mean()`` return a mapping from parameter name (as in
``model.named_parameters()``) to tensor for the parameters the posterior is uncertain about; every
other parameter and buffer is taken from the module itself.  Predictions run the module through
``torch.func.functional_call(model, {**buffers, **params, **sampled}, x)``, so the module is never
edited.  ``sample(index)`` is deterministic in ``index`` (sample i is the same draw every time it is
asked for), which lets ``bayeskern.predict`` chunk and compile the Monte-Carlo loop.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Posterior(Protocol):
    model: nn.Module
    likelihood: str  # "classification" or "regression"

    def sample(self, index: int) -> dict[str, Tensor]:
        """Parameters of the index-th posterior sample (deterministic in index)."""

    def mean(self) -> dict[str, Tensor]:
        """Parameters at the posterior mean."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...
