"""The predictive: ``predict(posterior, inputs, ...)`` and what it returns, ``Prediction``.

Two ways to predict with a posterior over weights (``pred_type``):

* ``"nn"`` -- the network run at ``num_samples`` posterior samples, averaged (``sampling.py``: the
  per-sample loop, compiled; K samples per call under ``vmap``; the last-layer path);
* ``"glm"`` -- the network linearised around the posterior mean, ``f_lin(x, theta) = f(x, theta*) +
  J(x) (theta - theta*)``, whose outputs are Gaussian under a Gaussian posterior (``glm.py``): the
  ``"probit"`` link in closed form, or the ``"mc"`` link over samples of the linearised outputs.

``pred_type=None`` takes the posterior's own (``Posterior.pred_type``): ``"glm"`` for a Laplace
posterior (the model its Gaussian is exact for), ``"nn"`` elsewhere.
"""

from __future__ import annotations

from typing import Any

from ..batches import OutputFn
from ..likelihoods import LIKELIHOODS
from ..protocol import Posterior
from ..validation import check_choice, check_count, check_nonnegative
from .base import Prediction, check_posterior
from .glm import LINK_APPROXES, predict_linearized
from .sampling import predict_sampled

PRED_TYPES = ("nn", "glm")


def predict(
    posterior: Posterior,
    inputs: Any,
    *,
    pred_type: str | None = None,
    link_approx: str = "probit",
    num_samples: int = 32,
    compile: bool = True,
    vectorize: bool | None = None,
    batch_size: int | None = None,
    return_logits: bool = False,
    likelihood: str | None = None,
    noise_std: float | None = None,
    output_fn: OutputFn | None = None,
) -> Prediction:
    """The posterior predictive of ``posterior`` on ``inputs``.

    ``inputs`` is one batch of model inputs (a tensor, a tuple of positional inputs or a Mapping of
    keyword inputs) or any other iterable of loader batches (a list, a ``DataLoader``;
    ``bayeskern.batches``: inputs, ``(inputs, targets, ...)``, Mappings with ``labels``, which are
    ignored); ``batch_size`` splits each of them further.  A tuple is always one call's positional
    inputs: several batches go in a list.  ``likelihood``, ``noise_std`` (the regression likelihood's
    observation noise, added to the variance) and ``output_fn`` default to the posterior's.

    ``pred_type``: ``"nn"`` (sampled networks, ``num_samples`` of them; ``compile``, ``vectorize``:
    ``sampling.py``) or ``"glm"`` (the linearised network, ``link_approx`` ``"probit"`` or ``"mc"``
    with ``num_samples``; ``glm.py``); None: ``posterior.pred_type``.  Which ``Prediction`` fields
    are set: ``probs`` and ``entropy`` always (classification); ``expected_entropy`` and
    ``mutual_info`` where there are samples (``"nn"``, ``"glm"`` with ``"mc"``; None for the probit);
    ``logits`` (per-sample outputs) with ``return_logits`` where there are samples; ``mean`` and
    ``variance`` for regression.

    Raises TypeError naming the members of ``bayeskern.protocol.Posterior`` that ``posterior`` lacks
    (or, for ``"glm"``, that it is not a ``GaussianPosterior``), ValueError naming the argument that
    is out of range, or ``inputs`` when it has no one meaning or holds no batch.
    """
    check_posterior(posterior)
    pred_type = check_choice(posterior.pred_type if pred_type is None else pred_type, "pred_type", PRED_TYPES)
    common = {
        "num_samples": check_count(num_samples, "num_samples", 1),
        "batch_size": None if batch_size is None else check_count(batch_size, "batch_size", 1),
        "return_logits": return_logits,
        "likelihood": check_choice(likelihood or posterior.likelihood, "likelihood", LIKELIHOODS),
        "noise_std": check_nonnegative(posterior.noise_std if noise_std is None else noise_std, "noise_std"),
        "output_fn": output_fn if output_fn is not None else posterior.output_fn,
    }
    if pred_type == "glm":
        link_approx = check_choice(link_approx, "link_approx", LINK_APPROXES)
        return predict_linearized(posterior, inputs, link_approx=link_approx, **common)
    return predict_sampled(posterior, inputs, compile=compile, vectorize=vectorize, **common)


__all__ = ["PRED_TYPES", "Prediction", "predict"]
