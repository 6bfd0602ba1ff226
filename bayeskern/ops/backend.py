"""Which implementation of a hot path runs: ``reference``, ``triton`` or ``cpp``.

* ``reference`` -- plain PyTorch, the executable specification; any device and dtype.
* ``triton``    -- the kernels in ``kernels/``; CUDA tensors, or CPU tensors when Triton's
  interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported).
* ``cpp``       -- the extension built from ``csrc/`` (SIMD CPU kernels; CUDA kernels where built).

Automatic choice per device: CUDA -> triton, else cpp, else reference; CPU -> cpp, else reference.
Override with the ``BAYESKERN_BACKEND`` environment variable or ``use_backend(name)``.
float64 tensors always run the reference (the kernels compute in float32).
"""
from __future__ import annotations

import contextlib
import functools
import os
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

from . import extension

BACKENDS = ("reference", "triton", "cpp")
_override: ContextVar[str | None] = ContextVar("bayeskern_backend", default=None)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@functools.cache
def triton_version() -> tuple[int, ...] | None:
    """Triton's version if a usable one (>= 3.2) is installed, else None."""
    try:
        import triton
    except ImportError:
        return None
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    return version if version >= (3, 2) else None


def triton_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _serves(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "triton":
        if triton_version() is None:
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter())
    return device.type in ("cpu", "cuda") and extension.load() and (
        device.type == "cpu" or torch.cuda.is_available()
    )


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [name for name in BACKENDS if _serves(name, device)]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (raises if it cannot serve a tensor)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``BAYESKERN_BACKEND``, if any."""
    forced = _override.get()
    if forced is not None:
        return forced
    env = os.environ.get("BAYESKERN_BACKEND")
    return _check_name(env) if env else None


def resolve(tensor: torch.Tensor) -> str:
    """The backend that runs an op whose main input is ``tensor``."""
    if tensor.dtype == torch.float64:
        return "reference"
    forced = requested_backend()
    if forced is not None:
        if not _serves(forced, tensor.device):
            hint = (
                " (set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors)"
                if forced == "triton" and tensor.device.type == "cpu"
                else ""
            )
            raise RuntimeError(f"bayeskern backend {forced!r} cannot run on {tensor.device} tensors{hint}")
        return forced
    preference = ("triton", "cpp") if tensor.device.type == "cuda" else ("cpp",)
    for name in preference:
        if _serves(name, tensor.device):
            return name
    return "reference"


def kernels(name: str):
    """The kernel namespace of a compiled backend; both expose the schemas of csrc/bayeskern.cpp."""
    if name == "cpp":
        return getattr(torch.ops, extension.LIBRARY)
    if name == "triton":
        from bayeskern.kernels import noise

        return noise
    raise ValueError(f"backend {name!r} has no kernels")


def dispatch(op: str, main: torch.Tensor, args: tuple, reference: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``op`` on the backend chosen for ``main``: ``reference()``, or the kernel ``op(*args)``
    (tensors made contiguous, the layout every kernel expects)."""
    backend = resolve(main)
    if backend == "reference":
        return reference()
    args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
    return getattr(kernels(backend), op)(*args)
