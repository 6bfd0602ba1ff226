"""What a Gaussian posterior computes for the linearised predictive: ``j^T Sigma j`` over Jacobian rows.

``bayeskern.protocol.GaussianPosterior.functional_variance(jacobians)`` takes, per Bayesian name, a
tensor of shape ``(*lead, *parameter shape)`` (rows of per-example Jacobians) and returns
``(*lead,)``.  With a diagonal Sigma (``VI``, ``DiagLaplace``, ``KronLaplace``'s diagonal blocks)
that is ``sum_p j_p^2 sigma_p^2``, here once.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..curvature.rows import JacobianRows, OuterRows


def diagonal_functional_variance(jacobians: JacobianRows, variances: Mapping[str, Tensor]) -> Tensor:
    """``sum over names and elements of j^2 sigma^2`` for the ``jacobians``' leading dimensions (float64;
    ``OuterRows`` in their own dtype); ``variances`` holds sigma^2 per name, shaped like the parameter."""
    total: Tensor | None = None
    for name, variance in variances.items():
        rows = jacobians[name]
        if isinstance(rows, OuterRows):
            term = rows.weighted_square_sum(variance.reshape(variance.shape[0], -1)).double()
        else:
            dense = rows.double()
            lead = dense.dim() - variance.dim()
            term = (dense.square() * variance.double()).flatten(lead).sum(-1)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("variances: no Bayesian tensor")
    return total
