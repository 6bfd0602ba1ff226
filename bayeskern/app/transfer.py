"""The offline transfer: a backbone pretrained on a dataset's ``source`` classes, cached and reused.

``--pretrained source`` (the default) on a dataset that has a source (``digits``: digits 0-4, the
task being digits 5-9) trains the backbone on the source with the plain fit (Adam on the
cross-entropy, cosine-decayed, ``--pretrain-epochs``) and keeps its weights, classifier head left
out, in ``<out>/pretrained/<key>.pt``.  The key names everything the weights depend on (source,
model, image size, epochs, learning rate, seed), so a second run with the same settings loads the
file instead of training again.  The fine-tuning methods then read the file as ``--pretrained
PATH``: the initial point and the prior mean, with the head re-initialised (``new_params``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from ..distributed import is_rank_zero
from .data import Splits
from .errors import UsageError
from .models import create_backbone
from .training import EpochLoop


def cache_path(args: argparse.Namespace, splits: Splits) -> Path:
    key = (
        f"{splits.source_name}-{args.model}-{args.image_size}px-{args.pretrain_epochs}ep-lr{args.lr:g}-seed{args.seed}"
    )
    return args.out / "pretrained" / (re.sub(r"[^A-Za-z0-9_.-]+", "-", key) + ".pt")


def pretrain(args: argparse.Namespace, splits: Splits, device: torch.device) -> Path:
    """The path of the source-pretrained weights, trained now unless the cache holds them."""
    if splits.source is None:
        raise UsageError(f"--pretrained source: dataset {args.dataset!r} has no source classes to pretrain on")
    path = cache_path(args, splits)
    if path.exists():
        if is_rank_zero():
            print(f"pretrained: reusing {path}", flush=True)
        return path
    from .methods import Vanilla  # the plain fit is the pretraining step

    if is_rank_zero():
        print(
            f"pretrained: training {args.model} on {splits.source_name} for {args.pretrain_epochs} epochs", flush=True
        )
    source_classes = int(torch.unique(splits.source.tensors[1]).numel())  # type: ignore[attr-defined]
    source = Splits(splits.source, splits.val, splits.test, source_classes)

    def make_backbone():
        torch.manual_seed(args.seed)
        return create_backbone(args.model, source_classes, None)

    def make_loop(name: str, epochs: int | None = None) -> EpochLoop:
        return EpochLoop(path.with_suffix(""), args.pretrain_epochs, args.batch_size, args.seed, device, quiet=True)

    plain = Vanilla(
        argparse.Namespace(**{**vars(args), "pretrained": None}), source, make_backbone, make_loop, device, {}
    )
    plain.train()
    if not is_rank_zero():
        return path
    head = set(plain.backbone.classifier)
    state = {k: v.detach().cpu().contiguous() for k, v in plain.backbone.model.state_dict().items() if k not in head}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path
