"""Shifted test sets in the spirit of CIFAR-10-C: corruptions of the images a model sees, at
severities 1-5 (0 is the identity).

Every corruption acts on the normalised (C, H, W) tensor and is stated in units of the clean test
set, so one definition serves any image dataset:

* ``rotate``: rotation by ``15 s`` degrees (bilinear; the corners filled with the per-channel
  minimum of the clean images, the background of digits);
* ``noise``: additive Gaussian noise of std ``0.2 s`` times the per-channel std of the clean images,
  drawn from a generator seeded by the example's index (the same noise in every method's test);
* ``blur``: Gaussian blur of std ``0.04 s`` times the image size (reflect padding; the kernel sums
  to one, so it commutes with the normalisation).

Each grows monotonically in severity; ``tests/test_app_shift.py`` checks it and the identity at 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..batches import inputs_of
from .errors import UsageError

MAX_SEVERITY = 5


@dataclass(frozen=True)
class ImageStats:
    """Per-channel statistics of the clean test images, shape (C, 1, 1)."""

    minimum: Tensor
    std: Tensor


def rotate(x: Tensor, severity: int, stats: ImageStats, index: int) -> Tensor:
    if severity == 0:
        return x
    angle = math.radians(15.0 * severity)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)[None]
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    # rotate x - fill so the zero padding of grid_sample is the fill value
    shifted = x - stats.minimum
    return (
        F.grid_sample(shifted[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        + stats.minimum
    )


def noise(x: Tensor, severity: int, stats: ImageStats, index: int) -> Tensor:
    if severity == 0:
        return x
    generator = torch.Generator().manual_seed(index)
    return x + 0.2 * severity * stats.std * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def blur(x: Tensor, severity: int, stats: ImageStats, index: int) -> Tensor:
    if severity == 0:
        return x
    sigma = 0.04 * severity * x.shape[-1]
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[0]
    padded = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]


CORRUPTIONS: dict[str, Callable[[Tensor, int, ImageStats, int], Tensor]] = {
    "rotate": rotate,
    "noise": noise,
    "blur": blur,
}


class Shifted(Dataset):
    """``base`` with ``corruption`` at ``severity`` applied to each image (labels unchanged)."""

    def __init__(self, base: Dataset, corruption: str, severity: int, stats: ImageStats):
        self.base, self.severity, self.stats = base, severity, stats
        self.corrupt = CORRUPTIONS[corruption]

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return self.corrupt(x, self.severity, self.stats, index), y


def is_image_dataset(dataset: Dataset) -> bool:
    """Whether the examples are (C, H, W) image tensors (text and tabular ones are not shifted)."""
    x = inputs_of(dataset[0])  # a Mapping example (text) holds no image tensor
    return isinstance(x, Tensor) and x.dim() == 3 and x.shape[-1] >= 4


def image_stats(dataset: Dataset, limit: int = 512) -> ImageStats:
    images = torch.stack([dataset[i][0] for i in range(min(len(dataset), limit))])  # type: ignore[arg-type]
    flat = images.transpose(0, 1).flatten(1)
    return ImageStats(flat.min(1).values[:, None, None], flat.std(1)[:, None, None])


def parse_corruptions(spec: str) -> list[str]:
    """``--corruptions``: a comma-separated list of CORRUPTIONS names, or ``none``."""
    if spec == "none":
        return []
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in CORRUPTIONS]
    if unknown or not names:
        raise UsageError(f"unknown corruption {', '.join(unknown) or spec!r} (known: {', '.join(CORRUPTIONS)}, none)")
    return names


def parse_severities(spec: str) -> list[int]:
    """``--severities``: comma-separated integers in 1..MAX_SEVERITY."""
    try:
        levels = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--severities must be comma-separated integers, got {spec!r}") from None
    bad = [s for s in levels if not 1 <= s <= MAX_SEVERITY]
    if bad or not levels:
        raise UsageError(f"--severities must lie in 1..{MAX_SEVERITY}, got {spec!r}")
    return sorted(set(levels))


def shifted_sets(
    test: Dataset, corruptions: Sequence[str], severities: Sequence[int]
) -> dict[tuple[str, int], Shifted]:
    """Every (corruption, severity) version of ``test``."""
    stats = image_stats(test)
    return {(c, s): Shifted(test, c, s, stats) for c in corruptions for s in severities}
