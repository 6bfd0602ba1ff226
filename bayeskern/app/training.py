"""The epoch loop every method shares: deterministic shuffling, AMP, tqdm bars, one JSON log line
per epoch, a checkpoint of everything stateful after every epoch, and resume.

A resumed run continues as if never stopped: epoch ``e`` shuffles with seed ``seed + e``, and the
checkpoint holds the posterior, optimizer, scheduler and sample bank states (the posteriors keep
their Philox counters in their own state) plus torch's global RNG state.  It holds tensors and plain
Python containers and scalars only, and is read back with ``torch.load(weights_only=True)``
(``load_safely``), so opening a run folder cannot execute a pickle.

Under ``torchrun`` (``torch.distributed`` initialised) each rank trains on its part of every epoch
(``DistributedSampler``, epoch ``e`` shuffled with seed ``seed + e``; ``--batch-size`` is per rank),
the logged loss is the mean over all ranks' examples, and only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

from ..batches import Inputs, move_to, split_batch
from ..distributed import all_reduce_sum, is_distributed, is_rank_zero, rank, world_size
from .errors import UsageError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def _first_reason(error: Exception) -> str:
    """The most telling line of a load_state_dict error (a size mismatch or a missing key)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (telling or lines or [type(error).__name__])[0][:300]


def load_safely(path: Path, map_location: torch.device | str = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers/scalars only.  A file
    holding anything else (which a full unpickle could turn into running code) raises UsageError
    without being unpickled."""
    try:
        with warnings.catch_warnings():  # a plain pickle (no torch zip container) warns of its protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error).partition("WeightsUnpickler error:")[2] or str(error)
        reason = next((line.strip() for line in detail.splitlines() if line.strip()), type(error).__name__)
        reason = reason.split(" was not an allowed global")[0]
        raise UsageError(
            f"refusing to load {path}: it holds more than tensors and plain Python values "
            f"and unpickling it could run code ({reason[:200]}); delete it to start that part "
            "of the run over"
        ) from None


class Interrupted(Exception):
    """Raised after the epoch named by ``stop_after`` (simulates an interruption, for tests)."""


@dataclass
class EpochLoop:
    directory: Path  # runs/<name>/<method>
    epochs: int
    batch_size: int
    seed: int
    device: torch.device
    amp: str = "none"
    workers: int = 0
    resume: bool = False
    quiet: bool = False
    stop_after: int | None = None
    collate: Callable | None = None  # builds a batch from examples (text: padding); None: default_collate

    @property
    def checkpoint_path(self) -> Path:
        return self.directory / "checkpoint.pt"

    def autocast(self):
        dtype = AMP_DTYPES[self.amp]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def loader(
        self, dataset: Dataset, shuffle: bool, generator: torch.Generator | None = None, sampler: Sampler | None = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            sampler=sampler,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            collate_fn=self.collate,
        )

    @staticmethod
    def shard(dataset: Dataset) -> Dataset:
        """This rank's examples ``rank, rank + K, ...`` (every example exactly once over the K ranks)."""
        return Subset(dataset, range(rank(), len(dataset), world_size())) if is_distributed() else dataset

    @property
    def show_progress(self) -> bool:
        """Progress bars only on an interactive terminal, and not under --quiet."""
        return not self.quiet and sys.stderr.isatty()

    def _progress(self, iterable, **kwargs):
        return tqdm(iterable, disable=not self.show_progress, leave=False, **kwargs)

    def _save(self, epoch: int, state: dict[str, Stateful]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {"epoch": epoch, "rng": torch.get_rng_state(), "state": {k: v.state_dict() for k, v in state.items()}}
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.checkpoint_path)

    def _restore(self, state: dict[str, Stateful]) -> int:
        """Load the checkpoint into ``state``; the first epoch still to run."""
        if not (self.resume and self.checkpoint_path.exists()):
            return 0
        payload = load_safely(self.checkpoint_path, map_location=self.device)
        try:
            for key, obj in state.items():
                obj.load_state_dict(payload["state"][key])
        except (RuntimeError, KeyError, ValueError) as error:
            raise UsageError(
                f"checkpoint {self.checkpoint_path} does not fit this run: {_first_reason(error)}"
            ) from None
        torch.set_rng_state(payload["rng"])
        return payload["epoch"] + 1

    def _log(self, log_path: Path, record: dict[str, Any]) -> None:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        if not self.quiet:
            print(json.dumps(record), flush=True)

    def run(self, dataset: Dataset, state: dict[str, Stateful], step: Callable[[Inputs, Tensor], float]) -> None:
        """Train ``epochs`` epochs of ``step(inputs, targets) -> loss`` over ``dataset`` (batches as
        ``bayeskern.batches`` reads them: ``(x, y)`` tensors or Mappings holding ``labels``)."""
        generator = torch.Generator()
        sampler = DistributedSampler(dataset, shuffle=True, seed=self.seed) if is_distributed() else None
        loader = self.loader(dataset, shuffle=sampler is None, generator=generator, sampler=sampler)
        log_path = self.directory.parent / "log.jsonl"
        for epoch in range(self._restore(state), self.epochs):
            generator.manual_seed(self.seed + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            start, total, count = time.perf_counter(), 0.0, 0
            for batch in self._progress(loader, desc=f"{self.directory.name} epoch {epoch + 1}/{self.epochs}"):
                inputs, targets = move_to(split_batch(batch), self.device)
                total += step(inputs, targets) * len(targets)
                count += len(targets)
            total, count = all_reduce_sum({"sums": torch.tensor([total, count], dtype=torch.float64)})["sums"].tolist()
            record = {
                "method": self.directory.name,
                "epoch": epoch + 1,
                "loss": total / count,
                "seconds": round(time.perf_counter() - start, 3),
            }
            if is_rank_zero():
                self._log(log_path, record)
                self._save(epoch, state)
            if self.stop_after is not None and epoch + 1 >= self.stop_after:
                raise Interrupted(f"stopped after epoch {epoch + 1}")
