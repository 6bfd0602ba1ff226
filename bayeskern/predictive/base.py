"""What the predictives share: the result (``Prediction``), what ``inputs`` means, the posterior's
samples as the sampled strategies read them, one sample's forward, and the fallback warning."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from ..batches import OutputFn, inputs_of, logits_of, split_inputs
from ..protocol import Posterior

SAMPLE_CACHE_BYTES = 1 << 30


@dataclass
class Prediction:
    """Predictive summaries; fields that do not apply to the likelihood or the predictive are None."""

    probs: Tensor | None = None  # (N, C) mean of the per-sample softmax
    entropy: Tensor | None = None  # (N,) H[probs]
    expected_entropy: Tensor | None = None  # (N,) mean over samples of H[p_s]
    mutual_info: Tensor | None = None  # (N,) entropy - expected_entropy
    logits: Tensor | None = None  # (S, N, ...) per-sample outputs, when asked for
    mean: Tensor | None = None  # regression: (N, ...) predictive mean
    variance: Tensor | None = None  # regression: (N, ...) predictive variance


@dataclass(frozen=True)
class _Reading:
    """How to read a sample's result: the batch's inputs (for ``output_fn``), ``output_fn`` and the likelihood."""

    inputs: Any
    output_fn: OutputFn | None
    classification: bool


def _forward(
    module: nn.Module, params: dict[str, Tensor], args: tuple, kwargs: dict[str, Any], reading: _Reading
) -> tuple[Tensor, ...]:
    """One posterior sample: outputs and, for classification, probabilities and their entropy."""
    return _read(functional_call(module, params, args, kwargs), reading)


def _read(output: Any, reading: _Reading) -> tuple[Tensor, ...]:
    """A sample's model output read as ``_forward`` returns it."""
    out = logits_of(output, reading.inputs, reading.output_fn, classification=reading.classification)
    if not reading.classification:
        return (out,)
    log_p = torch.log_softmax(out.float(), dim=-1)
    p = log_p.exp()
    return out, p, -(p * log_p).sum(-1)


def _elements(value: Any) -> int:
    return sum(t.numel() for t in tree_leaves(value) if isinstance(t, Tensor))


def _bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _is_one_batch(inputs: Any) -> bool:
    """Whether ``predict``'s ``inputs`` is one batch of model inputs (a Tensor, a tuple of positional
    inputs or a Mapping of keyword inputs) rather than an iterable of loader batches.

    Raises ValueError naming ``inputs`` for what has no one meaning: an empty tuple, a tuple holding
    no tensor (a tuple of batches: pass a list), something neither a batch nor iterable."""
    if isinstance(inputs, tuple):
        if not any(isinstance(t, Tensor) for t in inputs):
            kinds = ", ".join(type(t).__name__ for t in inputs) or "nothing"
            raise ValueError(
                f"inputs: a tuple is one call's positional inputs, but this one holds no tensor ({kinds}); "
                "pass several batches as a list or a DataLoader"
            )
        return True
    if isinstance(inputs, (Tensor, Mapping)):
        return True
    if not isinstance(inputs, Iterable) or isinstance(inputs, (str, bytes)):
        raise ValueError(
            f"inputs: a {type(inputs).__name__} is neither one batch (a tensor, a tuple of positional inputs, "
            "a Mapping of keyword inputs) nor an iterable of batches"
        )
    return False


def _batches(inputs: Any, one_batch: bool, batch_size: int | None) -> Iterator[Any]:
    """The model inputs of each batch: ``inputs`` itself when it is one batch (``_is_one_batch``; a
    Mapping's ``labels`` dropped), else those of every loader batch it yields
    (``bayeskern.batches.inputs_of``); split further into ``batch_size`` examples."""
    if one_batch:
        xs: Iterable[Any] = (inputs if isinstance(inputs, tuple) else inputs_of(inputs),)
    else:
        xs = (inputs_of(batch) for batch in inputs)
    for x in xs:
        yield from (x,) if batch_size is None else split_inputs(x, batch_size)


class _Samples:
    """``posterior.sample(s)``; with ``cache``, the first samples are cached while they fit in
    ``SAMPLE_CACHE_BYTES`` together, the rest are redrawn for every batch (the latest one drawn is held
    until the next).  ``random`` names the tensors that differ between samples (the keys of a sample)."""

    def __init__(self, posterior: Posterior, num_samples: int, model_device: torch.device, cache: bool) -> None:
        self.posterior, self.num_samples = posterior, num_samples
        self.cache: list[dict[str, Tensor]] = []
        self.cache_full = not cache
        self.cached_bytes = 0
        self.held: dict[int, dict[str, Tensor]] = {}
        first = self[0]
        self.random = set(first)
        self.random_bytes = sum(first[n].numel() * first[n].element_size() for n in self.random)
        # where the samples live, which may differ from the model's device
        self.device = next(iter(first.values())).device if first else model_device

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if index < len(self.cache):
            return self.cache[index]
        if index in self.held:
            return self.held[index]
        drawn = self.posterior.sample(index)
        if not self.cache_full and index == len(self.cache):
            size = sum(t.numel() * t.element_size() for t in drawn.values())
            if self.cached_bytes + size <= SAMPLE_CACHE_BYTES:
                self.cache.append(drawn)
                self.cached_bytes += size
                return drawn
            self.cache_full = True
        self.held = {index: drawn}
        return drawn


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {name: t.detach() for name, t in [*module.named_parameters(), *module.named_buffers()]}


def _warn(message: str) -> None:
    """A fallback's RuntimeWarning, attributed to the code that called ``predict`` (the first frame
    outside this module and torch's ``no_grad`` wrapper)."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_code.co_filename == _NO_GRAD_FILE
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


_PACKAGE_DIR = os.path.dirname(__file__) + os.sep
_NO_GRAD_FILE = torch.utils._contextlib.__file__
_READS = ("model", "likelihood", "noise_std", "output_fn", "is_sharded", "pred_type", "sample", "fixed_tensors")


def check_posterior(posterior: Posterior) -> None:
    """TypeError naming the members of ``Posterior`` that ``predict`` reads and ``posterior`` lacks
    (``functional_forward`` is read only when ``is_sharded``)."""
    missing = [name for name in _READS if not hasattr(posterior, name)]
    if not missing and posterior.is_sharded and not hasattr(posterior, "functional_forward"):
        missing.append("functional_forward")
    if missing:
        raise TypeError(
            f"posterior: a {type(posterior).__name__} has no {', '.join(missing)}; "
            "bayeskern.protocol.Posterior declares what predict reads"
        )


def _entropy(p: Tensor) -> Tensor:
    terms: Tensor = torch.special.xlogy(p, p)  # torch.special is untyped in torch's stubs
    return -terms.sum(-1)
