"""``vanilla``: the deterministic baseline, Adam on the mean negative log-likelihood (the MAP)."""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import Dataset

from .base import Method


class Vanilla(Method):
    name = "vanilla"

    def train(self) -> None:
        self.train_map(self.loop)

    def predict(self, dataset: Dataset) -> Tensor:
        return self.deterministic_probs(self.backbone.model, dataset)
