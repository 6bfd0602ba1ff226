"""Calibration and uncertainty metrics, and temperature scaling.

Inputs are class probabilities ``probs`` of shape (N, C) -- or logits with ``from_logits=True``
-- and integer ``targets`` of shape (N,), as torch tensors or numpy arrays of any dtype. All
arithmetic is float64 on the CPU. Scalar metrics return Python floats; per-example uncertainties
return float64 tensors. Invalid input (wrong shape, empty, NaN/inf, rows of ``probs`` that do
not sum to one, targets out of range, mismatched lengths) raises ``ValueError`` naming the
argument and the problem.

Notation: p_ic is the probability of class c for example i, y_i its target, conf_i = max_c p_ic
its confidence and hit_i = 1[argmax_c p_ic = y_i] whether its top class is right.

Only torch and numpy are imported with the module; ``fit_temperature`` imports scipy and
``ood_auroc``/``ood_report`` import scikit-learn when called (both come with
``pip install 'bayeskern[app]'``; without them those functions raise ImportError saying so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CalibrationBins",
    "accuracy",
    "apply_temperature",
    "brier",
    "calibration_bins",
    "calibration_report",
    "classwise_ece",
    "ece",
    "error",
    "expected_entropy",
    "fit_temperature",
    "mce",
    "mutual_information",
    "nll",
    "ood_auroc",
    "ood_report",
    "predictive_entropy",
]

ArrayLike = torch.Tensor | np.ndarray
Norm = Literal["l1", "l2", "max"]
Binning = Literal["uniform", "adaptive"]

SUM_TOL = 1e-3
"""How far a row of ``probs`` may sum from one."""

_TINY = torch.finfo(torch.float64).tiny
_SHAPES = {1: "(N,)", 2: "(N, C)", 3: "(S, N, C)"}
_INTEGER_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


# ----------------------------------------------------------------------------- optional deps
def _optional(module: str, package: str) -> ModuleType:
    """``module`` imported on first use: scipy and scikit-learn are not needed by ``import
    bayeskern``, only by the metrics that call into them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"this bayeskern.metrics function needs {package} ({error}); install it with: pip install 'bayeskern[app]'",
            name=error.name,
        ) from error


def _sklearn_metrics() -> ModuleType:
    return _optional("sklearn.metrics", "scikit-learn")


# ----------------------------------------------------------------------------- validation
def _as_float64(x: ArrayLike, name: str, ndim: int) -> torch.Tensor:
    """``x`` as a finite, non-empty float64 CPU tensor with ``ndim`` dimensions."""
    t = torch.as_tensor(x).detach()
    if t.ndim != ndim:
        raise ValueError(f"{name} must have shape {_SHAPES[ndim]}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    t = t.to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _probs(x: ArrayLike, from_logits: bool, name: str = "probs", ndim: int = 2) -> torch.Tensor:
    """Validated float64 probabilities over the last axis (softmax of ``x`` if ``from_logits``)."""
    t = _as_float64(x, name, ndim)
    if from_logits:
        return torch.softmax(t, dim=-1)
    hint = "; pass from_logits=True for logits"
    if (t < 0).any():
        raise ValueError(f"{name} has negative entries{hint}")
    deviation = (t.sum(-1) - 1).abs().max().item()
    if deviation > SUM_TOL:
        raise ValueError(f"{name} rows must sum to 1 (largest deviation {deviation:.3g} > {SUM_TOL}){hint}")
    return t


def _targets(targets: ArrayLike, scores: torch.Tensor, scores_name: str) -> torch.Tensor:
    """Validated int64 class indices, one per row of the (N, C) ``scores``."""
    t = torch.as_tensor(targets).detach().cpu()
    if t.ndim != 1:
        raise ValueError(f"targets must have shape (N,), got shape {tuple(t.shape)}")
    if t.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"targets must hold integer class indices, got dtype {t.dtype}")
    num_rows, num_classes = scores.shape
    if len(t) != num_rows:
        raise ValueError(f"targets has length {len(t)} but {scores_name} has {num_rows} rows")
    low, high = t.min().item(), t.max().item()
    if low < 0 or high >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got values in [{low}, {high}]")
    return t.long()


def _prepare(probs: ArrayLike, targets: ArrayLike, from_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p = _probs(probs, from_logits)
    return p, _targets(targets, p, "probs")


# ----------------------------------------------------------------------------- proper scores
def accuracy(probs: ArrayLike, targets: ArrayLike, *, from_logits: bool = False) -> float:
    """Fraction of examples whose arg-max class is the target: (1/N) sum_i hit_i."""
    p, y = _prepare(probs, targets, from_logits)
    return (p.argmax(1) == y).double().mean().item()


def error(probs: ArrayLike, targets: ArrayLike, *, from_logits: bool = False) -> float:
    """Top-1 error, 1 - accuracy."""
    return 1.0 - accuracy(probs, targets, from_logits=from_logits)


def nll(probs: ArrayLike, targets: ArrayLike, *, from_logits: bool = False) -> float:
    """Mean negative log-likelihood -(1/N) sum_i log p_{i y_i} (natural log).

    Logits go through ``log_softmax``; a zero probability is clamped to the smallest normal
    float64, giving a large finite loss (about 708) instead of inf.
    """
    if from_logits:
        log_p = torch.log_softmax(_as_float64(probs, "probs", 2), dim=1)
    else:
        log_p = _probs(probs, False).clamp_min(_TINY).log()
    y = _targets(targets, log_p, "probs")
    return -log_p.gather(1, y[:, None]).mean().item()


def brier(probs: ArrayLike, targets: ArrayLike, *, from_logits: bool = False) -> float:
    """Multiclass Brier score (1/N) sum_i sum_c (p_ic - 1[c = y_i])^2, in [0, 2]."""
    p, y = _prepare(probs, targets, from_logits)
    return (p - F.one_hot(y, p.shape[1])).square().sum(1).mean().item()


# ----------------------------------------------------------------------------- binning
@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin statistics of a reliability diagram (float64 tensors, B bins).

    Bin b holds the confidences in (edges[b], edges[b+1]] (bin 0 also holds edges[0]).
    ``count`` is the number of examples per bin; ``confidence`` and ``accuracy`` are their mean
    confidence and mean hit (0 in empty bins).
    """

    edges: torch.Tensor
    count: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor

    def error(self, norm: Norm = "l1") -> float:
        """Calibration error from weights w_b = count_b / N and gaps
        g_b = |accuracy_b - confidence_b|:

        ``l1`` (ECE): sum_b w_b g_b;  ``l2`` (RMS calibration error): sqrt(sum_b w_b g_b^2);
        ``max`` (MCE): max_b g_b over non-empty bins.
        """
        weight = self.count / self.count.sum()
        gap = (self.accuracy - self.confidence).abs()
        if norm == "l1":
            return (weight * gap).sum().item()
        if norm == "l2":
            return (weight * gap.square()).sum().sqrt().item()
        if norm == "max":
            return gap[self.count > 0].max().item()
        raise ValueError(f"norm must be 'l1', 'l2' or 'max', got {norm!r}")


def _edges(confidence: torch.Tensor, n_bins: int, binning: Binning) -> torch.Tensor:
    """B + 1 bin edges: equal width on [0, 1] (``uniform``) or equal mass (``adaptive``: the
    quantiles of ``confidence``, from its minimum to its maximum)."""
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    levels = np.linspace(0.0, 1.0, n_bins + 1)
    if binning == "adaptive":
        levels = np.quantile(confidence.numpy(), levels)
    elif binning != "uniform":
        raise ValueError(f"binning must be 'uniform' or 'adaptive', got {binning!r}")
    return torch.from_numpy(levels)


def _bin(confidence: torch.Tensor, hit: torch.Tensor, n_bins: int, binning: Binning) -> CalibrationBins:
    """Bins of ``confidence`` with their mean confidence and mean ``hit``."""
    edges = _edges(confidence, n_bins, binning)
    index = torch.searchsorted(edges[1:-1].contiguous(), confidence)  # e_b < conf <= e_{b+1}
    count = torch.bincount(index, minlength=n_bins).double()

    def bin_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.bincount(index, values, minlength=n_bins) / count.clamp_min(1)

    return CalibrationBins(edges, count, bin_mean(confidence), bin_mean(hit))


def calibration_bins(
    probs: ArrayLike,
    targets: ArrayLike,
    n_bins: int = 15,
    *,
    binning: Binning = "uniform",
    from_logits: bool = False,
) -> CalibrationBins:
    """Top-label reliability bins of conf_i against hit_i (what ``ece`` and the plots use)."""
    p, y = _prepare(probs, targets, from_logits)
    confidence, prediction = p.max(1)
    return _bin(confidence, (prediction == y).double(), n_bins, binning)


def ece(
    probs: ArrayLike,
    targets: ArrayLike,
    n_bins: int = 15,
    *,
    norm: Norm = "l1",
    binning: Binning = "uniform",
    from_logits: bool = False,
) -> float:
    """Top-label expected calibration error; see ``CalibrationBins.error`` for the norms."""
    bins = calibration_bins(probs, targets, n_bins, binning=binning, from_logits=from_logits)
    return bins.error(norm)


def mce(
    probs: ArrayLike,
    targets: ArrayLike,
    n_bins: int = 15,
    *,
    binning: Binning = "uniform",
    from_logits: bool = False,
) -> float:
    """Maximum calibration error: the largest gap over non-empty bins."""
    return ece(probs, targets, n_bins, norm="max", binning=binning, from_logits=from_logits)


def classwise_ece(
    probs: ArrayLike,
    targets: ArrayLike,
    n_bins: int = 15,
    *,
    binning: Binning = "uniform",
    from_logits: bool = False,
) -> float:
    """Class-wise ECE (Kull et al., 2019): (1/C) sum_c ECE of p_{.c} against 1[y = c]."""
    p, y = _prepare(probs, targets, from_logits)
    hits = F.one_hot(y, p.shape[1]).double()
    per_class = zip(p.T.contiguous(), hits.T)
    return float(np.mean([_bin(pc, hc, n_bins, binning).error("l1") for pc, hc in per_class]))


def calibration_report(
    probs: ArrayLike, targets: ArrayLike, n_bins: int = 15, *, from_logits: bool = False
) -> dict[str, float]:
    """All scalar metrics: accuracy, error, nll, brier, ece, mce, rmsce (l2), ece_adaptive,
    classwise_ece."""
    p, y = _prepare(probs, targets, from_logits)
    bins = calibration_bins(p, y, n_bins)
    return {
        "accuracy": accuracy(p, y),
        "error": error(p, y),
        "nll": nll(probs, targets, from_logits=from_logits),
        "brier": brier(p, y),
        "ece": bins.error("l1"),
        "mce": bins.error("max"),
        "rmsce": bins.error("l2"),
        "ece_adaptive": ece(p, y, n_bins, binning="adaptive"),
        "classwise_ece": classwise_ece(p, y, n_bins),
    }


# ----------------------------------------------------------------------------- uncertainty
def _entropy(p: torch.Tensor) -> torch.Tensor:
    """H[p] = -sum_c p_c log p_c over the last axis (0 log 0 = 0)."""
    return -torch.xlogy(p, p).sum(-1)


def predictive_entropy(sample_probs: ArrayLike, *, from_logits: bool = False) -> torch.Tensor:
    """Entropy of the predictive H[(1/S) sum_s p_s], per example: (S, N, C) -> (N,).

    For a single deterministic model pass ``probs[None]``.
    """
    return _entropy(_probs(sample_probs, from_logits, "sample_probs", 3).mean(0))


def expected_entropy(sample_probs: ArrayLike, *, from_logits: bool = False) -> torch.Tensor:
    """Aleatoric part (1/S) sum_s H[p_s], per example: (S, N, C) -> (N,)."""
    return _entropy(_probs(sample_probs, from_logits, "sample_probs", 3)).mean(0)


def mutual_information(sample_probs: ArrayLike, *, from_logits: bool = False) -> torch.Tensor:
    """Epistemic part (BALD) H[(1/S) sum_s p_s] - (1/S) sum_s H[p_s] >= 0, per example.

    Rounding below zero is clipped to zero.
    """
    p = _probs(sample_probs, from_logits, "sample_probs", 3)
    return (predictive_entropy(p) - expected_entropy(p)).clamp_min(0.0)


def _ood_labels_scores(scores_in: ArrayLike, scores_out: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 = out-of-distribution) and scores for scikit-learn."""
    s_in = _as_float64(scores_in, "scores_in", 1)
    s_out = _as_float64(scores_out, "scores_out", 1)
    labels = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    return labels, torch.cat([s_in, s_out]).numpy()


def ood_auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """AUROC of telling out-of-distribution from in-distribution examples.

    Scores are larger for "more likely out-of-distribution" (e.g. predictive entropy); the
    out-of-distribution examples are the positive class. 0.5 is chance, 1 perfect.
    """
    return float(_sklearn_metrics().roc_auc_score(*_ood_labels_scores(scores_in, scores_out)))


def ood_report(scores_in: ArrayLike, scores_out: ArrayLike) -> dict[str, float]:
    """``auroc``, ``aupr`` (average precision, out-of-distribution positive) and ``fpr95`` (the
    fraction of in-distribution examples flagged at the first threshold that flags 95% of the
    out-of-distribution ones), with the conventions of ``ood_auroc``."""
    sk = _sklearn_metrics()
    labels, scores = _ood_labels_scores(scores_in, scores_out)
    fpr, tpr, _ = sk.roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auroc": float(sk.roc_auc_score(labels, scores)),
        "aupr": float(sk.average_precision_score(labels, scores)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95)]),
    }


# ----------------------------------------------------------------------------- temperature
def fit_temperature(logits: ArrayLike, targets: ArrayLike, *, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T):

        NLL(T) = (1/N) sum_i [ logsumexp_c(z_ic / T) - z_{i y_i} / T ].

    NLL is convex in 1/T, hence unimodal in log T, which is searched over ``bounds`` with
    Brent's bounded method. Any per-row shift of the logits gives the same T, so log-mean-
    probabilities log((1/S) sum_s p_s) of a Bayesian predictive work as logits (the scaled
    predictive is then proportional to pbar^(1/T)).
    """
    low, high = bounds
    if not 0 < low < high < math.inf:
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}")
    minimize_scalar = _optional("scipy.optimize", "scipy").minimize_scalar
    z = _as_float64(logits, "logits", 2)
    z_target = z.gather(1, _targets(targets, z, "logits")[:, None]).squeeze(1)

    def mean_nll(log_t: float) -> float:
        inv_t = math.exp(-log_t)
        return (torch.logsumexp(inv_t * z, dim=1) - inv_t * z_target).mean().item()

    result = minimize_scalar(
        mean_nll, bounds=(math.log(low), math.log(high)), method="bounded", options={"xatol": 1e-6}
    )
    return math.exp(result.x)


def apply_temperature(logits: ArrayLike, temperature: float) -> torch.Tensor:
    """Scaled logits z / T (softmax them for calibrated probabilities)."""
    if not 0 < float(temperature) < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return torch.as_tensor(logits) / temperature
