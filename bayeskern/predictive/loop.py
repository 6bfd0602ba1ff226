"""The per-sample loop of the sampled predictive: K samples per ``torch.compile``d call (one compiled
function per model, held weakly), or one sample per eager call (``sampling.py`` has the design)."""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .base import _forward, _Reading, _warn

CHUNK_SAMPLES = 32  # at most this many samples per compiled call (the graph grows with it)
CHUNK_BYTES = 4 << 20  # ... whose random tensors take at most this many bytes together


def _forward_chunk(
    module: nn.Module, params: list[dict[str, Tensor]], args: tuple, kwargs: dict[str, Any], reading: _Reading
) -> list[tuple[Tensor, ...]]:
    """``_forward`` for each of several samples (compiled, one graph for all of them)."""
    return [_forward(module, p, args, kwargs, reading) for p in params]


class _Runner:
    """Calls ``_forward_chunk`` compiled (once per model/shape/chunk size) or ``_forward`` once per
    sample eagerly; falls back to eager, with a warning, if compilation or the compiled call fails.
    ``vectorize`` (None: automatic) and the activation measurements are the state of the vectorised
    path (``vectorized.py``), dropped for the loop, with a warning, if vmap fails."""

    def __init__(self, compile: bool, vectorize: bool | None = None) -> None:
        self.compiled = compile
        self.vectorize = vectorize
        self.vmap_failed = False
        self.activation_per_element: dict[int, float] = {}  # per module run: bytes per sample and input element

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


def _chunk_size(num_samples: int, sample_bytes: int) -> int:
    """Samples per compiled call: the largest divisor of S (one graph for the whole call) up to
    ``CHUNK_SAMPLES`` whose samples fit in ``CHUNK_BYTES``, at least 1."""
    most = max(1, min(CHUNK_SAMPLES, CHUNK_BYTES // max(sample_bytes, 1)))
    return max(k for k in range(1, most + 1) if num_samples % k == 0)
