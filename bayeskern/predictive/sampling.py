"""The sampled ("nn") predictive: ``predict(posterior, inputs, pred_type="nn", num_samples=...)``.

Works for any posterior obeying ``bayeskern.protocol.Posterior``, which declares everything read here
(``model``, ``sample``, ``fixed_tensors``, ``likelihood``, ``noise_std``, ``output_fn``,
``is_sharded``, ``functional_forward``): sample ``s`` is the network run through
``torch.func.functional_call`` with ``{**model params and buffers, **posterior.fixed_tensors(),
**posterior.sample(s)}``, in eval mode, without gradients.  The tensors that differ between samples
are exactly the keys of ``sample(s)`` (the Bayesian ones).  A posterior sharded with FSDP2
(``is_sharded``, ``bayeskern.distributed.fully_shard``) runs its own ``functional_forward`` per
sample instead, eagerly and one sample at a time, on every rank (the sharded model gathers its
blocks in its forward); ``compile`` does not apply to it and ``vectorize=True`` warns.

Inputs: a Tensor, a tuple (positional inputs) or a Mapping (keyword inputs) is one batch of model
inputs, called as ``bayeskern.batches.as_call`` says; anything else iterable (a list, a
``DataLoader``, a generator) yields loader batches (``bayeskern.batches``: inputs, ``(inputs,
targets, ...)``, Mappings with ``labels``).  A tuple is never a sequence of batches.

Classification (``p_s = softmax(f_s(x))``, S samples):

* ``probs = (1/S) sum_s p_s``;
* ``entropy = H[probs]`` (total uncertainty), ``expected_entropy = (1/S) sum_s H[p_s]`` (aleatoric),
  ``mutual_info = entropy - expected_entropy`` (epistemic, the BALD score).

Regression: ``mean = (1/S) sum_s f_s(x)``, ``variance = (1/S) sum_s (f_s(x) - mean)^2 + noise_std^2``
(Welford's running update), ``noise_std`` the posterior's unless given.

Speed: the compiled engine calls one function ``(module, [params of K samples], inputs) -> K
outputs``, compiled with ``torch.compile`` once per model and called S / K times; parameters enter as
tensors, so new samples never recompile (a last, smaller batch may compile once more with a dynamic
batch size).  Each model gets its own compiled function (its own code object, so dynamo's cache and
its recompile limit are the model's), held in a ``weakref.WeakKeyDictionary`` keyed by the model:
it goes when the model goes.  K is the largest divisor of S up to ``CHUNK_SAMPLES`` whose K samples'
random tensors fit in ``CHUNK_BYTES``: small networks, whose forwards cost less than the Python around
them, run several samples per call, larger ones one (several large samples per call lose their
activations' cache locality; benchmarks/README.md has the measurements).  If compilation or the
compiled call fails, or dynamo reaches its recompile limit (which it is told to raise rather than
run eagerly in silence), the engine warns and runs eagerly, one sample at a time.

Vectorised path: when the random tensors are a small part of the network (LoRA adapters, a head
that the last-layer path below cannot split off), K samples run in one call with the samples in a
leading batch dimension: ``torch.func.vmap`` over ``sample -> forward({**frozen, **sample})`` with
the K samples' random tensors stacked (in_dims 0) and the inputs and every other tensor shared; the
forward is that of the module run per sample (the head where the last-layer path below applies).
Everything computed before the first random tensor (embeddings, a frozen body) runs once per chunk,
unbatched, and every frozen weight is read once per chunk instead of K times; the per-op overhead
(Python, kernel launches) is paid once per chunk too.  The results equal the loop's to float rounding
(the same ops, batched).  Automatic choice (``vectorize=None``; ``_vectorizes``): vectorise when the
random tensors take at most ``VECTOR_SHARE`` of the bytes of the module run per sample (its
parameters and buffers, random ones included) and a chunk of at least two samples fits
``VECTOR_BYTES``.  Why: per chunk of K samples the vectorised call reads ``(1 - f + K f) W`` bytes of
weights against the loop's ``K W`` (f the random share, W the module's bytes) and does the same
flops, so with f <= 1/8 and K >= 8 it reads at most about a quarter as much; when f is large (all
weights random) there is little to share, its K-fold activations only cost memory and the loop,
which can be compiled, is used.  The vectorised call is not compiled (compiling a vmapped
transformer is slow and is not what makes the vectorised path pay; benchmarks/README.md); CPU
attention runs through the math kernel of ``scaled_dot_product_attention``, which has a batching
rule.  ``vectorize=True`` forces it, ``False`` forbids it.  If vmap cannot run the model (an op
without a batching rule, control flow on a sample-dependent value, random ops in eval mode, an
in-place update of a shared tensor with a sample-dependent one) the engine warns once and runs the
loop for the rest of the call; an output of the wrong shape (``bayeskern.batches.logits_of``)
raises its ValueError, as the loop would.

K for the vectorised path: the largest K <= S with ``K * (random bytes + activation bytes of one
sample) <= VECTOR_BYTES``, the S samples cut into equal chunks of at most K.  The activation bytes of
one sample are measured on every vectorised call: ``LIVE_FACTOR`` times the largest sample-dependent
module output (a no-grad forward holds about that many tensors of the largest size at once: the
residual, an op's input, its output and a temporary), per element of the call's inputs, and scaled
to the next batch's inputs.  The measuring forward hooks sit on the modules of the module run per
sample only, for the duration of the call (no process-wide hook).  The first vectorised call of a
``predict`` has no measurement yet and is bounded by the random bytes alone; an out-of-memory error
(``torch.OutOfMemoryError``, on a GPU) halves K and retries.

Last-layer posteriors: the random tensors often all lie in one submodule, the head.  When the model
returns that submodule's output untouched, the rest of the network does not depend on the sample:
it runs once per batch, the head's inputs are captured with a forward hook, and only the head runs
S times.  Checked on every batch: the head must run exactly once, its output must be the model's
output, unmodified, and its inputs must hold no NaN with the random tensors set to NaN for that
forward (so the rest of the network did not read them); otherwise the engine warns, naming the
failed condition, and the whole network runs per sample, for this batch and the next ones.  A
container that is never called itself (the ``ModuleList`` holding every LoRA'd layer) is no head:
the check is skipped.

Memory: inputs run in batches of ``batch_size`` (or as the loader yields them); the S samples are
drawn once and reused for every batch when they fit in ``SAMPLE_CACHE_BYTES``; beyond it, the first
samples that fit stay cached and the others are redrawn for every batch (``sample`` is deterministic
in its index), so memory stays within the budget plus at most three samples (compiled: plus one
chunk, at most ``CHUNK_BYTES`` of random tensors or one sample; vectorised: plus one chunk's stacked
random tensors and activations, within ``VECTOR_BYTES`` once measured).  A tensor predicted in one batch
draws every sample once anyway, so nothing is cached: each sample is freed once used.

Fallbacks: every fallback from a faster path to a slower one that gives the same results warns,
with a ``RuntimeWarning`` naming its reason, once per ``predict`` call (the faster path is not tried
again in that call): compilation (or a recompile limit) to eager, vmap to the loop, the last-layer
path to the whole network, and ``vectorize=True`` on a sharded posterior.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor

from ..batches import OutputFn, batch_length, move_to
from ..protocol import Posterior
from .base import Prediction, _batches, _entropy, _is_one_batch, _read, _Reading, _Samples, _state, _warn
from .last_layer import _Target
from .loop import _chunk_size, _Runner
from .vectorized import _vectorized_results, vectorizes


@torch.no_grad()
def predict_sampled(
    posterior: Posterior,
    inputs: Any,
    *,
    num_samples: int,
    compile: bool,
    vectorize: bool | None,
    batch_size: int | None,
    return_logits: bool,
    likelihood: str,
    noise_std: float,
    output_fn: OutputFn | None,
) -> Prediction:
    """The sampled predictive with ``num_samples`` posterior samples (module docstring), arguments as
    ``bayeskern.predict`` checked and resolved them.  ``compile=False`` runs the per-sample loop
    eagerly; results agree with the compiled run to float rounding.  ``vectorize`` runs several samples
    per call under ``torch.func.vmap`` (True), never (False) or where the random tensors are a small
    part of the model (None; module docstring); results agree with the loop's to float rounding.  A
    fallback to a slower path (module docstring, "Fallbacks") warns once per call."""
    if vectorize is not None and not isinstance(vectorize, bool):
        raise ValueError(f"vectorize must be True, False or None, got {vectorize!r}")
    one_batch = _is_one_batch(inputs)
    model = posterior.model
    classification = likelihood == "classification"
    was_training = model.training
    model.eval()
    try:
        sharded = posterior.is_sharded
        if sharded and vectorize:
            _warn(
                "vectorize=True: a sharded posterior runs one sample at a time (functional_forward); "
                "predicting without vmap"
            )
        base = {} if sharded else {**_state(model), **posterior.fixed_tensors()}
        model_device = next((t.device for t in base.values()), torch.device("cpu"))
        single_batch = one_batch and (batch_size is None or batch_length(inputs) <= batch_size)
        samples = _Samples(posterior, num_samples, model_device, cache=not single_batch)
        target = _Sharded(posterior) if sharded else _Target(model, base, samples, model_device)
        run = _Runner(compile, vectorize)
        parts = [
            _predict_batch(x, samples, run, target, _Reading(x, output_fn, classification), return_logits)
            for x in (move_to(batch, samples.device) for batch in _batches(inputs, one_batch, batch_size))
        ]
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("inputs holds no batch")
    fields = {key: torch.cat([part[key] for part in parts], dim=1 if key == "logits" else 0) for key in parts[0]}
    if not classification:
        fields["variance"] = fields["variance"] + noise_std**2
    return Prediction(**fields)


class _Sharded:
    """The per-sample call of a posterior sharded with FSDP2 (``bayeskern.distributed.fully_shard``):
    the sample's shards are written into the sharded model, whose forward gathers them block by block
    (``functional_forward``); one sample at a time, eagerly (a collective: every rank predicts)."""

    def __init__(self, posterior: Posterior) -> None:
        self.posterior = posterior

    def run(self, sample: dict[str, Tensor], x: Any, reading: _Reading) -> tuple[Tensor, ...]:
        return _read(self.posterior.functional_forward(sample, x), reading)


def _results(
    x: Any, samples: _Samples, run: _Runner, target: _Target, reading: _Reading
) -> Iterable[tuple[Tensor, ...]]:
    """The per-sample results of one batch: vectorised, or the loop in chunks (module docstring)."""
    call = target.per_sample(x)
    if vectorizes(run, call, samples):
        return _vectorized_results(run, call, samples, reading)
    S = samples.num_samples
    chunk = _chunk_size(S, samples.random_bytes) if run.compiled else 1
    return (
        result
        for start in range(0, S, chunk)
        for result in run(
            call.module,
            [call.params(samples[s]) for s in range(start, start + chunk)],
            call.args,
            call.kwargs,
            reading,
        )
    )


def _predict_batch(
    x: Any, samples: _Samples, run: _Runner, target: _Target | _Sharded, reading: _Reading, return_logits: bool
) -> dict[str, Tensor]:
    classification = reading.classification
    S = samples.num_samples
    outputs: list[Tensor] = []
    total: Tensor | float = 0.0
    second: Tensor | float = 0.0  # classification: sum of H[p_s]; regression: Welford's M2
    if isinstance(target, _Sharded):
        results: Iterable[tuple[Tensor, ...]] = (target.run(samples[s], x, reading) for s in range(S))
    else:
        results = _results(x, samples, run, target, reading)
    for s, result in enumerate(results):
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
    # S >= 1 samples were accumulated, so both running sums are tensors by now.
    total_t, second_t = cast(Tensor, total), cast(Tensor, second)
    fields: dict[str, Tensor] = {}
    if classification:
        probs = total_t / S
        entropy = _entropy(probs)
        expected = second_t / S
        fields.update(
            probs=probs, entropy=entropy, expected_entropy=expected, mutual_info=(entropy - expected).clamp_min(0)
        )
    else:
        fields.update(mean=total_t, variance=second_t / S)
    if return_logits:
        fields["logits"] = torch.stack(outputs)
    return fields
