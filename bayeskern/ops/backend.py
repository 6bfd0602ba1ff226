"""The one backend policy: which implementation of an op serves a call -- ``reference``, ``triton`` or ``cpp``.

* ``reference`` -- plain PyTorch, the executable specification; any device and dtype.
* ``triton``    -- the kernels in ``kernels/``; CUDA tensors, or CPU tensors when Triton's
  interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported).
* ``cpp``       -- the extension built from ``csrc/`` (SIMD CPU kernels; CUDA kernels where built).

Every op module asks ``backend_for(op, tensor, **facts)`` and runs the kernel namespace
``kernels(backend, op)``; no op module decides for itself.  ``POLICY`` declares, per op, on which
device types each compiled backend has a kernel, the dtypes those kernels take and the op's own
conditions on its other arguments (``facts``).  ``backend_for`` applies, in this order:

1. the op's conditions (``accepts``) fail, or the tensor's dtype is not one its kernels take
   (float64 never is: the kernels compute in float32) -> ``reference``;
2. a backend forced by ``use_backend(name)`` or ``BAYESKERN_BACKEND`` must be able to run on the
   tensor's device (else RuntimeError, naming ``TRITON_INTERPRET=1`` for Triton on CPU); it serves
   where the op has a kernel for it on that device, the reference elsewhere;
3. otherwise the first backend of ``PREFERENCE[device type]`` (CUDA: triton, then cpp; CPU: cpp)
   that has a kernel for the op on the device and can run there, else ``reference``.

For the fused draws (``gaussian_sample_kl``, ``weight_dropout_l2``) ``reference`` means the
per-tensor composition, whose ops then decide again one tensor at a time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from . import extension

BACKENDS = ("reference", "triton", "cpp")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # computed in float32, stored as given
PREFERENCE = {"cuda": ("triton", "cpp"), "cpu": ("cpp",)}  # the automatic order per device type
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
    return device.type in ("cpu", "cuda") and extension.load() and (device.type == "cpu" or torch.cuda.is_available())


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


def _check_forced(name: str, device: torch.device) -> None:
    if not _serves(name, device):
        hint = (
            " (set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors)"
            if name == "triton" and device.type == "cpu"
            else ""
        )
        raise RuntimeError(f"bayeskern backend {name!r} cannot run on {device} tensors{hint}")


# -- the op conditions: facts about a call beyond its main tensor -----------------------------------
def _fused_draw_accepts(
    tensor: torch.Tensor, tensors: Iterable[torch.Tensor] = (), prior_stds: Iterable[float | torch.Tensor] = ()
) -> bool:
    """One fused launch: every tensor (mus, prior means) of one dtype and device, float prior stds."""
    return all(t.dtype == tensor.dtype and t.device == tensor.device for t in tensors) and not any(
        isinstance(sp, torch.Tensor) for sp in prior_stds
    )


def _kl_accepts(tensor: torch.Tensor, prior_mean: torch.Tensor | None = None, prior_std: Any = 1.0) -> bool:
    """A float prior std and a prior mean absent (zero) or of ``mu``'s shape, dtype and device."""
    return not isinstance(prior_std, torch.Tensor) and (
        prior_mean is None
        or (
            prior_mean.shape == tensor.shape and prior_mean.dtype == tensor.dtype and prior_mean.device == tensor.device
        )
    )


def _dense_kernel_tensors(tensor: torch.Tensor, tensors: Iterable[torch.Tensor] = ()) -> bool:
    """Every tensor on CPU, contiguous, of a kernel dtype (the C++ finiteness scan reads them flat)."""
    return all(t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and t.is_contiguous() for t in tensors)


def _has_positions(tensor: torch.Tensor) -> bool:
    """Output gradients with a position axis ``(B, T, out)``, T > 1 (T = 1 is one exact GEMM)."""
    return tensor.dim() == 3 and tensor.shape[1] > 1


@dataclass(frozen=True)
class OpPolicy:
    """Which compiled backends implement an op, where, and for which calls."""

    kernels: Mapping[str, tuple[str, ...]]  # backend -> device types it has a kernel for the op on
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES  # dtypes of the main tensor the kernels take
    accepts: Callable[..., bool] | None = None  # the op's conditions on (tensor, **facts)
    triton_module: str | None = None  # kernels/<module>.py holds the op's Triton kernel


_ANY = ("cpu", "cuda")
_NOISE = OpPolicy({"triton": _ANY, "cpp": _ANY}, triton_module="noise")
_FUSED_DRAW = OpPolicy({"triton": _ANY, "cpp": ("cpu",)}, accepts=_fused_draw_accepts, triton_module="draw")
_IVON = OpPolicy({"triton": _ANY, "cpp": _ANY}, triton_module="ivon")
_KL = OpPolicy({"cpp": ("cpu",)}, dtypes=(torch.float32,), accepts=_kl_accepts)

POLICY: dict[str, OpPolicy] = {
    # elementwise Philox ops (``sample.py``, ``dropout.py``, ``noise.py``)
    "gaussian_sample": _NOISE,
    "gaussian_sample_backward": _NOISE,
    "weight_dropout": _NOISE,
    "weight_dropout_backward": _NOISE,
    "fill_normal_": _NOISE,
    "fill_uniform_": _NOISE,
    # the fused SGLD / pSGLD update (``sgld.py``) and its gradient check (C++ CPU scan, else aminmax)
    "sgld_step_": OpPolicy({"triton": _ANY, "cpp": _ANY}, triton_module="sgld"),
    "first_nonfinite": OpPolicy({"cpp": ("cpu",)}, accepts=_dense_kernel_tensors),
    # IVON's fused draw, gradient collection and update (``ivon.py``)
    "ivon_draw_": _IVON,
    "ivon_collect_": _IVON,
    "ivon_update_": _IVON,
    # the fused training draws (``draw.py``): Triton, or the C++ CPU kernels (the CUDA build has none)
    "gaussian_sample_kl": _FUSED_DRAW,
    "gaussian_sample_kl_backward": _FUSED_DRAW,
    "weight_dropout_l2": _FUSED_DRAW,
    "weight_dropout_l2_backward": _FUSED_DRAW,
    # the Gaussian KL (``kl.py``): the C++ CPU kernel for float32 and a float prior std
    "gaussian_kl": _KL,
    "gaussian_kl_backward": _KL,
    # squared per-example gradients (``fisher.py``): Triton for a position axis, automatically on CUDA
    # only (on CPU when forced); no C++ kernel (MKL's GEMMs in the reference beat one)
    "sq_grad_accumulate": OpPolicy({"triton": _ANY}, accepts=_has_positions, triton_module="fisher"),
}


def backend_for(op: str, tensor: torch.Tensor, **facts: Any) -> str:
    """The backend that runs ``op`` on a call whose main input is ``tensor`` (see the module docstring).

    ``facts`` are the op's other arguments its conditions read (``POLICY[op].accepts``); omitted
    ones count as met, so a kernel that is already running can ask again with the tensor alone.
    """
    policy = POLICY[op]
    if policy.accepts is not None and not policy.accepts(tensor, **facts):
        return "reference"
    if tensor.dtype not in policy.dtypes:
        return "reference"
    device = tensor.device
    forced = requested_backend()
    if forced is not None:
        _check_forced(forced, device)
        return forced if device.type in policy.kernels.get(forced, ()) else "reference"
    for name in PREFERENCE.get(device.type, ()):
        if device.type in policy.kernels.get(name, ()) and _serves(name, device):
            return name
    return "reference"


def kernels(backend: str, op: str | None = None) -> Any:
    """The namespace holding ``op``'s kernel on a compiled ``backend`` (without ``op``: the noise ops').

    ``cpp``: the extension's operator library (the schemas of ``csrc/bayeskern.cpp``); ``triton``:
    the module of ``kernels/`` named by the op's policy, with the same signatures.
    """
    if backend == "cpp":
        return getattr(torch.ops, extension.LIBRARY)
    if backend == "triton":
        module = POLICY[op].triton_module if op is not None else "noise"
        if module is None:
            raise ValueError(f"op {op!r} has no Triton kernel")
        return importlib.import_module(f"bayeskern.kernels.{module}")
    raise ValueError(f"backend {backend!r} has no kernels")


def dispatch(op: str, main: torch.Tensor, args: tuple, reference: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``op`` on the backend chosen for ``main``: ``reference()``, or the kernel ``op(*args)``
    (tensors made contiguous, the layout every kernel expects)."""
    backend = backend_for(op, main)
    if backend == "reference":
        return reference()
    args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
    out: torch.Tensor = getattr(kernels(backend, op), op)(*args)
    return out
