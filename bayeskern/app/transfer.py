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

import dataclasses
import re
from pathlib import Path

import torch

from ..distributed import is_rank_zero
from .config import RunConfig
from .errors import UsageError
from .methods import Vanilla
from .models import create_backbone
from .parallel import Parallel
from .shared import Splits
from .training import EpochLoop


def cache_path(config: RunConfig, splits: Splits) -> Path:
    """Where the weights of ``config``'s pretraining on ``splits.source`` are kept."""
    key = (
        f"{splits.source_name}-{config.model}-{config.image_size}px-{config.pretrain_epochs}ep-lr{config.lr:g}"
        f"-seed{config.seed}"
    )
    return config.out / "pretrained" / (re.sub(r"[^A-Za-z0-9_.-]+", "-", key) + ".pt")


def pretrain(config: RunConfig, splits: Splits, parallel: Parallel) -> Path:
    """The path of the source-pretrained weights, trained now (the plain fit, on every rank through
    ``parallel``; rank 0 writes the file) unless the cache holds them."""
    if splits.source is None:
        raise UsageError(f"--pretrained source: dataset {config.dataset!r} has no source classes to pretrain on")
    path = cache_path(config, splits)
    if path.exists():
        if is_rank_zero():
            print(f"pretrained: reusing {path}", flush=True)
        return path
    if is_rank_zero():
        print(
            f"pretrained: training {config.model} on {splits.source_name} for {config.pretrain_epochs} epochs",
            flush=True,
        )
    source_classes = int(torch.unique(splits.source.tensors[1]).numel())  # type: ignore[attr-defined]
    source = Splits(splits.source, splits.val, splits.test, source_classes)

    def make_backbone():
        torch.manual_seed(config.seed)
        return create_backbone(config.model, source_classes, None)

    def make_loop(name: str, epochs: int | None = None) -> EpochLoop:
        return EpochLoop(
            path.with_suffix(""), config.pretrain_epochs, config.batch_size, config.seed, config.device, quiet=True
        )

    plain = Vanilla(dataclasses.replace(config, pretrained=None), source, make_backbone, make_loop, {}, parallel)
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
