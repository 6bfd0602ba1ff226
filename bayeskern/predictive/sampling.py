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

import contextlib
import math
import os
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_leaves

from ..batches import OutputFn, as_call, batch_length, inputs_of, logits_of, move_to, split_inputs
from ..protocol import Posterior

SAMPLE_CACHE_BYTES = 1 << 30
CHUNK_SAMPLES = 32  # at most this many samples per compiled call (the graph grows with it)
CHUNK_BYTES = 4 << 20  # ... whose random tensors take at most this many bytes together
VECTOR_SHARE = 1 / 8  # vectorise automatically when the random tensors are at most this share of the module's bytes
VECTOR_BYTES = 1 << 30  # K samples per vectorised call: K * (random + activation bytes of a sample) at most this
LIVE_FACTOR = 4  # activation bytes of a sample: this many times its largest sample-dependent module output


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


def _forward_chunk(
    module: nn.Module, params: list[dict[str, Tensor]], args: tuple, kwargs: dict[str, Any], reading: _Reading
) -> list[tuple[Tensor, ...]]:
    """``_forward`` for each of several samples (compiled, one graph for all of them)."""
    return [_forward(module, p, args, kwargs, reading) for p in params]


class _Runner:
    """Calls ``_forward_chunk`` compiled (once per model/shape/chunk size) or ``_forward`` once per
    sample eagerly; falls back to eager, with a warning, if compilation or the compiled call fails.
    ``vectorize`` (None: automatic, see ``_vectorizes``) and the activation measurements govern the
    vectorised path (``_vectorized_results``), dropped for the loop, with a warning, if vmap fails."""

    def __init__(self, compile: bool, vectorize: bool | None = None) -> None:
        self.compiled = compile
        self.vectorize = vectorize
        self.vmap_failed = False
        self.activation_per_element: dict[int, float] = {}  # per module run: bytes per sample and input element

    def vectorizes(self, call: _PerSample, samples: _Samples) -> bool:
        """Whether this batch's samples run vectorised (module docstring)."""
        if self.vmap_failed or self.vectorize is False or not samples.random:
            return False
        if self.vectorize:
            return True
        per_element = self.activation_per_element.get(id(call.module), 0.0)
        activation = int(per_element * max(_elements((call.args, call.kwargs)), 1))
        return _vectorizes(samples.num_samples, samples.random_bytes, call.module_bytes, activation)

    def __call__(
        self,
        module: nn.Module,
        params: list[dict[str, Tensor]],
        args: tuple,
        kwargs: dict[str, Any],
        reading: _Reading,
    ) -> list[tuple[Tensor, ...]]:
        if self.compiled:
            try:
                with _strict_dynamo():
                    return _compiled(module)(module, params, args, kwargs, reading)
            except Exception as err:  # any compiler error, the recompile limit: predicting must still work
                message = f"torch.compile failed ({type(err).__name__}: {err}); predicting eagerly"
                _warn(message)
                self.compiled = False
        return [_forward(module, p, args, kwargs, reading) for p in params]


_ChunkFn = Callable[..., list[tuple[Tensor, ...]]]
_COMPILED: weakref.WeakKeyDictionary[nn.Module, _ChunkFn] = weakref.WeakKeyDictionary()


def _compiled(module: nn.Module) -> _ChunkFn:
    """``module``'s own compiled ``_forward_chunk``, made on first use and held while ``module`` lives.

    Dynamo keeps its compiled graphs, and counts recompilations against ``recompile_limit``, per code
    object; a copy of ``_forward_chunk``'s code per module keeps one model's graphs (and shapes) from
    using up another's limit."""
    compiled = _COMPILED.get(module)
    if compiled is None:
        code = _forward_chunk.__code__.replace()  # a new code object: a cache of its own
        own = types.FunctionType(code, _forward_chunk.__globals__, _forward_chunk.__name__)
        # Inductor's layout optimisation would convert every conv weight to channels-last on each call,
        # and the weights here are inputs (a new sample each call): off.
        compiled = torch.compile(own, options={"layout_optimization": False})
        _COMPILED[module] = compiled
    return compiled


def _strict_dynamo() -> contextlib.AbstractContextManager[Any]:
    """Dynamo told to raise at its recompile limit instead of running the frame eagerly in silence
    (``_Runner`` then warns); a no-op on a torch without that setting."""
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        patch: contextlib.AbstractContextManager[Any] = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
        return patch
    return contextlib.nullcontext()


def _forward_vmapped(
    module: nn.Module,
    base: dict[str, Tensor],
    stacked: dict[str, Tensor],
    args: tuple,
    kwargs: dict[str, Any],
    reading: _Reading,
) -> tuple[Tensor, ...]:
    """``_forward`` of K samples at once: vmap over the stacked random tensors (leading dimension K),
    everything else shared; the results carry a leading dimension K."""

    def one(sample: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return _forward(module, {**base, **sample}, args, kwargs, reading)

    return vmap(one, randomness="error")(stacked)


def _vectorizes(num_samples: int, random_bytes: int, module_bytes: int, activation_bytes: int = 0) -> bool:
    """The automatic choice of the vectorised path (module docstring): the random tensors take at most
    ``VECTOR_SHARE`` of the module's bytes and a chunk of at least two samples fits ``VECTOR_BYTES``."""
    return (
        num_samples > 1
        and random_bytes <= VECTOR_SHARE * module_bytes
        and _vector_chunk(num_samples, random_bytes, activation_bytes) >= 2
    )


def _vector_chunk(num_samples: int, random_bytes: int, activation_bytes: int) -> int:
    """Samples per vectorised call: the most, up to S, whose random tensors and activations fit in
    ``VECTOR_BYTES``, at least 1."""
    return max(1, min(num_samples, VECTOR_BYTES // max(random_bytes + activation_bytes, 1)))


def _elements(value: Any) -> int:
    return sum(t.numel() for t in tree_leaves(value) if isinstance(t, Tensor))


def _bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _is_batched(t: Tensor) -> bool:
    return bool(torch._C._functorch.is_batchedtensor(t))


def _chunk_size(num_samples: int, sample_bytes: int) -> int:
    """Samples per compiled call: the largest divisor of S (one graph for the whole call) up to
    ``CHUNK_SAMPLES`` whose samples fit in ``CHUNK_BYTES``, at least 1."""
    most = max(1, min(CHUNK_SAMPLES, CHUNK_BYTES // max(sample_bytes, 1)))
    return max(k for k in range(1, most + 1) if num_samples % k == 0)


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


def _owner(names: Iterable[str]) -> str:
    """The dotted path of the deepest module holding every named tensor ("" for the root)."""
    paths = [name.split(".")[:-1] for name in names]
    common = paths[0] if paths else []
    for path in paths[1:]:
        k = 0
        while k < min(len(common), len(path)) and common[k] == path[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


@dataclass
class _PerSample:
    """One batch's per-sample call: ``module(*args, **kwargs)`` with ``base`` updated by a sample's
    tensors under ``prefix`` (the module's path in the model, with its dot; "" for the model)."""

    module: nn.Module
    base: dict[str, Tensor]
    prefix: str
    args: tuple
    kwargs: dict[str, Any]
    module_bytes: int  # of the module's tensors in ``base`` (random ones included)

    def params(self, drawn: dict[str, Tensor]) -> dict[str, Tensor]:
        cut = len(self.prefix)
        return {**self.base, **{name[cut:]: t for name, t in drawn.items() if name.startswith(self.prefix)}}


class _Target:
    """What runs per sample: the whole model on the batch, or (see the module docstring) the
    submodule owning every random tensor of the samples on the inputs it gets in one forward."""

    def __init__(
        self, model: nn.Module, base: dict[str, Tensor], samples: _Samples, model_device: torch.device
    ) -> None:
        self.model, self.base = model, base
        self.model_bytes = _bytes(base.values())
        path = _owner(samples.random)
        first = samples[0]  # held or cached: not drawn again
        floating = all(t.is_floating_point() for t in first.values())
        self.head = model.get_submodule(path) if path and floating and model_device == samples.device else None
        if self.head is not None and type(self.head).forward is nn.Module.forward:
            self.head = None  # a container that is never called (ModuleList of LoRA'd layers): no head
        if self.head is not None:
            # the body runs with the random tensors all NaN: a head input with a NaN used them
            poisoned = {n: torch.full_like(t, math.nan) for n, t in first.items()}
            self.body_params = {**self.base, **poisoned}
            self.path, self.prefix = path, path + "."
            self.head_base = {n[len(self.prefix) :]: t for n, t in base.items() if n.startswith(self.prefix)}
            self.head_bytes = _bytes(self.head_base.values())

    def per_sample(self, x: Any) -> _PerSample:
        args, kwargs = as_call(x)
        if self.head is not None:
            captured = _submodule_inputs(self.model, self.body_params, self.head, args, kwargs)
            if not isinstance(captured, str):
                return _PerSample(self.head, self.head_base, self.prefix, *captured, self.head_bytes)
            _warn(
                f"last-layer prediction: {self.path!r} holds every random tensor but {captured}; "
                "running the whole network per sample"
            )
            self.head = None  # the check failed: run the whole network from now on
        return _PerSample(self.model, self.base, "", args, kwargs, self.model_bytes)


def _submodule_inputs(
    model: nn.Module, params: dict[str, Tensor], head: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]] | str:
    """The args and kwargs ``head`` gets in one forward of ``model`` (with ``params``) on ``x``, if
    the model returns the output of that one call of ``head`` unmodified and its inputs hold no NaN;
    else the condition that failed, as a clause ("it ran 2 times in one forward")."""
    calls: list[tuple[tuple, dict[str, Any], Any, int]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        calls.append((args, kwargs, output, getattr(output, "_version", -1)))

    handle = head.register_forward_hook(capture, with_kwargs=True)
    try:
        out = functional_call(model, params, args, kwargs)
    finally:
        handle.remove()
    if len(calls) != 1:
        return f"it ran {len(calls)} times in one forward"
    if calls[0][2] is not out or not isinstance(out, Tensor):
        return "the model does not return its output as it is"
    if out._version != calls[0][3]:
        return "the model modifies its output in place"
    args, kwargs = calls[0][0], calls[0][1]
    if any(t.is_floating_point() and t.isnan().any() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)):
        return "its inputs depend on the random tensors"
    return args, kwargs


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
    if run.vectorizes(call, samples):
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


def _vectorized_results(
    run: _Runner, call: _PerSample, samples: _Samples, reading: _Reading
) -> Iterator[tuple[Tensor, ...]]:
    """The per-sample results of the vectorised path, chunk by chunk (module docstring); if vmap fails,
    a warning and the loop for the samples left."""
    S, key = samples.num_samples, id(call.module)
    elements = max(_elements((call.args, call.kwargs)), 1)
    cut = len(call.prefix)
    on_cpu = next((t.device for t in call.base.values()), samples.device).type == "cpu"
    start, most = 0, S
    while start < S:
        activation = int(run.activation_per_element.get(key, 0.0) * elements)
        k = min(most, _vector_chunk(S, samples.random_bytes, activation))
        k = math.ceil((S - start) / math.ceil((S - start) / k))  # equal chunks of at most k
        drawn = [samples[s] for s in range(start, start + k)]
        stacked = {
            name[cut:]: torch.stack([d[name] for d in drawn]) for name in drawn[0] if name.startswith(call.prefix)
        }
        del drawn
        largest = 0

        def measure(module: nn.Module, args: Any, output: Any) -> None:
            nonlocal largest
            for t in tree_leaves(output):
                if isinstance(t, Tensor) and _is_batched(t):  # logical (one sample's) size
                    largest = max(largest, t.numel() * t.element_size())

        handles = [module.register_forward_hook(measure) for module in call.module.modules()]
        try:
            # CPU flash attention has no batching rule (vmap would loop over the samples): the math kernel has
            with sdpa_kernel([SDPBackend.MATH]) if on_cpu else contextlib.nullcontext():
                out = _forward_vmapped(call.module, call.base, stacked, call.args, call.kwargs, reading)
        except ValueError:  # the outputs' shape (``logits_of``): the loop would raise it too
            raise
        except torch.OutOfMemoryError:
            if k == 1:
                raise
            most = k // 2
            continue
        except Exception as err:  # no batching rule, data-dependent control flow, ...: the loop still works
            _warn(f"torch.func.vmap failed ({type(err).__name__}: {err}); predicting one sample at a time")
            run.vmap_failed = True
            for s in range(start, S):
                yield from run(call.module, [call.params(samples[s])], call.args, call.kwargs, reading)
            return
        finally:
            for handle in handles:
                handle.remove()
        del stacked
        measured = LIVE_FACTOR * largest / elements
        run.activation_per_element[key] = max(run.activation_per_element.get(key, 0.0), measured)
        yield from zip(*(t.unbind(0) for t in out))
        start += k
