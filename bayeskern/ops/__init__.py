"""The kernel boundary: bayeskern's hot paths as differentiable, compile-friendly custom ops.

Each op has a PyTorch reference (the specification) and Triton / C++ (CPU SIMD, CUDA) kernels;
``backend.backend_for``, the one backend policy, picks one per call (see ``use_backend``).  Noise is
counter-based Philox keyed by (seed, offset + element index, stream), identical on every backend
(``philox.py``).
"""

from . import noise, philox
from .backend import BACKENDS, available_backends, use_backend
from .draw import gaussian_sample_kl, weight_dropout_l2
from .dropout import reference_weight_dropout, weight_dropout
from .extension import release_cached_memory
from .fisher import reference_sq_grad_accumulate, sq_grad_accumulate
from .host_memory import retain_freed_memory
from .ivon import ivon_collect_, ivon_draw_, ivon_update_
from .kl import gaussian_kl, reference_gaussian_kl
from .sample import gaussian_sample, reference_gaussian_sample
from .sgld import first_nonfinite, reference_sgld_step_, sgld, sgld_step_

__all__ = [
    "BACKENDS",
    "available_backends",
    "first_nonfinite",
    "gaussian_kl",
    "gaussian_sample",
    "gaussian_sample_kl",
    "ivon_collect_",
    "ivon_draw_",
    "ivon_update_",
    "noise",
    "philox",
    "reference_gaussian_kl",
    "reference_gaussian_sample",
    "reference_sgld_step_",
    "reference_sq_grad_accumulate",
    "reference_weight_dropout",
    "release_cached_memory",
    "retain_freed_memory",
    "sgld",
    "sgld_step_",
    "sq_grad_accumulate",
    "use_backend",
    "weight_dropout",
    "weight_dropout_l2",
]
