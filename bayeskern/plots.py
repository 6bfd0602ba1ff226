"""Reliability diagrams, shift curves and OOD score histograms.

Headless: figures are ``matplotlib.figure.Figure`` objects on an explicit Agg canvas, so nothing
touches pyplot's global state or needs a display. The bins and the ECE/MCE come from
``bayeskern.metrics.calibration_bins``. Needs matplotlib (``pip install 'bayeskern[app]'``);
``import bayeskern`` loads this module only when ``bayeskern.plots`` is first used.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import numpy as np

try:
    from matplotlib.axes import Axes
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as _error:
    raise ImportError(
        f"bayeskern.plots needs matplotlib ({_error}); install it with: pip install 'bayeskern[app]'",
        name=_error.name,
    ) from _error

from .metrics import ArrayLike, Binning, CalibrationBins, Norm, calibration_bins

__all__ = ["compare_reliability", "ood_histograms", "reliability_diagram", "reliability_figure", "shift_curves"]

PANEL_INCHES = (4.0, 5.0)
"""Width and height of one method's panel (diagram above, histogram below)."""
DPI = 100


def _draw(ax_diagram: Axes, ax_histogram: Axes, bins: CalibrationBins, title: str) -> None:
    """Per-bin accuracy bars with the gap to the mean confidence shaded; the density of the
    confidences underneath."""
    left, width = bins.edges[:-1].numpy(), bins.edges.diff().numpy()
    filled = bins.count.numpy() > 0
    accuracy, confidence = bins.accuracy.numpy()[filled], bins.confidence.numpy()[filled]

    ax_diagram.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax_diagram.bar(
        left[filled], accuracy, width[filled], align="edge", color="tab:blue", edgecolor="black", label="accuracy"
    )
    ax_diagram.bar(
        left[filled],
        confidence - accuracy,
        width[filled],
        bottom=accuracy,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    norms: tuple[tuple[str, Norm], ...] = (("ECE", "l1"), ("MCE", "max"))
    for name, norm in norms:
        ax_diagram.plot([], [], " ", label=f"{name} = {bins.error(norm):.4f}")
    ax_diagram.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax_diagram.legend(loc="upper left", fontsize="small")
    if title:
        ax_diagram.set_title(title)

    share = (bins.count / bins.count.sum()).numpy()
    density = np.divide(share, width, out=np.zeros_like(share), where=width > 0)
    ax_histogram.bar(left, density, width, align="edge", color="tab:gray", edgecolor="black")
    ax_histogram.set(xlabel="confidence", ylabel="density")


def reliability_figure(
    probs_by_name: Mapping[str, ArrayLike],
    targets: ArrayLike,
    n_bins: int = 15,
    *,
    binning: Binning = "uniform",
    from_logits: bool = False,
) -> Figure:
    """A figure with one reliability panel per method, side by side, titled by its name.

    Every input is validated (and binned) before anything is drawn.
    """
    if not probs_by_name:
        raise ValueError("probs_by_name is empty")
    all_bins = [
        calibration_bins(probs, targets, n_bins, binning=binning, from_logits=from_logits)
        for probs in probs_by_name.values()
    ]
    width, height = PANEL_INCHES
    figure = Figure(figsize=(width * len(all_bins), height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(
        2, len(all_bins), squeeze=False, sharex=True, sharey="row", gridspec_kw={"height_ratios": [3, 1]}
    )
    for title, bins, ax_diagram, ax_histogram in zip(probs_by_name, all_bins, *axes):
        _draw(ax_diagram, ax_histogram, bins, title)
    return figure


def _save(figure: Figure, path: str | PathLike) -> Path:
    figure.savefig(path, dpi=DPI)
    return Path(path)


def reliability_diagram(
    probs: ArrayLike,
    targets: ArrayLike,
    path: str | PathLike,
    n_bins: int = 15,
    title: str | None = None,
    *,
    binning: Binning = "uniform",
    from_logits: bool = False,
) -> Path:
    """Write a reliability diagram to ``path`` (format from its suffix, e.g. .png; a PNG is
    ``PANEL_INCHES * DPI`` = 400 x 500 pixels) and return the path."""
    figure = reliability_figure({title or "": probs}, targets, n_bins, binning=binning, from_logits=from_logits)
    return _save(figure, path)


def compare_reliability(
    probs_by_name: Mapping[str, ArrayLike],
    targets: ArrayLike,
    path: str | PathLike,
    n_bins: int = 15,
    *,
    binning: Binning = "uniform",
    from_logits: bool = False,
) -> Path:
    """Write the reliability diagrams of several methods side by side (400 pixels wide each)."""
    figure = reliability_figure(probs_by_name, targets, n_bins, binning=binning, from_logits=from_logits)
    return _save(figure, path)


def shift_curves(
    shift_by_method: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], path: str | PathLike
) -> Path:
    """ECE (top row) and NLL (bottom row) against severity, one panel per corruption and one line
    per method; ``shift_by_method[method][corruption][severity]`` holds ``ece`` and ``nll``.  The
    in-distribution value, where given as severity ``"0"``, starts each line."""
    corruptions = list(next(iter(shift_by_method.values())))
    width, height = PANEL_INCHES
    figure = Figure(figsize=(width * len(corruptions), height * 1.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(corruptions), squeeze=False, sharex=True)
    for column, corruption in enumerate(corruptions):
        for row, metric in enumerate(("ece", "nll")):
            ax = axes[row][column]
            for method, shift in shift_by_method.items():
                levels = sorted(shift[corruption], key=int)
                ax.plot([int(s) for s in levels], [shift[corruption][s][metric] for s in levels], "o-", label=method)
            ax.set(xlabel="severity" if row else "", ylabel=metric.upper(), title=corruption if not row else "")
    axes[0][0].legend(fontsize="small")
    return _save(figure, path)


def ood_histograms(scores_by_method: Mapping[str, tuple[ArrayLike, ArrayLike]], path: str | PathLike) -> Path:
    """One panel per method: histograms of an OOD score (e.g. mutual information) on the
    in-distribution and the out-of-distribution inputs, ``scores_by_method[method] = (in, out)``."""
    width, _ = PANEL_INCHES
    figure = Figure(figsize=(width * len(scores_by_method), 3.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(scores_by_method), squeeze=False)[0]
    for ax, (method, (inside, outside)) in zip(axes, scores_by_method.items()):
        s_in, s_out = np.asarray(inside, dtype=float), np.asarray(outside, dtype=float)
        high = max(float(s_in.max(initial=0.0)), float(s_out.max(initial=0.0))) or 1.0
        bins = np.linspace(0.0, high, 30)
        ax.hist(s_in, bins, alpha=0.6, density=True, label="in-distribution")
        ax.hist(s_out, bins, alpha=0.6, density=True, label="out-of-distribution")
        ax.set(title=method, xlabel="score")
    axes[0].legend(fontsize="small")
    return _save(figure, path)
