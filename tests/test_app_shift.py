"""Shifted test sets of the fine-tuning application: identity at severity 0, monotone in severity."""

import itertools

import pytest
import torch

from bayeskern.app.data import DataOptions, load_dataset
from bayeskern.app.errors import UsageError
from bayeskern.app.shift import (
    CORRUPTIONS,
    MAX_SEVERITY,
    blur,
    image_stats,
    is_image_dataset,
    parse_corruptions,
    parse_severities,
    shifted_sets,
)


@pytest.fixture(scope="module")
def test_set():
    return load_dataset("digits", DataOptions(image_size=16, train_per_class=0)).test


def _distance(shifted, clean, count=40):
    return sum(float((shifted[i][0] - clean[i][0]).norm()) for i in range(count)) / count


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_severity_zero_is_the_identity(test_set, corruption):
    stats = image_stats(test_set)
    x = test_set[3][0]
    assert torch.equal(CORRUPTIONS[corruption](x, 0, stats, 3), x)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_distance_from_the_clean_images_grows_with_severity(test_set, corruption):
    sets = shifted_sets(test_set, [corruption], range(1, MAX_SEVERITY + 1))
    distances = [_distance(sets[corruption, s], test_set) for s in range(1, MAX_SEVERITY + 1)]
    assert distances[0] > 0
    assert all(a < b for a, b in itertools.pairwise(distances)), distances


def test_shifted_sets_keep_labels_and_shapes_and_are_deterministic(test_set):
    sets = shifted_sets(test_set, ["noise"], [2])
    x, y = sets["noise", 2][5]
    assert x.shape == test_set[5][0].shape and y == test_set[5][1]
    assert torch.equal(x, sets["noise", 2][5][0])  # the same noise every time it is read


def test_blur_keeps_a_constant_image():
    stats = image_stats([(torch.zeros(3, 16, 16), 0)])
    constant = torch.full((3, 16, 16), 0.7)
    assert torch.allclose(blur(constant, 5, stats, 0), constant, atol=1e-6)


def test_rotation_leaves_a_centred_disk_nearly_unchanged():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disk = ((xx**2 + yy**2) < 0.3).float().expand(3, 32, 32)
    stats = image_stats([(disk, 0)])
    rotated = CORRUPTIONS["rotate"](disk, 1, stats, 0)
    assert (rotated - disk).abs().mean() < 0.02


def test_only_image_datasets_are_shifted(test_set):
    assert is_image_dataset(test_set)
    assert not is_image_dataset([(torch.zeros(10), 0)])  # tabular
    assert not is_image_dataset([({"input_ids": torch.zeros(4)}, 0)])  # text


@pytest.mark.parametrize(
    "parse, spec, message",
    [
        (parse_corruptions, "rotate,fog", "unknown corruption 'fog'"),
        (parse_corruptions, "", "unknown corruption"),
        (parse_severities, "0,1", "in 1..5"),
        (parse_severities, "6", "in 1..5"),
        (parse_severities, "x", "integers"),
    ],
)
def test_bad_corruption_specs_raise_usage_error(parse, spec, message):
    with pytest.raises(UsageError, match=message):
        parse(spec)


def test_specs_parse():
    assert parse_corruptions("blur, noise") == ["blur", "noise"] and parse_corruptions("none") == []
    assert parse_severities("5,1,3,1") == [1, 3, 5]
