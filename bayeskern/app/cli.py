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

Data parallel: ``torchrun --nproc_per_node=K -m bayeskern.finetune ...`` (NCCL on CUDA, one GPU per
rank by ``LOCAL_RANK``; gloo on CPU) trains every method on K ranks (``--fsdp``: sharded); rank 0
evaluates, prints and writes every file.

This module is the command line: the parser, the start-up check of the ``[app]`` extra and the exit
codes (0; 2 for bad input or a missing extra, as one line on stderr; 3 for a run stopped early).  The
run itself is ``bayeskern.app.finetune.run``.
"""

from __future__ import annotations

import argparse
import sys
from importlib.util import find_spec
from pathlib import Path

import torch

from .config import ALL_METHODS, DEFAULT_MODEL, METHOD_NAMES, RunConfig
from .data import DATASETS
from .errors import UsageError
from .finetune import run
from .parallel import Parallel
from .training import AMP_DTYPES, Interrupted


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bayeskern-finetune", description=__doc__.splitlines()[0])
    add = p.add_argument
    add(
        "--method",
        default="all",
        help=f"all ({', '.join(ALL_METHODS)}), or a comma-separated list of: {', '.join(METHOD_NAMES)}",
    )
    add("--dataset", default="digits", help=f"{', '.join(DATASETS)}, imagefolder:PATH, csv:PATH or json:PATH (text)")
    add("--data-dir", type=Path, default=Path("data"), help="where torchvision datasets live")
    add("--download", action="store_true", help="download a missing torchvision dataset")
    add("--model", default=DEFAULT_MODEL, help="timm:NAME, torchvision:NAME, convnet or mlp (built in), hf:ID|DIR")
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
    add("--vi-rho-scale", type=float, default=30.0, help="VI's std is softplus(scale * rho): how fast Adam moves it")
    add("--vi-temperature", type=float, default=1e-4, help="1 is the ELBO; below 1 a cold posterior")
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
    add("--ivon-epochs", type=int, default=None, help="epochs of IVON training (default: --epochs)")
    add("--ivon-lr", type=float, default=0.1, help="IVON's learning rate (scaled by hess_init + delta, as ivon-opt)")
    add("--ivon-hess-init", type=float, default=1.0, help="IVON's initial Hessian estimate h0")
    add("--ivon-temperature", type=float, default=1.0, help="1: ess = N; below 1 a cold posterior")
    add("--ivon-beta2", type=float, default=0.99999, help="IVON's Hessian averaging factor, in [0, 1)")
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
    """``bayeskern-finetune``: parse ``argv``, check the ``[app]`` extra, build the ``RunConfig``, join
    ``torchrun``'s process group if there is one and run; the exit code."""
    args = build_parser().parse_args(argv)
    missing = _missing_app_dependency()
    if missing is not None:
        return _report_missing(missing)
    try:
        config = RunConfig.from_args(args)
        with Parallel.launched(config.device, config.fsdp) as parallel:
            return run(config, parallel)
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


if __name__ == "__main__":
    sys.exit(main())
