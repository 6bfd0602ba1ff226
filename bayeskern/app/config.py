"""One run's settings: ``RunConfig``, built once from the parsed command line and never changed.

``RunConfig.from_args`` checks every option (a bad one raises ``UsageError``: one line, exit code 2)
and resolves the defaults that depend on other options: ``--model`` left at its default becomes
``TABULAR_MODEL`` on a tabular dataset, and an ``hf:`` model's weights are the checkpoint's
(``pretrained="hf"``).  A field per option, named as ``argparse`` names it; ``record()`` is what
``config.json`` and ``metrics.json`` keep.  What a run learns later (the source-pretrained weights'
path, the prior mean of each arm of ``--study prior``) gives a new config through
``dataclasses.replace``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError
from .methods import METHODS
from .shift import parse_corruptions, parse_severities
from .text import TextOptions, options_from_args

METHOD_NAMES = tuple(METHODS)
"""The methods a run can name (``--method``)."""
ALL_METHODS = tuple(name for name, method in METHODS.items() if method.in_all)
"""What ``--method all`` (the default) runs, in this order."""
DEFAULT_MODEL = "timm:resnet18"
TABULAR_MODEL = "mlp"
"""The model of a tabular (regression) dataset, and the only one it takes."""
TENSOR_DATASETS = ("digits", "digits10", "diabetes")
"""Datasets held as tensors already: no image transforms."""
STUDIES = ("prior",)
_AT_LEAST_ONE = (
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
)


@dataclass(frozen=True)
class RunConfig:
    """Every ``bayeskern-finetune`` option, checked and resolved (``bayeskern.app.cli`` documents them)."""

    method: str
    dataset: str
    data_dir: Path
    download: bool
    model: str
    pretrained: str | None  # "source", "none", "timm", "torchvision", "hf" or a PATH; None: random init
    pretrain_epochs: int
    prior_mean: str
    study: str | None
    corruptions: str
    severities: str
    image_size: int
    text_column: str
    label_column: str
    max_length: int
    lora_r: int | None
    lora_alpha: float | None
    lora_targets: str | None
    train_per_class: int | None
    epochs: int
    batch_size: int
    lr: float
    lr_schedule: str
    lr_head: float | None
    num_samples: int
    eval_batch_size: int
    prior_std: float
    vi_init_std: float
    vi_rho_scale: float
    vi_temperature: float
    vi_train_samples: int
    dropout_p: float
    dropout_mode: str
    dropout_epochs: int
    dropout_lr: float
    dropout_norm: bool
    sgld_epochs: int
    sgld_lr: float
    sgld_temperature: float
    sgld_burnin: float
    sgld_thin: int
    ivon_epochs: int | None
    ivon_lr: float
    ivon_hess_init: float
    ivon_temperature: float
    ivon_beta2: float
    laplace_prior_precision: float
    laplace_fisher: str
    laplace_params: str | None
    laplace_optimize: str
    laplace_grid_points: int
    device: torch.device
    amp: str
    compile: bool
    workers: int
    seed: int
    out: Path
    name: str | None
    resume: bool
    quiet: bool
    fsdp: bool
    stop_after_epoch: int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """The checked and resolved config of a parsed command line (``args`` is left as it is)."""
        values = dict(vars(args))
        for name in _AT_LEAST_ONE:
            if values[name] < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if values["ivon_epochs"] is not None and values["ivon_epochs"] < 1:
            raise UsageError("--ivon-epochs must be at least 1")
        if not 0.0 <= values["ivon_beta2"] < 1.0:
            raise UsageError("--ivon-beta2 must be in [0, 1)")
        if not 0 <= values["dropout_p"] < 1:
            raise UsageError("--dropout-p must be in [0, 1)")
        if not 0 <= values["sgld_burnin"] < 1:
            raise UsageError("--sgld-burnin must be in [0, 1)")
        if values["study"] not in (None, *STUDIES):
            raise UsageError(f"unknown --study {values['study']!r} (known: {', '.join(STUDIES)})")
        if values["fsdp"] and values["resume"]:
            raise UsageError("--fsdp cannot --resume: sharded runs keep no per-epoch checkpoint of the posterior")
        if values["fsdp"] and values["vi_train_samples"] != 1:
            raise UsageError("--fsdp needs --vi-train-samples 1 (FSDP2 re-gathers the last draw's weights in backward)")
        parse_corruptions(values["corruptions"])
        parse_severities(values["severities"])
        if values["dataset"] == "diabetes" and values["model"] == DEFAULT_MODEL:
            values["model"] = TABULAR_MODEL
        _methods(values["method"])
        values["device"] = _device(values["device"])
        if options_from_args(argparse.Namespace(**values)) is not None:
            values["pretrained"] = "hf"  # the checkpoint's weights: the initial point and the prior mean
        return cls(**values)

    @property
    def methods(self) -> tuple[str, ...]:
        """``--method``: the methods to run, in the order given (``all``: ``ALL_METHODS``)."""
        return _methods(self.method)

    @property
    def text(self) -> TextOptions | None:
        """The text options of an ``hf:`` model on a ``csv:``/``json:`` dataset; None otherwise."""
        return options_from_args(self)

    @property
    def laplace_selection(self) -> str | list[str] | None:
        """``--laplace-params`` as ``DiagLaplace``'s ``params``: ``"last_layer"``, names or globs, or
        None (the backbone's trained parameters)."""
        if not self.laplace_params or self.laplace_params == "last_layer":
            return self.laplace_params or None
        return self.laplace_params.split(",")

    @property
    def corruption_names(self) -> list[str]:
        """``--corruptions``: the shifted test sets' corruptions (none for ``none``)."""
        return parse_corruptions(self.corruptions)

    @property
    def severity_levels(self) -> list[int]:
        """``--severities``: the severities of each corruption."""
        return parse_severities(self.severities)

    @property
    def run_dir(self) -> Path:
        """``--out/--name``; the name defaults to ``<dataset>-<model>`` with other characters as ``-``."""
        name = self.name or re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.dataset}-{self.model}").strip("-")
        return self.out / name

    def record(self) -> dict[str, Any]:
        """The options as JSON values (paths and the device as strings), for ``config.json``."""
        return {f.name: _json_value(getattr(self, f.name)) for f in fields(self)}


def _json_value(value: Any) -> Any:
    return str(value) if isinstance(value, (Path, torch.device)) else value


def _methods(spec: str) -> tuple[str, ...]:
    names = ALL_METHODS if spec == "all" else tuple(m.strip() for m in spec.split(",") if m.strip())
    unknown = [m for m in names if m not in METHOD_NAMES]
    if unknown or not names:
        raise UsageError(f"unknown method {', '.join(unknown) or spec!r} (known: all, {', '.join(METHOD_NAMES)})")
    return names


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return device
