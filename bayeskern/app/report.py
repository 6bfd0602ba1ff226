"""What a run reports of each trained method: calibration before and after temperature scaling, the
shifted test sets and OOD detection (``evaluate_method``; regression: ``evaluate_regression``), the
markdown comparison tables, ``metrics.json``, the figures, and the per-method results a resumed run
reads back."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from bayeskern import metrics

from .errors import UsageError
from .measure import Usage
from .ood import ood_metrics
from .ood import scores as ood_scores
from .regression import regression_report
from .shared import Splits
from .training import load_safely

COLUMNS = ("error", "ece", "mce", "nll", "brier")


@dataclass
class MethodResult:
    test: dict[str, float]
    test_ts: dict[str, float]
    temperature: float
    train_seconds: float
    peak_bytes: int | None
    val: dict[str, float] = field(default_factory=dict)  # the validation split, for choosing settings
    shift: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # corruption -> severity -> metrics
    shift_mean: dict[str, float] = field(default_factory=dict)  # error/ECE/NLL averaged over every shifted set
    ood: dict[str, dict[str, float]] = field(default_factory=dict)  # score -> auroc/aupr/fpr95


def _log_probs(probs: Tensor) -> Tensor:
    return probs.double().clamp_min(1e-12).log()


def evaluate(
    val_probs: Tensor,
    val_targets: Tensor,
    test_probs: Tensor,
    test_targets: Tensor,
    train_seconds: float,
    peak_bytes: int | None,
) -> MethodResult:
    """Calibration on test, raw and after a temperature fitted on the validation split (on the
    log of the predictive probabilities, so Bayesian predictives are scaled as a whole)."""
    temperature = metrics.fit_temperature(_log_probs(val_probs), val_targets)
    scaled = metrics.apply_temperature(_log_probs(test_probs), temperature).softmax(dim=-1)
    return MethodResult(
        test=metrics.calibration_report(test_probs.double(), test_targets),
        test_ts=metrics.calibration_report(scaled, test_targets),
        temperature=float(temperature),
        train_seconds=train_seconds,
        peak_bytes=peak_bytes,
        val=metrics.calibration_report(val_probs.double(), val_targets),
    )


SHIFT_METRICS = ("error", "ece", "nll")


def shift_report(probs_by_set: dict[tuple[str, int], Tensor], targets: Tensor) -> tuple[dict, dict[str, float]]:
    """Error, ECE and NLL on every (corruption, severity) set, and their means over all sets."""
    shift: dict[str, dict[str, dict[str, float]]] = {}
    for (corruption, severity), probs in probs_by_set.items():
        report = metrics.calibration_report(probs.double(), targets)
        shift.setdefault(corruption, {})[str(severity)] = {k: report[k] for k in SHIFT_METRICS}
    rows = [row for by_severity in shift.values() for row in by_severity.values()]
    mean = {k: sum(row[k] for row in rows) / len(rows) for k in SHIFT_METRICS} if rows else {}
    return shift, mean


class Evaluated(Protocol):
    """What ``evaluate_method`` needs of a trained method (``bayeskern.app.methods.Method``)."""

    name: str

    def predictive(self, dataset: Dataset) -> tuple[Tensor, Tensor]: ...


def evaluate_method(
    method: Evaluated,
    splits: Splits,
    shifted: Mapping[Any, Dataset],
    usage: Usage,
    val_targets: Tensor,
    test_targets: Tensor,
) -> tuple[MethodResult, Tensor, tuple[Tensor, Tensor] | None]:
    """Validation/test calibration, the shifted test sets and OOD detection of one trained method;
    also the test probabilities and the (in, out) predictive entropies for the histograms (None
    without an OOD set).  Every set goes through one predictive call, so a posterior's weight
    samples are drawn once for all.  Non-finite probabilities (a diverged run) raise UsageError."""
    if splits.likelihood == "regression":
        return evaluate_regression(method, splits, usage, val_targets, test_targets)
    sets = {"val": splits.val, "test": splits.test, **shifted}
    if splits.ood is not None:
        sets["ood"] = splits.ood
    probs, mutual_information = method.predictive(ConcatDataset(list(sets.values())))
    bounds = [0, *itertools.accumulate(len(d) for d in sets.values())]  # type: ignore[arg-type]
    parts = {key: (probs[a:b], mutual_information[a:b]) for key, a, b in zip(sets, bounds, bounds[1:])}
    (val, _), (test, test_mi) = parts["val"], parts["test"]
    if not torch.isfinite(probs).all():
        raise UsageError(
            f"{method.name}: the predictive probabilities are not finite (the run diverged); lower its learning rate"
        )
    result = evaluate(val, val_targets, test, test_targets, usage.seconds, usage.peak_bytes)
    if shifted:
        result.shift, result.shift_mean = shift_report({key: parts[key][0] for key in shifted}, test_targets)
    scores = None
    if splits.ood is not None:
        result.ood = ood_metrics(parts["test"], parts["ood"])
        scores = (ood_scores(test, test_mi)["entropy"], ood_scores(*parts["ood"])["entropy"])
    return result, test, scores


def evaluate_regression(
    method: Evaluated, splits: Splits, usage: Usage, val_targets: Tensor, test_targets: Tensor
) -> tuple[MethodResult, Tensor, None]:
    """RMSE, Gaussian NLL and 90% coverage on validation and test (``bayeskern.app.regression``); the
    test predictive mean.  A non-finite predictive raises UsageError."""
    mean, variance = method.predictive(ConcatDataset([splits.val, splits.test]))
    if not (torch.isfinite(mean).all() and torch.isfinite(variance).all()):
        raise UsageError(f"{method.name}: the predictive is not finite (the run diverged); lower its learning rate")
    n, scale = len(splits.val), splits.target_scale  # type: ignore[arg-type]
    result = MethodResult(
        test=regression_report(mean[n:], variance[n:], test_targets, scale),
        test_ts={},
        temperature=1.0,
        train_seconds=usage.seconds,
        peak_bytes=usage.peak_bytes,
        val=regression_report(mean[:n], variance[:n], val_targets, scale),
    )
    return result, mean[n:], None


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def _shift_ood_head(results: dict[str, MethodResult]) -> list[str]:
    shifted = any(r.shift_mean for r in results.values())
    ood = any(r.ood for r in results.values())
    return [*(("shift err", "shift ECE", "shift NLL") if shifted else ()), *(("AUROC maxp", "AUROC MI") if ood else ())]


def _shift_ood_cells(r: MethodResult, head: list[str]) -> list[str]:
    """Means over the shifted test sets; OOD AUROC of the max-probability and mutual-information scores."""
    values = {
        "shift err": r.shift_mean.get("error"),
        "shift ECE": r.shift_mean.get("ece"),
        "shift NLL": r.shift_mean.get("nll"),
        "AUROC maxp": r.ood.get("max_prob", {}).get("auroc"),
        "AUROC MI": r.ood.get("mutual_information", {}).get("auroc"),
    }
    return ["n/a" if values[h] is None else f"{values[h]:.4f}" for h in head]


def markdown_table(results: dict[str, MethodResult]) -> str:
    extra = _shift_ood_head(results)
    head = [*COLUMNS, "ECE (TS)", "NLL (TS)", "T", *extra, "train s", "peak MiB"]  # peak MiB: bayeskern.app.measure
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{r.test[c]:.4f}" for c in COLUMNS]
        cells += [f"{r.test_ts['ece']:.4f}", f"{r.test_ts['nll']:.4f}", f"{r.temperature:.2f}"]
        cells += _shift_ood_cells(r, extra)
        cells += [f"{r.train_seconds:.1f}", _mib(r.peak_bytes)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regression_table(results: dict[str, MethodResult]) -> str:
    """Regression: test RMSE, Gaussian NLL and central-90% coverage, and the validation NLL."""
    head = ["RMSE", "NLL", "coverage 90%", "val NLL", "train s", "peak MiB"]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{r.test['rmse']:.2f}", f"{r.test['nll']:.4f}", f"{r.test['coverage90']:.3f}", f"{r.val['nll']:.4f}"]
        lines.append(f"| {name} | " + " | ".join([*cells, f"{r.train_seconds:.1f}", _mib(r.peak_bytes)]) + " |")
    return "\n".join(lines)


def study_table(results_by_prior: dict[str, dict[str, MethodResult]]) -> str:
    """``--study prior``: one row per method and prior mean (error, ECE, NLL in-distribution and
    averaged over the shifted sets, mutual-information OOD AUROC)."""
    head = ["error", "ECE", "NLL", "shift ECE", "shift NLL", "AUROC MI"]
    lines = ["| method | prior mean | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for prior, results in results_by_prior.items():
        for name, r in results.items():
            cells = [f"{r.test['error']:.4f}", f"{r.test['ece']:.4f}", f"{r.test['nll']:.4f}"]
            cells += _shift_ood_cells(r, ["shift ECE", "shift NLL", "AUROC MI"])
            lines.append(f"| {name} | {prior} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(
    run_dir: Path,
    config: dict,
    results: dict[str, MethodResult],
    test_probs: dict[str, Tensor],
    test_targets: Tensor,
    extra: dict | None = None,
    ood_scores: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> None:
    """``metrics.json`` (the config, ``extra`` sections such as the pretraining record, and every
    method's result), the reliability diagrams, the shift curves and the OOD score histograms
    (``ood_scores``: per method, the mutual-information or entropy scores in and out)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, **(extra or {}), "methods": {name: asdict(r) for name, r in results.items()}}
    (run_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    from bayeskern import plots  # matplotlib, only when diagrams are drawn

    for name, probs in test_probs.items():
        plots.reliability_diagram(probs, test_targets, run_dir / f"reliability_{name}.png", title=name)
    if len(test_probs) > 1:
        plots.compare_reliability(test_probs, test_targets, run_dir / "reliability_all.png")
    shifts = {  # severity 0: the clean test set
        name: {c: {"0": r.test, **by_severity} for c, by_severity in r.shift.items()}
        for name, r in results.items()
        if r.shift
    }
    if shifts:
        plots.shift_curves(shifts, run_dir / "shift.png")
    if ood_scores:
        plots.ood_histograms(ood_scores, run_dir / "ood_scores.png")


def save_method_result(directory: Path, result: MethodResult, probs: dict[str, Tensor]) -> None:
    """Keep a finished method's result so a resumed run does not redo it (plain dicts, floats and
    tensors only: ``load_method_result`` reads it with ``weights_only=True``)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"result": asdict(result), "probs": probs}, directory / "result.pt")


def load_method_result(directory: Path) -> tuple[MethodResult, dict[str, Tensor]] | None:
    path = directory / "result.pt"
    if not path.exists():
        return None
    payload = load_safely(path)  # weights_only: opening a run folder runs no pickled code
    return MethodResult(**payload["result"]), payload["probs"]
