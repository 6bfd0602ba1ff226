"""``bayeskern-finetune``: Bayesian fine-tuning of a backbone, one row per method.

With no arguments it is a transfer on scikit-learn's digits (offline): timm's resnet18 is pretrained
on digits 0-4 (``bayeskern.app.transfer``; cached under ``runs/pretrained/`` and reused) and every
method fine-tunes it few-shot on digits 5-9 with the pretrained weights as initial point and prior
mean (``--prior-mean zero`` for a zero mean; ``--study prior`` runs both).  It prints a markdown table
(error, ECE, MCE, NLL, Brier on the test split, ECE/NLL after temperature scaling fitted on the
validation split, error/ECE/NLL averaged over the shifted test sets of ``bayeskern.app.shift``, the
OOD AUROC of ``bayeskern.app.ood`` on digits 0-4, train time, peak memory) and writes ``runs/<name>/``:
``metrics.json``, ``log.jsonl`` (one JSON line per epoch), reliability diagrams, shift curves, OOD
score histograms, and per-method checkpoints for ``--resume``.  ``--dataset diabetes`` is a
regression (``bayeskern.app.regression``).  On a CPU it keeps freed memory in the process
(``bayeskern.ops.retain_freed_memory``).

Data parallel: ``torchrun --nproc_per_node=K -m bayeskern.app.finetune ...`` (NCCL on CUDA, one GPU per
rank by ``LOCAL_RANK``; gloo on CPU) trains every method on K ranks; rank 0 evaluates, prints and
writes every file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset

from ..distributed import is_distributed, is_rank_zero
from ..ops import retain_freed_memory
from .data import DATASETS, DataOptions, load_dataset, targets_of
from .errors import UsageError
from .measure import measure
from .methods import METHODS
from .models import create_backbone
from .ood import ood_metrics
from .ood import scores as ood_scores
from .regression import regression_report
from .report import (
    MethodResult,
    evaluate,
    load_method_result,
    markdown_table,
    regression_table,
    save_method_result,
    shift_report,
    study_table,
    write_outputs,
)
from .shift import is_image_dataset, parse_corruptions, parse_severities, shifted_sets
from .text import is_text_dataset, options_from_args
from .training import AMP_DTYPES, EpochLoop, Interrupted


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bayeskern-finetune", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--method", default="all", help=f"all, or a comma-separated list of: {', '.join(METHODS)}")
    add("--dataset", default="digits", help=f"{', '.join(DATASETS)}, imagefolder:PATH, csv:PATH or json:PATH (text)")
    add("--data-dir", type=Path, default=Path("data"), help="where torchvision datasets live")
    add("--download", action="store_true", help="download a missing torchvision dataset")
    add("--model", default="timm:resnet18", help="timm:NAME, torchvision:NAME, convnet or mlp (built in), hf:ID|DIR")
    add(
        "--pretrained",
        default="source",
        help="source (pretrain on the dataset's source classes, cached under --out/pretrained; "
        "digits: 0-4), none, timm, torchvision, or PATH to a state dict / .safetensors",
    )
    add("--pretrain-epochs", type=int, default=8, help="epochs of --pretrained source pretraining")
    add(
        "--prior-mean",
        choices=("pretrained", "zero"),
        default="pretrained",
        help="prior mean of every Bayesian method: the pretrained weights or zero",
    )
    add("--study", default=None, help="prior: run every method under both prior means and write one table")
    add("--corruptions", default="rotate,noise,blur", help="shifted test sets: comma-separated, or none")
    add("--severities", default="1,3,5", help="severities of each corruption, in 1..5")
    add("--image-size", type=int, default=16, help="input resolution (digits: upsampled to it)")
    add("--text-column", default="text", help="csv:/json: datasets: the column holding the text")
    add("--label-column", default="label", help="csv:/json: datasets: the column holding the label")
    add("--max-length", type=int, default=128, help="hf: models: texts truncated to this many tokens")
    add("--lora-r", type=int, default=None, help="hf: models: train LoRA adapters of this rank (and the head) only")
    add("--lora-alpha", type=float, default=None, help="LoRA scaling numerator (default: 2 * --lora-r)")
    add("--lora-targets", default=None, help="comma-separated modules given adapters (default: peft's for the model)")
    add(
        "--train-per-class",
        type=int,
        default=None,
        help="training examples kept per class (default: 10 for digits, all otherwise; 0 = all)",
    )
    add("--epochs", type=int, default=20)
    add("--batch-size", type=int, default=32)
    add("--lr", type=float, default=3e-3, help="learning rate of vanilla/VI (Adam)")
    add(
        "--lr-schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="Adam's learning rate: decayed to zero by a cosine over each method's steps, or constant",
    )
    add("--lr-head", type=float, default=None, help="learning rate of the classifier head (default: --lr)")
    add("--num-samples", type=int, default=16, help="Monte-Carlo samples of the predictive")
    add("--eval-batch-size", type=int, default=512, help="batch size of the predictive (evaluation)")
    add(
        "--prior-std",
        type=float,
        default=1.0,
        help="prior standard deviation sp (VI, MC-dropout, SGLD); Laplace searches precisions from 1/sp^2 up",
    )
    add("--vi-init-std", type=float, default=1e-2, help="initial posterior std of VI")
    add("--vi-temperature", type=float, default=1.0, help="1 is the ELBO; below 1 a cold posterior")
    add("--vi-train-samples", type=int, default=1, help="weight samples per VI training step")
    add("--dropout-p", type=float, default=0.01, help="MC-dropout's drop probability of each weight")
    add("--dropout-mode", choices=("scale", "prior"), default="scale")
    add("--dropout-epochs", type=int, default=10, help="epochs of MC-dropout training, started from the MAP")
    add("--dropout-lr", type=float, default=3e-4, help="learning rate of MC-dropout (Adam)")
    add(
        "--dropout-norm",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="drop normalisation-layer scales and shifts too (default: they stay point estimates)",
    )
    add("--sgld-epochs", type=int, default=40, help="epochs of sampling, started from the MAP")
    add("--sgld-lr", type=float, default=0.002)
    add("--sgld-temperature", type=float, default=0.03, help="1 samples the posterior; below 1 a cold one")
    add("--sgld-burnin", type=float, default=0.5, help="fraction of the training steps discarded as burn-in")
    add("--sgld-thin", type=int, default=5)
    add("--laplace-prior-precision", type=float, default=1.0)
    add("--laplace-fisher", choices=("empirical", "mc"), default="empirical")
    add("--laplace-params", default=None, help='"last_layer" or a comma-separated list of names/globs (default all)')
    add("--laplace-optimize", choices=("marglik", "val_nll", "none"), default="val_nll")
    add(
        "--laplace-grid-points",
        type=int,
        default=17,
        help="val_nll: prior precisions tried, log-spaced from 1/sp^2 to 1e8/sp^2 (17: half-decade steps)",
    )
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--amp", choices=tuple(AMP_DTYPES), default="none")
    add("--compile", action="store_true", help="run the Monte-Carlo predictive under torch.compile")
    add("--workers", type=int, default=0)
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=Path("runs"))
    add("--name", default=None, help="run name (default: <dataset>-<model>)")
    add("--resume", action="store_true", help="continue the run in --out/--name from its checkpoints")
    add("--quiet", action="store_true", help="no progress bars or per-epoch log lines")
    add(
        "--fsdp",
        action="store_true",
        help="under torchrun: train every method sharded with FSDP2 instead of DDP; rank 0 evaluates",
    )
    add("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)  # simulates an interruption
    return p


def _methods(spec: str) -> list[str]:
    names = list(METHODS) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UsageError(f"unknown method {', '.join(unknown) or spec!r} (known: all, {', '.join(METHODS)})")
    return names


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return device


def _transforms(args: argparse.Namespace) -> tuple:
    """timm's data config of the backbone (ImageNet statistics otherwise) at --image-size."""
    if args.dataset in TENSOR_DATASETS or is_text_dataset(args.dataset):
        return None, None
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, args.image_size, args.image_size)})
    if args.model.startswith("timm:"):
        import timm

        cfg = timm.get_pretrained_cfg(args.model.split(":", 1)[1])
        if cfg is not None:
            config = resolve_data_config(
                {"input_size": (3, args.image_size, args.image_size)}, pretrained_cfg=cfg.to_dict()
            )
    return create_transform(**config, is_training=True), create_transform(**config, is_training=False)


TENSOR_DATASETS = ("digits", "digits10", "diabetes")  # tensors already: no image transforms
TABULAR_MODEL = "mlp"  # the model of a regression dataset when --model is left at its default


def _validate(args: argparse.Namespace) -> None:
    for name in (
        "epochs",
        "pretrain_epochs",
        "batch_size",
        "eval_batch_size",
        "num_samples",
        "image_size",
        "vi_train_samples",
        "dropout_epochs",
        "sgld_epochs",
        "sgld_thin",
        "laplace_grid_points",
    ):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.dropout_p < 1:
        raise UsageError("--dropout-p must be in [0, 1)")
    if not 0 <= args.sgld_burnin < 1:
        raise UsageError("--sgld-burnin must be in [0, 1)")
    if args.study not in (None, *STUDIES):
        raise UsageError(f"unknown --study {args.study!r} (known: {', '.join(STUDIES)})")
    if args.fsdp and args.resume:
        raise UsageError("--fsdp cannot --resume: sharded runs keep no per-epoch checkpoint of the posterior")
    if args.fsdp and args.vi_train_samples != 1:
        raise UsageError("--fsdp needs --vi-train-samples 1 (FSDP2 re-gathers the last draw's weights in backward)")
    parse_corruptions(args.corruptions)
    parse_severities(args.severities)


STUDIES = ("prior",)


_NOT_PART_OF_A_RUN = {"resume", "quiet", "stop_after_epoch", "workers", "out", "name", "data_dir", "download"}


def _check_resumable(run_dir: Path, config: dict) -> None:
    """A run is resumed only with the settings it was started with."""
    path = run_dir / "config.json"
    if path.exists():
        started = json.loads(path.read_text())
        changed = [k for k in config if k not in _NOT_PART_OF_A_RUN and started.get(k) != config[k]]
        if changed:
            k = changed[0]
            raise UsageError(
                f"--resume: {run_dir} was started with --{k.replace('_', '-')} {started.get(k)}, not {config[k]}"
            )


def _resolve_pretrained(args: argparse.Namespace, splits, device: torch.device) -> dict:
    """Turn ``--pretrained source``/``none`` into a PATH or None; the pretraining record."""
    if args.pretrained == "none":
        args.pretrained = None
    if args.pretrained != "source":
        return {"source": None, "weights": args.pretrained}
    if splits.source is None:  # no source classes: randomly initialised, as with none
        args.pretrained = None
        return {"source": None, "weights": None}
    from .transfer import cache_path, pretrain

    reused = cache_path(args, splits).exists()
    start = time.perf_counter()
    path = pretrain(args, splits, device)  # under torchrun every rank trains (DDP); rank 0 writes
    if is_distributed():
        dist.barrier()  # no rank reads the file before rank 0 has written it
    args.pretrained = str(path)
    return {
        "source": splits.source_name,
        "weights": str(path),
        "reused": reused,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _evaluate_method(method, splits, shifted: dict, usage, val_targets, test_targets):
    """Validation/test calibration, the shifted test sets and OOD detection of one trained method;
    also the test probabilities and the (in, out) predictive entropies for the histograms.  Every
    set goes through one predictive call (a posterior's weight samples are drawn once for all)."""
    if splits.likelihood == "regression":
        return _evaluate_regression(method, splits, usage, val_targets, test_targets)
    sets = {"val": splits.val, "test": splits.test, **shifted}
    if splits.ood is not None:
        sets["ood"] = splits.ood
    probs, mutual_information = method.predictive(ConcatDataset(list(sets.values())))
    bounds = [0, *itertools.accumulate(len(d) for d in sets.values())]
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


def _evaluate_regression(method, splits, usage, val_targets, test_targets):
    """RMSE, Gaussian NLL and 90% coverage on validation and test (``bayeskern.app.regression``)."""
    mean, variance = method.predictive(ConcatDataset([splits.val, splits.test]))
    if not (torch.isfinite(mean).all() and torch.isfinite(variance).all()):
        raise UsageError(f"{method.name}: the predictive is not finite (the run diverged); lower its learning rate")
    n, scale = len(splits.val), splits.target_scale
    result = MethodResult(
        test=regression_report(mean[n:], variance[n:], test_targets, scale),
        test_ts={},
        temperature=1.0,
        train_seconds=usage.seconds,
        peak_bytes=usage.peak_bytes,
        val=regression_report(mean[:n], variance[:n], val_targets, scale),
    )
    return result, mean[n:], None


def _run_methods(args, methods, splits, run_dir: Path, device: torch.device, shared: dict) -> tuple:
    """Train and evaluate ``methods`` into ``run_dir``; results, test probabilities, OOD scores and
    the seconds spent evaluating."""

    def make_backbone():
        torch.manual_seed(args.seed)
        return create_backbone(args.model, splits.num_classes, args.pretrained, text=options_from_args(args))

    def make_loop(method: str, epochs: int | None = None) -> EpochLoop:
        return EpochLoop(
            run_dir / method,
            epochs or args.epochs,
            args.batch_size,
            args.seed,
            device,
            args.amp,
            args.workers,
            args.resume,
            args.quiet,
            args.stop_after_epoch,
            splits.collate,
        )

    images = is_image_dataset(splits.test)
    corruptions = parse_corruptions(args.corruptions) if images else []
    shifted = shifted_sets(splits.test, corruptions, parse_severities(args.severities)) if corruptions else {}
    val_targets, test_targets = targets_of(splits.val), targets_of(splits.test)
    results, test_probs, ood_scores, eval_seconds = {}, {}, {}, 0.0
    for method_name in methods:
        saved = load_method_result(run_dir / method_name) if args.resume else None
        if saved is not None:
            results[method_name], probs = saved
            test_probs[method_name] = probs["test"]
            if "ood_in" in probs:
                ood_scores[method_name] = (probs["ood_in"], probs["ood_out"])
            shared.update(probs.get("shared", {}))
            continue
        method = METHODS[method_name](args, splits, make_backbone, make_loop, device, shared)
        with measure(device) as usage:
            method.train()
        if not is_rank_zero():
            continue
        start = time.perf_counter()
        results[method_name], test_probs[method_name], scores = _evaluate_method(
            method, splits, shifted, usage, val_targets, test_targets
        )
        eval_seconds += time.perf_counter() - start
        kept = {"test": test_probs[method_name], "shared": dict(shared)}
        if scores is not None:
            ood_scores[method_name] = scores
            kept.update(ood_in=scores[0], ood_out=scores[1])
        save_method_result(run_dir / method_name, results[method_name], kept)
    return results, test_probs, ood_scores, eval_seconds, test_targets


def run(args: argparse.Namespace) -> int:
    wall, cpu = time.perf_counter(), time.process_time()
    _validate(args)
    if args.dataset == "diabetes" and args.model == build_parser().get_default("model"):
        args.model = TABULAR_MODEL
    methods = _methods(args.method)
    device = _device(args.device)
    if device.type == "cpu":
        retain_freed_memory()  # a Bayesian step's freed weight gradients would be trimmed and faulted in again
    text = options_from_args(args)
    if text is not None:
        args.pretrained = "hf"  # the checkpoint's weights: the initial point and the prior mean
    train_tf, eval_tf = _transforms(args)
    splits = load_dataset(
        args.dataset,
        DataOptions(
            args.data_dir, args.download, args.image_size, args.seed, args.train_per_class, train_tf, eval_tf, text
        ),
    )
    if splits.likelihood == "regression" and args.model != TABULAR_MODEL:
        raise UsageError(f"--dataset {args.dataset} is tabular: use --model {TABULAR_MODEL} (the default)")
    name = args.name or re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{args.dataset}-{args.model}").strip("-")
    run_dir = args.out / name
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if splits.class_names is not None:
        config["class_names"] = splits.class_names  # class id -> label of a text dataset
    if args.resume:
        _check_resumable(run_dir, config)
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    if args.laplace_params and args.laplace_params != "last_layer":
        args.laplace_params = args.laplace_params.split(",")
    pretraining = _resolve_pretrained(args, splits, device)

    priors = ("pretrained", "zero") if args.study == "prior" else (args.prior_mean,)
    shared: dict = {}
    by_prior, eval_seconds = {}, 0.0
    for prior in priors:
        args.prior_mean = prior
        directory = run_dir / f"prior-{prior}" if args.study else run_dir
        # the plain fit has no prior: the study runs it once, under the first prior mean
        chosen = [m for m in methods if not (args.study and prior != priors[0] and m == "vanilla")]
        results, test_probs, ood_scores, seconds, test_targets = _run_methods(
            args, chosen, splits, directory, device, shared
        )
        by_prior[prior], eval_seconds = results, eval_seconds + seconds
        if is_rank_zero():
            extra = {"pretraining": pretraining, "selection": SELECTION}
            if splits.likelihood == "regression":
                extra["noise_std"] = {
                    "value": shared.get("noise_std"),
                    "fitted": "RMSE of the plain fit on the validation split, standardised target units",
                }
                test_probs = {}  # no reliability diagrams
            write_outputs(directory, config, results, test_probs, test_targets, extra, ood_scores)
    if not is_rank_zero():
        return 0
    timing = {
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "pretrain_seconds": pretraining.get("seconds", 0.0),
        "train_seconds": round(sum(r.train_seconds for rs in by_prior.values() for r in rs.values()), 1),
        "evaluate_seconds": round(eval_seconds, 1),
    }
    if args.study:
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
        print((regression_table if regression else markdown_table)(by_prior[args.prior_mean]))
        print(f"\nwrote {run_dir}/metrics.json, reliability diagrams, shift curves and OOD histograms")
    print(
        f"time: wall {timing['wall_seconds']} s, process CPU {timing['cpu_seconds']} s "
        f"(pretraining {timing['pretrain_seconds']} s, training {timing['train_seconds']} s, "
        f"evaluation {timing['evaluate_seconds']} s)"
    )
    return 0


SELECTION = {
    "split": "validation (never test)",
    "per run": "Laplace's prior precision: the validation NLL's minimum on a half-decade grid (--laplace-optimize)",
    "defaults": "the Bayesian methods' options were chosen on the validation split of the earlier randomly "
    "initialised digits default, then re-checked on the transfer's validation NLL (seed 0, one option at a "
    "time: VI prior std 0.03/0.1/1, temperature 0.1/1 and init std 1e-3/1e-2/3e-2, dropout p "
    "0.003/0.01/0.05/0.1, SGLD temperature 0.03/0.3/1 and lr 5e-4/2e-3, Laplace Fisher empirical/mc and "
    "all/last-layer parameters); only VI's init std changed (1e-3 -> 1e-2: -0.043 and -0.039 validation NLL on "
    "seeds 0 and 1, 1.9 and 1.4 paired standard errors); the transfer's fine-tuning and pretraining epochs "
    "were set for the time budget and were not searched",
}
"""How the settings were chosen (recorded in metrics.json); every method's validation metrics are in ``val``."""


def _init_distributed(device: str) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); True if this call did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


APP_DEPENDENCIES = {
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "torchvision": "torchvision",
    "timm": "timm",
}
"""Import name -> package of the ``bayeskern[app]`` extra (``import bayeskern`` needs none of them)."""

HF_DEPENDENCIES = {"transformers": "transformers", "peft": "peft", "tokenizers": "tokenizers"}
"""Import name -> package of the ``bayeskern[hf]`` extra, needed by ``--model hf:...`` only."""


def _missing_app_dependency(error: ImportError | None = None) -> tuple[str, str] | None:
    """The package and extra (``app`` or ``hf``) that ``error`` finds missing or, without an error,
    the first ``bayeskern[app]`` package a look-up (importing nothing) does not find; None if none."""
    if error is not None:
        name = (error.name or getattr(error.__cause__, "name", None) or "").partition(".")[0]
        for extra, packages in (("app", APP_DEPENDENCIES), ("hf", HF_DEPENDENCIES)):
            if name in packages:
                return packages[name], extra
        return None
    from importlib.util import find_spec

    return next(((package, "app") for module, package in APP_DEPENDENCIES.items() if find_spec(module) is None), None)


def _report_missing(missing: tuple[str, str]) -> int:
    package, extra = missing
    print(
        f"bayeskern-finetune: error: {package} is not installed; this needs the extra dependencies: "
        f"pip install 'bayeskern[{extra}]'",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = _missing_app_dependency()
    if missing is not None:
        return _report_missing(missing)
    joined = _init_distributed(args.device)
    try:
        code = run(args)
        if joined:
            dist.barrier()  # no rank tears the group down while a peer is still in a collective
        return code
    except ImportError as error:
        missing = _missing_app_dependency(error)
        if missing is None:
            raise
        return _report_missing(missing)
    except UsageError as error:
        print(f"bayeskern-finetune: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"bayeskern-finetune: {stop}; continue with --resume", file=sys.stderr)
        return 3
    finally:
        if joined:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
