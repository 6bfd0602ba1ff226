"""The vectorised path of the sampled predictive: K samples in one ``torch.func.vmap`` call over the
stacked random tensors (``sampling.py`` has the design and the automatic choice)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_leaves

from .base import _elements, _forward, _Reading, _Samples, _warn
from .last_layer import _PerSample
from .loop import _Runner

VECTOR_SHARE = 1 / 8  # vectorise automatically when the random tensors are at most this share of the module's bytes
VECTOR_BYTES = 1 << 30  # K samples per vectorised call: K * (random + activation bytes of a sample) at most this
LIVE_FACTOR = 4  # activation bytes of a sample: this many times its largest sample-dependent module output


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


def _is_batched(t: Tensor) -> bool:
    return bool(torch._C._functorch.is_batchedtensor(t))


def vectorizes(run: _Runner, call: _PerSample, samples: _Samples) -> bool:
    """Whether this batch's samples run vectorised (``sampling.py``'s module docstring)."""
    if run.vmap_failed or run.vectorize is False or not samples.random:
        return False
    if run.vectorize:
        return True
    per_element = run.activation_per_element.get(id(call.module), 0.0)
    activation = int(per_element * max(_elements((call.args, call.kwargs)), 1))
    return _vectorizes(samples.num_samples, samples.random_bytes, call.module_bytes, activation)


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
