"""Markdown tables of a ``quality.json`` (``benchmarks/quality.py``), one per task; ``report.py``
renders them into benchmarks/README.md."""

from __future__ import annotations

COLUMNS = (
    ("in_domain", "error", "error"),
    ("in_domain", "nll", "NLL"),
    ("in_domain", "ece", "ECE"),
    ("in_domain", "brier", "Brier"),
    ("shift", "error", "shift error"),
    ("shift", "nll", "shift NLL"),
    ("shift", "ece", "shift ECE"),
    ("shift", "brier", "shift Brier"),
    ("ood", "auroc", "OOD AUROC"),
    ("ood", "fpr95", "OOD FPR95"),
)


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _machine(report: dict) -> str:
    m = report["machine"]
    parts = [m.get("cpu") or m.get("processor", "?"), f"{m.get('threads', '?')} threads"]
    if m.get("gpu"):
        parts.append(m["gpu"])
    return ", ".join([*parts, f"torch {m.get('torch', '?')}"])


def tables(report: dict) -> list[str]:
    """Per task: a heading line (model, data, seeds, machine) and one row per method."""
    lines = []
    runs = "quick run, " if report.get("quick") else ""
    for name, task in report["tasks"].items():
        lines += [
            f"**{name}** -- {task['model']}; in-domain: {task['data']['task']}; shift: {task['data']['shift']}; "
            f"OOD: {task['data']['ood']}.  {runs}{report['seeds']} seed(s) (mean ± std), ensemble of "
            f"{report['ensemble_size']}, {report['num_samples']} predictive samples; {_machine(report)}, "
            f"{report['date']}, commit {report.get('commit') or '?'}.",
            "",
            "| row | " + " | ".join(c[2] for c in COLUMNS) + " | OOD score | train s | predict s |",
            "|---" * (len(COLUMNS) + 4) + "|",
        ]
        for row, r in task["rows"].items():
            cells = [_cell(r[group][key], r[group].get(f"{key}_std")) for group, key, _ in COLUMNS]
            score = "MI" if r["ood_score"] == "mutual_information" else "max prob"
            lines.append(
                f"| {row} | "
                + " | ".join(cells)
                + f" | {score} | {r['train_seconds']:.0f} | {r['predict_seconds']:.0f} |"
            )
        lines.append("")
    return lines
