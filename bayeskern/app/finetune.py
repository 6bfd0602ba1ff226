"""One ``bayeskern-finetune`` run: load the data, pretrain or load the backbone, train and evaluate
every method, write the outputs; ``--study prior`` does it once per prior mean.

``run(config, parallel)`` reads a checked ``RunConfig`` (``bayeskern.app.config``) and trains through
the run's ``Parallel`` (``bayeskern.app.parallel``); the command line and the exit codes are
``bayeskern.app.cli``'s.  Under ``torchrun`` every rank trains; rank 0 alone evaluates, prints and
writes files.  Outputs in ``--out/--name``: ``config.json`` (the options, checked on ``--resume``),
``metrics.json``, ``log.jsonl``, the figures of ``report.write_outputs``, per-method checkpoints
and results (``--resume`` continues from them), ``timing.json`` or the timing in ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import is_distributed, is_rank_zero
from ..ops import retain_freed_memory
from .config import TABULAR_MODEL, TENSOR_DATASETS, RunConfig
from .data import DataOptions, load_dataset, targets_of
from .errors import UsageError
from .measure import measure
from .methods import METHODS
from .models import create_backbone
from .parallel import Parallel
from .report import (
    evaluate_method,
    load_method_result,
    markdown_table,
    regression_table,
    save_method_result,
    study_table,
    write_outputs,
)
from .shared import Splits
from .shift import is_image_dataset, shifted_sets
from .training import EpochLoop
from .transfer import cache_path, pretrain

SELECTION = {
    "split": "validation (never test)",
    "per run": "Laplace's prior precision: the validation NLL's minimum on a half-decade grid (--laplace-optimize)",
    "defaults": "the Bayesian methods' options, chosen on the validation split: "
    "benchmarks/results/finetune-settings.md",
}
"""How the settings were chosen, recorded in ``metrics.json``; every method's validation metrics are in ``val``."""

NOT_PART_OF_A_RUN = {"resume", "quiet", "stop_after_epoch", "workers", "out", "name", "data_dir", "download"}
"""Options that may differ when a run is resumed (they change where or how it runs, not what it computes)."""


def _transforms(config: RunConfig) -> tuple:
    """timm's data config of the backbone (ImageNet statistics otherwise) at --image-size."""
    if config.dataset in TENSOR_DATASETS or config.text is not None:
        return None, None
    from timm.data import create_transform, resolve_data_config

    size = (3, config.image_size, config.image_size)
    data_config = resolve_data_config({"input_size": size})
    if config.model.startswith("timm:"):
        import timm

        cfg = timm.get_pretrained_cfg(config.model.split(":", 1)[1])
        if cfg is not None:
            data_config = resolve_data_config({"input_size": size}, pretrained_cfg=cfg.to_dict())
    return create_transform(**data_config, is_training=True), create_transform(**data_config, is_training=False)


def _check_resumable(run_dir: Path, record: dict) -> None:
    """A run is resumed only with the settings it was started with."""
    path = run_dir / "config.json"
    if path.exists():
        started = json.loads(path.read_text())
        changed = [k for k in record if k not in NOT_PART_OF_A_RUN and started.get(k) != record[k]]
        if changed:
            k = changed[0]
            raise UsageError(
                f"--resume: {run_dir} was started with --{k.replace('_', '-')} {started.get(k)}, not {record[k]}"
            )


def _resolve_pretrained(config: RunConfig, splits: Splits, parallel: Parallel) -> tuple[RunConfig, dict]:
    """``config`` with ``--pretrained source``/``none`` turned into a PATH or None (random
    initialisation); the pretraining record."""
    if config.pretrained == "none":
        config = dataclasses.replace(config, pretrained=None)
    if config.pretrained != "source":
        return config, {"source": None, "weights": config.pretrained}
    if splits.source is None:  # no source classes: randomly initialised, as with none
        return dataclasses.replace(config, pretrained=None), {"source": None, "weights": None}
    reused = cache_path(config, splits).exists()
    start = time.perf_counter()
    path = pretrain(config, splits, parallel)  # under torchrun every rank trains (DDP); rank 0 writes
    if is_distributed():
        dist.barrier()  # no rank reads the file before rank 0 has written it
    record = {
        "source": splits.source_name,
        "weights": str(path),
        "reused": reused,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return dataclasses.replace(config, pretrained=str(path)), record


def _run_methods(
    config: RunConfig, methods: list[str], splits: Splits, run_dir: Path, shared: dict, parallel: Parallel
) -> tuple:
    """Train and evaluate ``methods`` into ``run_dir``; results, test probabilities, OOD scores, the
    seconds spent evaluating and the test targets."""

    def make_backbone():
        torch.manual_seed(config.seed)
        return create_backbone(config.model, splits.num_classes, config.pretrained, text=config.text)

    def make_loop(method: str, epochs: int | None = None) -> EpochLoop:
        return EpochLoop(
            run_dir / method,
            epochs or config.epochs,
            config.batch_size,
            config.seed,
            config.device,
            config.amp,
            config.workers,
            config.resume,
            config.quiet,
            config.stop_after_epoch,
            splits.collate,
        )

    images = is_image_dataset(splits.test)
    corruptions = config.corruption_names if images else []
    shifted = shifted_sets(splits.test, corruptions, config.severity_levels) if corruptions else {}
    val_targets, test_targets = targets_of(splits.val), targets_of(splits.test)
    results, test_probs, ood_scores, eval_seconds = {}, {}, {}, 0.0
    for method_name in methods:
        saved = load_method_result(run_dir / method_name) if config.resume else None
        if saved is not None:
            results[method_name], probs = saved
            test_probs[method_name] = probs["test"]
            if "ood_in" in probs:
                ood_scores[method_name] = (probs["ood_in"], probs["ood_out"])
            shared.update(probs.get("shared", {}))
            continue
        method = METHODS[method_name](config, splits, make_backbone, make_loop, shared, parallel)
        with measure(config.device) as usage:
            method.train()
        if not is_rank_zero():
            continue
        start = time.perf_counter()
        results[method_name], test_probs[method_name], scores = evaluate_method(
            method, splits, shifted, usage, val_targets, test_targets
        )
        eval_seconds += time.perf_counter() - start
        kept: dict[str, Any] = {"test": test_probs[method_name], "shared": dict(shared)}
        if scores is not None:
            ood_scores[method_name] = scores
            kept.update(ood_in=scores[0], ood_out=scores[1])
        save_method_result(run_dir / method_name, results[method_name], kept)
    return results, test_probs, ood_scores, eval_seconds, test_targets


def run(config: RunConfig, parallel: Parallel) -> int:
    """The whole run (or study) of ``config``; the exit code."""
    wall, cpu = time.perf_counter(), time.process_time()
    if config.device.type == "cpu":
        retain_freed_memory()  # a Bayesian step's freed weight gradients would be trimmed and faulted in again
    train_tf, eval_tf = _transforms(config)
    splits = load_dataset(
        config.dataset,
        DataOptions(
            config.data_dir,
            config.download,
            config.image_size,
            config.seed,
            config.train_per_class,
            train_tf,
            eval_tf,
            config.text,
        ),
    )
    if splits.likelihood == "regression" and config.model != TABULAR_MODEL:
        raise UsageError(f"--dataset {config.dataset} is tabular: use --model {TABULAR_MODEL} (the default)")
    run_dir = config.run_dir
    record = config.record()
    if splits.class_names is not None:
        record["class_names"] = splits.class_names  # class id -> label of a text dataset
    if config.resume:
        _check_resumable(run_dir, record)
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(record, indent=2))
    config, pretraining = _resolve_pretrained(config, splits, parallel)

    priors = ("pretrained", "zero") if config.study == "prior" else (config.prior_mean,)
    shared: dict = {}
    by_prior, eval_seconds = {}, 0.0
    for prior in priors:
        directory = run_dir / f"prior-{prior}" if config.study else run_dir
        # the plain fit has no prior: the study runs it once, under the first prior mean
        chosen = [m for m in config.methods if not (config.study and prior != priors[0] and m == "vanilla")]
        results, test_probs, ood_scores, seconds, test_targets = _run_methods(
            dataclasses.replace(config, prior_mean=prior), chosen, splits, directory, shared, parallel
        )
        by_prior[prior], eval_seconds = results, eval_seconds + seconds
        if is_rank_zero():
            extra: dict[str, Any] = {"pretraining": pretraining, "selection": SELECTION}
            if splits.likelihood == "regression":
                extra["noise_std"] = {
                    "value": shared.get("noise_std"),
                    "fitted": "RMSE of the plain fit on the validation split, standardised target units",
                }
                test_probs = {}  # no reliability diagrams
            write_outputs(directory, record, results, test_probs, test_targets, extra, ood_scores)
    if not is_rank_zero():
        return 0
    timing = {
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "pretrain_seconds": pretraining.get("seconds", 0.0),
        "train_seconds": round(sum(r.train_seconds for rs in by_prior.values() for r in rs.values()), 1),
        "evaluate_seconds": round(eval_seconds, 1),
    }
    if config.study:
        table = study_table(by_prior)
        (run_dir / "study_prior.md").write_text(table + "\n")
        (run_dir / "timing.json").write_text(json.dumps(timing, indent=2))
        print(table)
        print(f"\nwrote {run_dir}/study_prior.md and one run folder per prior mean")
    else:
        metrics_path = run_dir / "metrics.json"
        payload = json.loads(metrics_path.read_text())
        payload["timing"] = timing
        metrics_path.write_text(json.dumps(payload, indent=2))
        regression = splits.likelihood == "regression"
        print((regression_table if regression else markdown_table)(by_prior[config.prior_mean]))
        print(f"\nwrote {run_dir}/metrics.json, reliability diagrams, shift curves and OOD histograms")
    print(
        f"time: wall {timing['wall_seconds']} s, process CPU {timing['cpu_seconds']} s "
        f"(pretraining {timing['pretrain_seconds']} s, training {timing['train_seconds']} s, "
        f"evaluation {timing['evaluate_seconds']} s)"
    )
    return 0
