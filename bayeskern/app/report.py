"""What a run reports: per-method calibration before and after temperature scaling, the markdown
comparison table, ``metrics.json`` and the reliability diagrams."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from bayeskern import metrics

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


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def markdown_table(results: dict[str, MethodResult]) -> str:
    head = [*COLUMNS, "ECE (TS)", "NLL (TS)", "T", "train s", "peak MiB"]  # peak MiB: see bayeskern.app.measure
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{r.test[c]:.4f}" for c in COLUMNS]
        cells += [
            f"{r.test_ts['ece']:.4f}",
            f"{r.test_ts['nll']:.4f}",
            f"{r.temperature:.2f}",
            f"{r.train_seconds:.1f}",
            _mib(r.peak_bytes),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(
    run_dir: Path, config: dict, results: dict[str, MethodResult], test_probs: dict[str, Tensor], test_targets: Tensor
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "methods": {name: asdict(r) for name, r in results.items()}}
    (run_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    from bayeskern import plots  # matplotlib, only when diagrams are drawn

    for name, probs in test_probs.items():
        plots.reliability_diagram(probs, test_targets, run_dir / f"reliability_{name}.png", title=name)
    if len(test_probs) > 1:
        plots.compare_reliability(test_probs, test_targets, run_dir / "reliability_all.png")


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
