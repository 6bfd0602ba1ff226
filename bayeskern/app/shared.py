"""What the application's data, model and text modules share (a leaf: it imports none of them):
the ``Splits`` and ``Backbone`` records, seeded index splits and the classifier head's names."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import UsageError


@dataclass
class Splits:
    """A task's datasets and what the methods need to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    ood: Dataset | None = None  # inputs of classes the task does not have (OOD evaluation)
    source: Dataset | None = None  # labelled data of other classes to pretrain a backbone on
    source_name: str = ""  # names the source in the pretraining cache
    likelihood: str = "classification"  # or "regression" (tabular: bayeskern.app.regression)
    target_scale: float = 1.0  # regression: the targets' std, to report errors in their units
    class_names: list[str] | None = None  # class id -> label in the data (text datasets)
    collate: Callable | None = None  # builds a batch from examples (None: torch's default_collate)


def seeded_split(n: int, fractions: tuple[float, ...], seed: int) -> list[list[int]]:
    """``range(n)`` permuted by ``seed`` and cut into parts of ``fractions`` (the last takes the rest)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = [round(f * n) for f in fractions[:-1]]
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    bounds.append(n)
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass
class Backbone:
    """A model built for a task and the names the methods treat specially."""

    model: nn.Module
    classifier: list[str]  # parameter names of the classifier head
    new_params: list[str] = field(default_factory=list)  # freshly initialised: prior mean zero
    params: list[str] | None = None  # the trained (and Bayesian) parameters; None: all (LoRA: adapters and head)


def classifier_prefix(model: nn.Module) -> str:
    """timm names its head in pretrained_cfg; otherwise the last nn.Linear in registration order."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("classifier"):
        return cfg["classifier"]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UsageError(f"{type(model).__name__} has no nn.Linear classifier to fit to the task's classes")
    return linears[-1]


def under(prefix: str, name: str) -> bool:
    """``name`` is ``prefix`` or lies under it."""
    return name == prefix or name.startswith(prefix + ".")
