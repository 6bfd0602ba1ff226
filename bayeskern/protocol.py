"""The protocol every posterior obeys; ``bayeskern.predict`` and checkpoints rely on nothing else.

A posterior describes uncertainty over some parameters of an unmodified ``nn.Module``, ``model``:

* ``names`` -- the Bayesian parameters, by ``model.named_parameters()`` name;
* ``sample(index)`` and ``mean()`` -- one tensor per name in ``names`` (the same keys for every
  posterior over the same selection); ``sample(index)`` is deterministic in ``index`` (sample i is
  the same draw every time it is asked for), which lets ``bayeskern.predict`` chunk and compile the
  Monte-Carlo loop, and returns tensors that later calls do not overwrite;
* ``fixed_tensors()`` -- what else the posterior holds in place of the model's tensors (trained
  point estimates and buffers; empty when the model's own are used);
* ``likelihood`` (``"classification"`` or ``"regression"``) and ``noise_std`` (the regression
  likelihood's observation-noise std);
* ``output_fn`` -- ``(output, inputs) -> logits`` for model outputs ``bayeskern.batches`` cannot
  read, or None;
* ``is_sharded`` and ``functional_forward(weights, inputs)`` -- whether the posterior and its model
  are sharded with FSDP2 (``bayeskern.distributed.fully_shard``), and the model's output on
  ``inputs`` with ``weights`` (a sample) for the Bayesian parameters, which is how a sharded
  posterior is predicted (on every rank);
* ``pred_type`` -- the predictive ``bayeskern.predict`` uses unless told (``"nn"`` or ``"glm"``);
  a ``GaussianPosterior`` also gives ``functional_variance`` for the linearised one.

Predictions run the module through ``torch.func.functional_call(model, {**model tensors,
**fixed_tensors(), **sample(index)}, ...)``, so the module is never edited.  ``bayeskern.predict``
reads ``model``, ``sample``, ``fixed_tensors``, ``likelihood``, ``noise_std``, ``output_fn``,
``is_sharded`` and, when sharded, ``functional_forward``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from .batches import Inputs, OutputFn
from .curvature.rows import JacobianRows


@runtime_checkable
class Posterior(Protocol):
    model: nn.Module
    names: list[str]
    likelihood: str
    noise_std: float
    output_fn: OutputFn | None

    @property
    def is_sharded(self) -> bool:
        """Whether the posterior and its model are sharded with FSDP2 (predicted by ``functional_forward``)."""

    @property
    def pred_type(self) -> str:
        """The predictive ``bayeskern.predict`` uses when asked for none: ``"nn"`` or ``"glm"``."""

    def sample(self, index: int) -> dict[str, Tensor]:
        """The Bayesian tensors of the index-th posterior sample (deterministic in index)."""

    def mean(self) -> dict[str, Tensor]:
        """The Bayesian tensors at the posterior mean."""

    def fixed_tensors(self) -> dict[str, Tensor]:
        """Point estimates and buffers the posterior holds in place of the model's."""

    def functional_forward(self, weights: dict[str, Tensor], inputs: Inputs) -> Any:
        """The model's output on ``inputs`` with ``weights`` for the Bayesian parameters (the model's
        tensors are left as they were)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@runtime_checkable
class GaussianPosterior(Posterior, Protocol):
    """A posterior ``N(mean(), Sigma)`` over the Bayesian tensors, which the linearised (``"glm"``)
    predictive needs: it reads ``Sigma`` only through ``functional_variance``."""

    def functional_variance(self, jacobians: JacobianRows) -> Tensor:
        """``j^T Sigma j`` for every vector ``j`` in ``jacobians``: per Bayesian name a tensor of shape
        ``(*lead, *parameter shape)`` or, for a weight of shape (outputs, inputs, ...), its rows as
        ``curvature.rows.OuterRows`` over the weight flattened to (outputs, -1); returns ``(*lead,)``
        (float64)."""
        ...
