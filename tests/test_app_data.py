"""Datasets of the fine-tuning application: digits, ImageFolder trees, missing data."""

import numpy as np
import pytest
import torch
from PIL import Image

from bayeskern.app.data import DataOptions, load_dataset
from bayeskern.app.errors import UsageError


def test_digits_splits_are_fixed_disjoint_and_stratified():
    splits = load_dataset("digits10", DataOptions(image_size=12, seed=3, train_per_class=0))
    sizes = [len(s) for s in (splits.train, splits.val, splits.test)]
    assert sum(sizes) == 1797 and sizes[0] == 1078 and abs(sizes[1] - sizes[2]) <= 1
    x, _ = splits.train[0]
    assert x.shape == (3, 12, 12) and splits.num_classes == 10
    again = load_dataset("digits10", DataOptions(image_size=12, seed=3))
    assert torch.equal(splits.test.tensors[0], again.test.tensors[0])
    train_rows = {tuple(row.flatten()[:20].tolist()) for row in splits.train.tensors[0]}
    assert not any(tuple(row.flatten()[:20].tolist()) in train_rows for row in splits.test.tensors[0][:50])
    counts = torch.bincount(splits.test.tensors[1], minlength=10)
    assert counts.min() >= 33 and counts.max() <= 38  # stratified: ~36 per class


def test_digits_default_is_ten_training_examples_per_class():
    splits = load_dataset("digits10", DataOptions(seed=3))
    labels = torch.stack([splits.train[i][1] for i in range(len(splits.train))])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 10))
    full = load_dataset("digits10", DataOptions(seed=3, train_per_class=0))
    assert len(full.val) == len(splits.val) and len(full.test) == len(splits.test)
    again = load_dataset("digits10", DataOptions(seed=3))
    assert splits.train.indices == again.train.indices


def test_digits_transfer_task_is_five_to_nine_with_zero_to_four_as_source_and_ood():
    ten = load_dataset("digits10", DataOptions(image_size=8, seed=1, train_per_class=0))
    task = load_dataset("digits", DataOptions(image_size=8, seed=1, train_per_class=0))
    assert task.num_classes == 5 and task.source_name == "digits0-4"
    for split, whole in ((task.train, ten.train), (task.val, ten.val), (task.test, ten.test)):
        images, labels = whole.tensors
        assert torch.equal(split.tensors[0], images[labels >= 5]) and torch.equal(
            split.tensors[1], labels[labels >= 5] - 5
        )
    assert torch.equal(task.source.tensors[0], ten.train.tensors[0][ten.train.tensors[1] < 5])
    assert torch.equal(task.ood.tensors[0], ten.test.tensors[0][ten.test.tensors[1] < 5])
    few_shot = load_dataset("digits", DataOptions(image_size=8, seed=1))
    assert torch.equal(torch.bincount(few_shot.train.dataset.tensors[1][few_shot.train.indices]), torch.full((5,), 10))
    assert len(few_shot.source) == len(task.source)  # the source is not subset


def _write_images(root, classes=("cat", "dog"), per_class=10, size=20):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def _to_tensor():
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])


def test_imagefolder_single_tree_is_split_70_15_15(tmp_path):
    _write_images(tmp_path / "imgs")
    options = DataOptions(train_transform=_to_tensor(), eval_transform=_to_tensor(), seed=1)
    splits = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", options)
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [14, 3, 3]
    assert splits.num_classes == 2
    x, y = splits.val[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    seen = set(splits.train.indices) | set(splits.val.indices) | set(splits.test.indices)
    assert len(seen) == 20


def test_train_per_class_subsets_an_imagefolder(tmp_path):
    _write_images(tmp_path / "imgs", per_class=10)
    options = DataOptions(train_transform=_to_tensor(), eval_transform=_to_tensor(), train_per_class=3)
    splits = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", options)
    labels = [splits.train[i][1] for i in range(len(splits.train))]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(UsageError, match="--train-per-class"):
        load_dataset(f"imagefolder:{tmp_path / 'imgs'}", DataOptions(train_per_class=-1))


def test_imagefolder_uses_given_train_val_test_folders(tmp_path):
    for split, n in (("train", 8), ("val", 2), ("test", 3)):
        _write_images(tmp_path / split, per_class=n)
    options = DataOptions(train_transform=_to_tensor(), eval_transform=_to_tensor())
    splits = load_dataset(f"imagefolder:{tmp_path}", options)
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [16, 4, 6]


@pytest.mark.parametrize("spec, match", [("mnist", "unknown dataset"), ("imagefolder:/no/such/dir", "not a directory")])
def test_bad_dataset_raises_usage_error(spec, match):
    with pytest.raises(UsageError, match=match):
        load_dataset(spec, DataOptions())


def test_missing_torchvision_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(UsageError, match=r"not found under .*--download"):
        load_dataset("cifar10", DataOptions(data_dir=tmp_path))
