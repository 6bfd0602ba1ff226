"""Datasets for fine-tuning, by name: ``digits`` (offline default), ``digits10``, ``diabetes``
(regression), ``cifar10``, ``flowers102``, ``oxford_pets`` (torchvision; downloaded only when asked)
and ``imagefolder:PATH``.

Every loader returns fixed, seeded train/val/test splits.  ``digits10`` is scikit-learn's 1,797
8x8 handwritten digits (they ship inside scikit-learn), split 60/20/20 stratified, upsampled to
``image_size`` and repeated to three channels so image backbones take it unchanged.  ``digits`` is
the same images as a transfer task: classify digits 5-9; digits 0-4 are the ``source`` a backbone
is pretrained on (their training images) and the out-of-distribution inputs (their test images).
``diabetes`` is scikit-learn's tabular regression (``bayeskern.app.regression``).

``train_per_class`` keeps a seeded subset of that many training examples per class (validation
and test stay whole).  Its default is the dataset's: 10 for digits -- a few-shot fine-tuning split
like Flowers102's ten training images per class -- and all examples elsewhere; 0 keeps all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import UsageError
from .regression import diabetes_splits
from .shared import Splits, seeded_split
from .text import load_text_dataset


@dataclass
class DataOptions:
    data_dir: Path = Path("data")
    download: bool = False
    image_size: int = 16
    seed: int = 0
    train_per_class: int | None = None  # None: the dataset's default (DEFAULT_TRAIN_PER_CLASS); 0: all
    train_transform: Callable | None = None
    eval_transform: Callable | None = None
    text: Any = None  # app.text.TextOptions of a csv:/json: dataset


def digits(options: DataOptions) -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    index = torch.arange(len(labels))
    train, rest = train_test_split(index, test_size=0.4, random_state=options.seed, stratify=labels)
    val, test = train_test_split(rest, test_size=0.5, random_state=options.seed, stratify=labels[rest])
    size = options.image_size
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return Splits(*(TensorDataset(images[i], labels[i]) for i in (train, val, test)), num_classes=10)


TRANSFER_CLASSES = (5, 6, 7, 8, 9)
"""The digits task's classes; the other five are the pretraining source and the OOD inputs."""


def digits_transfer(options: DataOptions) -> Splits:
    """``digits`` as a transfer task: classify digits 5-9 (labels 0-4); the training images of
    digits 0-4 are the ``source`` a backbone is pretrained on, their test images the ``ood`` set."""
    full = digits(options)
    parts = []
    for split in (full.train, full.val, full.test):
        images, labels = split.tensors
        target = torch.isin(labels, torch.tensor(TRANSFER_CLASSES))
        parts.append((TensorDataset(images[target], labels[target] - TRANSFER_CLASSES[0]), split.tensors, target))
    (train, (source_x, source_y), source_mask), (val, _, _), (test, test_all, test_mask) = parts
    source = TensorDataset(source_x[~source_mask], source_y[~source_mask])
    ood = TensorDataset(test_all[0][~test_mask], test_all[1][~test_mask])
    return Splits(train, val, test, len(TRANSFER_CLASSES), ood=ood, source=source, source_name="digits0-4")


def diabetes(options: DataOptions) -> Splits:
    """scikit-learn's diabetes regression, standardised (``bayeskern.app.regression``)."""
    (train, val, test), scale = diabetes_splits(options.seed)
    return Splits(train, val, test, 1, likelihood="regression", target_scale=scale)


def _torchvision_opener(name: str, dataset_cls, options: DataOptions) -> Callable[..., Dataset]:
    """``open(transform, **split_kwargs)`` for one torchvision dataset class, with a clear error
    when the files are missing."""

    def open_split(transform, **split):
        try:
            return dataset_cls(options.data_dir, transform=transform, download=options.download, **split)
        except RuntimeError as error:
            hint = "" if options.download else "; pass --download to fetch it"
            raise UsageError(f"dataset {name!r} not found under {options.data_dir}{hint} ({error})") from None

    return open_split


def _split_off_val(train: Dataset, val: Dataset, test: Dataset, num_classes: int, seed: int) -> Splits:
    """Hold out 10% of the training set (a copy with the eval transform) as validation."""
    train_idx, val_idx = seeded_split(len(train), (0.9, 0.1), seed)
    return Splits(Subset(train, train_idx), Subset(val, val_idx), test, num_classes)


def cifar10(options: DataOptions) -> Splits:
    from torchvision.datasets import CIFAR10

    open_split = _torchvision_opener("cifar10", CIFAR10, options)
    return _split_off_val(
        open_split(options.train_transform, train=True),
        open_split(options.eval_transform, train=True),
        open_split(options.eval_transform, train=False),
        10,
        options.seed,
    )


def flowers102(options: DataOptions) -> Splits:
    from torchvision.datasets import Flowers102

    open_split = _torchvision_opener("flowers102", Flowers102, options)
    return Splits(
        open_split(options.train_transform, split="train"),
        open_split(options.eval_transform, split="val"),
        open_split(options.eval_transform, split="test"),
        102,
    )


def oxford_pets(options: DataOptions) -> Splits:
    from torchvision.datasets import OxfordIIITPet

    open_split = _torchvision_opener("oxford_pets", OxfordIIITPet, options)
    return _split_off_val(
        open_split(options.train_transform, split="trainval"),
        open_split(options.eval_transform, split="trainval"),
        open_split(options.eval_transform, split="test"),
        37,
        options.seed,
    )


def imagefolder(path: str, options: DataOptions) -> Splits:
    """``PATH/{train,val,test}/<class>/*`` when those folders exist; otherwise ``PATH/<class>/*``
    split 70/15/15 with the seed.  A missing val/test folder is split off train."""
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"imagefolder: {root} is not a directory")

    def open_folder(folder: Path, transform) -> ImageFolder:
        try:
            return ImageFolder(folder, transform=transform)
        except (FileNotFoundError, RuntimeError) as error:
            raise UsageError(f"imagefolder: {error}") from None

    base = root / "train" if (root / "train").is_dir() else root
    train_full = open_folder(base, options.train_transform)
    eval_full = open_folder(base, options.eval_transform)
    missing = [name for name in ("val", "test") if not (root / name).is_dir() or base is root]
    fractions = {0: (1.0,), 1: (0.85, 0.15), 2: (0.7, 0.15, 0.15)}[len(missing)]
    parts = seeded_split(len(train_full), fractions, options.seed)
    splits = {"train": Subset(train_full, parts[0])}
    for name, indices in zip(missing, parts[1:]):
        splits[name] = Subset(eval_full, indices)
    for name in ("val", "test"):
        if name not in splits:
            folder = open_folder(root / name, options.eval_transform)
            if folder.classes != train_full.classes:
                raise UsageError(
                    f"imagefolder: {root / name} has classes {folder.classes}, train has {train_full.classes}"
                )
            splits[name] = folder
    return Splits(splits["train"], splits["val"], splits["test"], len(train_full.classes))


DATASETS: dict[str, Callable[[DataOptions], Splits]] = {
    "digits": digits_transfer,
    "digits10": digits,
    "diabetes": diabetes,
    "cifar10": cifar10,
    "flowers102": flowers102,
    "oxford_pets": oxford_pets,
}


DEFAULT_TRAIN_PER_CLASS = {"digits": 10, "digits10": 10}


def targets_of(dataset: Dataset) -> torch.Tensor:
    """The class labels of a dataset, read from its metadata where it has them (no image decoding)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for attr in ("targets", "_labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr))
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def per_class_subset(dataset: Dataset, per_class: int, seed: int) -> Subset:
    """A seeded subset with at most ``per_class`` examples of each class."""
    targets = targets_of(dataset)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in torch.unique(targets):
        members = torch.nonzero(targets == label).flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return Subset(dataset, torch.cat(keep).sort().values.tolist())


def load_dataset(spec: str, options: DataOptions) -> Splits:
    """Resolve ``spec`` (a name in DATASETS or ``imagefolder:PATH``) to its splits."""
    if spec.startswith("imagefolder:"):
        splits = imagefolder(spec.split(":", 1)[1], options)
    elif spec.startswith(("csv:", "json:")):
        splits = load_text_dataset(spec, options.text, options.seed)
    elif spec in DATASETS:
        splits = DATASETS[spec](options)
    else:
        known = ", ".join([*DATASETS, "imagefolder:PATH", "csv:PATH", "json:PATH"])
        raise UsageError(f"unknown dataset {spec!r} (known: {known})")
    per_class = options.train_per_class
    if per_class is None:
        per_class = DEFAULT_TRAIN_PER_CLASS.get(spec, 0)
    if per_class < 0:
        raise UsageError(f"--train-per-class must be >= 0, got {per_class}")
    if per_class and splits.likelihood == "regression":
        raise UsageError(f"--train-per-class needs classes; {spec!r} is a regression dataset")
    if per_class:
        splits.train = per_class_subset(splits.train, per_class, options.seed)
    return splits
