"""Out-of-distribution detection: how well each method's uncertainty tells inputs of classes the
task does not have (``Splits.ood``) from the test inputs.

Three scores, larger meaning "more likely out-of-distribution":

* ``max_prob``: ``1 - max_c p_c`` of the predictive (the usual baseline);
* ``entropy``: the predictive entropy ``H[p]``;
* ``mutual_information``: ``H[p] - (1/S) sum_s H[p_s]``, the disagreement between weight samples
  (zero for a point estimate, so the plain fit scores chance with it).

Each is summarised by ``bayeskern.metrics.ood_report``: AUROC, AUPR (OOD positive) and the false
positive rate at 95% true positive rate.
"""

from __future__ import annotations

from torch import Tensor

from bayeskern import metrics

SCORES = ("max_prob", "entropy", "mutual_information")


def scores(probs: Tensor, mutual_information: Tensor) -> dict[str, Tensor]:
    """The OOD scores of a predictive, per example."""
    p = probs.double()
    return {
        "max_prob": 1.0 - p.max(dim=-1).values,
        "entropy": metrics.predictive_entropy(p[None]),
        "mutual_information": mutual_information.double(),
    }


def ood_metrics(inside: tuple[Tensor, Tensor], outside: tuple[Tensor, Tensor]) -> dict[str, dict[str, float]]:
    """``{score: {auroc, aupr, fpr95}}`` for in-distribution and OOD ``(probs, mutual information)``."""
    score_in, score_out = scores(*inside), scores(*outside)
    return {name: metrics.ood_report(score_in[name], score_out[name]) for name in SCORES}
