"""``bayeskern-finetune``: Bayesian fine-tuning of a backbone, one row per method.

With no arguments it compares every method on scikit-learn's digits (offline) with timm's resnet18
(randomly initialised: nothing is downloaded),
prints a markdown table (error, ECE, MCE, NLL, Brier on the test split, ECE/NLL after temperature
scaling fitted on the validation split, train time, peak memory) and writes ``runs/<name>/``:
``metrics.json``, ``log.jsonl`` (one JSON line per epoch), a reliability diagram per method, a
side-by-side diagram, and per-method checkpoints for ``--resume``.  On a CPU it keeps freed memory
in the process (``bayeskern.ops.retain_freed_memory``).

Data parallel: ``torchrun --nproc_per_node=K -m bayeskern.app.finetune ...`` (NCCL on CUDA, one GPU per
rank by ``LOCAL_RANK``; gloo on CPU) trains every method on K ranks; rank 0 evaluates, prints and
writes every file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed import is_rank_zero
from ..ops import retain_freed_memory
from .data import DATASETS, DataOptions, load_dataset, targets_of
from .errors import UsageError
from .measure import measure
from .methods import METHODS
from .models import create_backbone
from .report import evaluate, load_method_result, markdown_table, save_method_result, write_outputs
from .training import AMP_DTYPES, EpochLoop, Interrupted


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bayeskern-finetune", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--method", default="all", help=f"all, or a comma-separated list of: {', '.join(METHODS)}")
    add("--dataset", default="digits", help=f"{', '.join(DATASETS)} or imagefolder:PATH")
    add("--data-dir", type=Path, default=Path("data"), help="where torchvision datasets live")
    add("--download", action="store_true", help="download a missing torchvision dataset")
    add("--model", default="timm:resnet18", help="timm:NAME, torchvision:NAME or convnet (built-in)")
    add("--pretrained", default=None, help="timm, torchvision, or PATH to a state dict / .safetensors")
    add("--image-size", type=int, default=16, help="input resolution (digits: upsampled to it)")
    add(
        "--train-per-class",
        type=int,
        default=None,
        help="training examples kept per class (default: 10 for digits, all otherwise; 0 = all)",
    )
    add("--epochs", type=int, default=60)
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
    add(
        "--prior-std",
        type=float,
        default=1.0,
        help="prior standard deviation sp (VI, MC-dropout, SGLD); Laplace searches precisions from 1/sp^2 up",
    )
    add("--vi-init-std", type=float, default=1e-3)
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
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--amp", choices=tuple(AMP_DTYPES), default="none")
    add("--compile", action="store_true", help="run the Monte-Carlo predictive under torch.compile")
    add("--workers", type=int, default=0)
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=Path("runs"))
    add("--name", default=None, help="run name (default: <dataset>-<model>)")
    add("--resume", action="store_true", help="continue the run in --out/--name from its checkpoints")
    add("--quiet", action="store_true", help="no progress bars or per-epoch log lines")
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
    if args.dataset == "digits":
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


def _validate(args: argparse.Namespace) -> None:
    for name in (
        "epochs",
        "batch_size",
        "num_samples",
        "image_size",
        "vi_train_samples",
        "dropout_epochs",
        "sgld_epochs",
        "sgld_thin",
    ):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.dropout_p < 1:
        raise UsageError("--dropout-p must be in [0, 1)")
    if not 0 <= args.sgld_burnin < 1:
        raise UsageError("--sgld-burnin must be in [0, 1)")


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


def run(args: argparse.Namespace) -> int:
    _validate(args)
    methods = _methods(args.method)
    device = _device(args.device)
    if device.type == "cpu":
        retain_freed_memory()  # a Bayesian step's freed weight gradients would be trimmed and faulted in again
    train_tf, eval_tf = _transforms(args)
    splits = load_dataset(
        args.dataset,
        DataOptions(args.data_dir, args.download, args.image_size, args.seed, args.train_per_class, train_tf, eval_tf),
    )
    name = args.name or re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{args.dataset}-{args.model}").strip("-")
    run_dir = args.out / name
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.resume:
        _check_resumable(run_dir, config)
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    if args.laplace_params and args.laplace_params != "last_layer":
        args.laplace_params = args.laplace_params.split(",")

    def make_backbone():
        torch.manual_seed(args.seed)
        return create_backbone(args.model, splits.num_classes, args.pretrained)

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
        )

    val_targets, test_targets = targets_of(splits.val), targets_of(splits.test)
    results, test_probs, shared = {}, {}, {}
    for method_name in methods:
        saved = load_method_result(run_dir / method_name) if args.resume else None
        if saved is not None:
            results[method_name], probs = saved
            test_probs[method_name] = probs["test"]
            shared.update(probs.get("shared", {}))
            continue
        method = METHODS[method_name](args, splits, make_backbone, make_loop, device, shared)
        with measure(device) as usage:
            method.train()
        if not is_rank_zero():
            continue
        val, test = method.predict(splits.val), method.predict(splits.test)
        if not (torch.isfinite(val).all() and torch.isfinite(test).all()):
            raise UsageError(
                f"{method_name}: the predictive probabilities are not finite (the run diverged); "
                "lower its learning rate"
            )
        results[method_name] = evaluate(val, val_targets, test, test_targets, usage.seconds, usage.peak_bytes)
        test_probs[method_name] = test
        save_method_result(run_dir / method_name, results[method_name], {"test": test, "shared": dict(shared)})
    if not is_rank_zero():
        return 0
    write_outputs(run_dir, config, results, test_probs, test_targets)
    print(markdown_table(results))
    print(f"\nwrote {run_dir}/metrics.json and reliability diagrams")
    return 0


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


def _missing_app_dependency(error: ImportError | None = None) -> str | None:
    """The ``bayeskern[app]`` package that ``error`` (or, without one, a look-up that imports
    nothing) finds missing; None if there is none."""
    if error is not None:
        name = error.name or getattr(error.__cause__, "name", None) or ""
        return APP_DEPENDENCIES.get(name.partition(".")[0])
    from importlib.util import find_spec

    return next((package for module, package in APP_DEPENDENCIES.items() if find_spec(module) is None), None)


def _report_missing(package: str) -> int:
    print(
        f"bayeskern-finetune: error: {package} is not installed; the application needs its extra "
        "dependencies: pip install 'bayeskern[app]'",
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
