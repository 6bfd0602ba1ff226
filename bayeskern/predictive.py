"""The Monte-Carlo predictive engine: ``predict(posterior, inputs, num_samples)``.

Works for any posterior obeying ``bayeskern.posteriors.base.Posterior``: sample ``s`` is the
network run through ``torch.func.functional_call`` with ``{**model params and buffers,
**posterior.sample(s)}``, in eval mode, without gradients.

Classification (``p_s = softmax(f_s(x))``, S samples):

* ``probs = (1/S) sum_s p_s``;
* ``entropy = H[probs]`` (total uncertainty), ``expected_entropy = (1/S) sum_s H[p_s]`` (aleatoric),
  ``mutual_info = entropy - expected_entropy`` (epistemic, the BALD score).

Regression: ``mean = (1/S) sum_s f_s(x)``, ``variance = (1/S) sum_s (f_s(x) - mean)^2 + noise_std^2``
(Welford's running update).

Speed: one single-sample function ``(model, params, x) -> outputs`` is compiled with
``torch.compile`` once and called S times; parameters enter as tensors, so new samples never
recompile (a last, smaller batch may compile once more with a dynamic batch size).  If compilation
fails the engine warns and runs eagerly.  Memory: inputs run in batches of ``batch_size`` (or as
the loader yields them); the S samples are drawn once and reused for every batch when they fit in
``SAMPLE_CACHE_BYTES``; beyond it, the first samples that fit stay cached and the others are redrawn
for every batch (``sample`` is deterministic in its index), so memory stays within the budget plus one
sample.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .posteriors.base import Posterior

SAMPLE_CACHE_BYTES = 1 << 30
LIKELIHOODS = ("classification", "regression")


@dataclass
class Prediction:
    """Monte-Carlo predictive summaries; fields that do not apply to the likelihood are None."""

    probs: Tensor | None = None  # (N, C) mean of the per-sample softmax
    entropy: Tensor | None = None  # (N,) H[probs]
    expected_entropy: Tensor | None = None  # (N,) mean over samples of H[p_s]
    mutual_info: Tensor | None = None  # (N,) entropy - expected_entropy
    logits: Tensor | None = None  # (S, N, ...) per-sample outputs, when asked for
    mean: Tensor | None = None  # regression: (N, ...) predictive mean
    variance: Tensor | None = None  # regression: (N, ...) predictive variance


def _forward(model: nn.Module, params: dict[str, Tensor], x: Tensor, classification: bool) -> tuple[Tensor, ...]:
    """One posterior sample: outputs and, for classification, probabilities and their entropy."""
    out = functional_call(model, params, (x,))
    if not classification:
        return (out,)
    log_p = torch.log_softmax(out.float(), dim=-1)
    p = log_p.exp()
    return out, p, -(p * log_p).sum(-1)


class _Runner:
    """Calls ``_forward`` compiled (once per model/shape) or eagerly; falls back to eager, with a
    warning, if compilation or the compiled call fails."""

    def __init__(self, compile: bool) -> None:
        self.fn: Callable[..., tuple[Tensor, ...]] = _compiled() if compile else _forward
        self.compiled = compile

    def __call__(self, *args: Any) -> tuple[Tensor, ...]:
        if not self.compiled:
            return _forward(*args)
        try:
            return self.fn(*args)
        except Exception as err:  # any compiler error: predicting must still work
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); predicting eagerly", RuntimeWarning)
            self.compiled = False
            return _forward(*args)


_COMPILED: Callable[..., tuple[Tensor, ...]] | None = None


def _compiled() -> Callable[..., tuple[Tensor, ...]]:
    global _COMPILED
    if _COMPILED is None:
        # Inductor's layout optimisation converts every conv weight to channels-last on each call; the
        # weights here are inputs (a new sample each call), so on CPU it made resnet18 1.6x slower.
        _COMPILED = torch.compile(_forward, options={"layout_optimization": False})
    return _COMPILED


def _inputs_of(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _batches(inputs: Tensor | Iterable[Any], batch_size: int | None) -> Iterator[Tensor]:
    if isinstance(inputs, Tensor):
        yield from (inputs,) if batch_size is None else inputs.split(batch_size)
    else:
        for batch in inputs:
            x = _inputs_of(batch)
            yield from (x,) if batch_size is None else x.split(batch_size)


class _Samples:
    """``posterior.sample(s)`` merged over the model's parameters and buffers; the first samples are
    cached while they fit in ``SAMPLE_CACHE_BYTES`` together, the rest are redrawn for every batch."""

    def __init__(self, posterior: Posterior, base: dict[str, Tensor], num_samples: int) -> None:
        self.posterior, self.base, self.num_samples = posterior, base, num_samples
        self.cache: list[dict[str, Tensor]] = []
        self.cache_full = False
        self.cached_bytes = 0
        # where the samples live: the model's device until the posterior's first sample says otherwise
        self.device = next((t.device for t in base.values()), torch.device("cpu"))
        self.device_known = False

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if index < len(self.cache):
            return self.cache[index]
        drawn = self.posterior.sample(index)
        if not self.device_known and drawn:
            self.device, self.device_known = next(iter(drawn.values())).device, True
        params = {**self.base, **drawn}
        if not self.cache_full and index == len(self.cache):
            size = sum(t.numel() * t.element_size() for t in drawn.values())
            if self.cached_bytes + size <= SAMPLE_CACHE_BYTES:
                self.cache.append(params)
                self.cached_bytes += size
            else:
                self.cache_full = True
        return params


def _check(num_samples: int, batch_size: int | None, likelihood: str) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


@torch.no_grad()
def predict(
    posterior: Posterior,
    inputs: Tensor | Iterable[Any],
    num_samples: int = 32,
    compile: bool = True,
    batch_size: int | None = None,
    return_logits: bool = False,
    likelihood: str | None = None,
    noise_std: float = 0.0,
) -> Prediction:
    """Monte-Carlo prediction with ``num_samples`` posterior samples (see the module docstring).

    ``inputs`` is a tensor or an iterable of batches (a DataLoader yielding ``x`` or ``(x, y, ...)``);
    ``batch_size`` splits each of them further.  ``likelihood`` defaults to the posterior's
    (``"classification"`` if it has none).  ``noise_std`` (regression) is added as observation noise.
    ``compile=False`` runs eagerly; results agree with the compiled run to float rounding.
    """
    likelihood = likelihood or getattr(posterior, "likelihood", "classification")
    _check(num_samples, batch_size, likelihood)
    model = posterior.model
    base = {name: t.detach() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    samples, run = _Samples(posterior, base, num_samples), _Runner(compile)
    classification = likelihood == "classification"
    was_training = model.training
    model.eval()
    try:
        parts = [
            _predict_batch(x, samples, run, model, classification, return_logits)
            for x in _batches(inputs, batch_size)
        ]
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("inputs holds no batch")
    fields = {key: torch.cat([part[key] for part in parts], dim=1 if key == "logits" else 0) for key in parts[0]}
    if not classification:
        fields["variance"] = fields["variance"] + noise_std**2
    return Prediction(**fields)


def _predict_batch(
    x: Tensor, samples: _Samples, run: _Runner, model: nn.Module, classification: bool, return_logits: bool
) -> dict[str, Tensor]:
    S = samples.num_samples
    outputs: list[Tensor] = []
    total: Tensor | float = 0.0
    second: Tensor | float = 0.0  # classification: sum of H[p_s]; regression: Welford's M2
    for s in range(S):
        params = samples[s]
        x = x.to(samples.device)  # the posterior's device, which may differ from the model's
        result = run(model, params, x, classification)
        if return_logits:
            outputs.append(result[0])
        if classification:
            total = total + result[1]
            second = second + result[2]
        else:
            y = result[0].float()
            delta = y - total
            total = total + delta / (s + 1)
            second = second + delta * (y - total)
    fields: dict[str, Tensor] = {}
    if classification:
        probs = total / S
        entropy = _entropy(probs)
        expected = second / S
        fields.update(probs=probs, entropy=entropy, expected_entropy=expected, mutual_info=(entropy - expected).clamp_min(0))
    else:
        fields.update(mean=total, variance=second / S)
    if return_logits:
        fields["logits"] = torch.stack(outputs)
    return fields
