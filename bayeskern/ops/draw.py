"""The training draws of VI and MC-dropout, each one op over every Bayesian tensor with its prior term.

Tensor k sits at Philox element ``offsets[k]`` (noise as in ``gaussian_sample`` / ``weight_dropout``),
has prior ``N(m0_k, sp_k^2)`` (``m0_k`` None: zero) and receives the gradient ``g_k``; the prior
term receives ``g_t``.

``gaussian_sample_kl`` (VI), with ``s_k = softplus(rho_k)`` and normals ``eps_k``:

    w_k = mu_k + s_k * eps_k,        term = sum_k KL(N(mu_k, s_k^2) || N(m0_k, sp_k^2))   (``gaussian_kl``)
    grad_mu_k  = g_k + g_t * (mu_k - m0_k) / sp_k^2
    grad_rho_k = sigmoid(rho_k) * (g_k * eps_k + g_t * (s_k / sp_k^2 - 1 / s_k))

``weight_dropout_l2`` (MC-dropout), with ``keep_k = u_k >= p``:

    w_k = keep_k * mu_k / (1 - p)  or, with ``fill_prior``, keep_k * mu_k + (1 - keep_k) * m0_k
    term = sum_k (1 - p) ||mu_k - m0_k||^2 / (2 sp_k^2)
    grad_mu_k = keep_k * scale * g_k + g_t * (1 - p) * (mu_k - m0_k) / sp_k^2     (scale 1 with fill_prior)

The kernels make one pass over all tensors each way (Triton: ``kernels/draw.py``, one launch; C++ CPU:
``csrc/cpu/draw_kernels.cpp``): drawing and regularising separately reads the parameters four times,
adds two gradients per parameter and dispatches 4K ops instead of 2.  The backward regenerates the
noise, except the C++ CPU kernel on float32 VI tensors: it takes ``eps = (w - mu) / s`` from the drawn
weights (saved from the forward; the layers that read them hold them anyway) over every SIMD step of
64 elements whose ``|w| <= 256 s``, which differs from the regenerated eps by at most about
``2^-16 + 2^-22 |eps|``.  On a CPU, Philox and Box-Muller are most of that backward's arithmetic; on
a GPU regenerating is the cheaper way.  Where the fused kernels do not serve (``backend.POLICY``:
float64, tensor-valued ``sp``, mixed dtypes or devices, the ``reference`` backend, the C++ backend
on CUDA) the per-tensor ops give the same values.  In eager mode the C++ CPU kernels are called
through a plain ``autograd.Function`` (``_Eager*``), skipping the custom ops' boxing of every tensor
list through the dispatcher and pytree each way; the custom ops serve Triton and torch.compile.
The prior term is float32 (float64 for float64 tensors): a sum over millions of weights overflows
float16.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from . import philox
from .backend import backend_for, kernels
from .checks import check_floating, check_index, check_same_layout
from .dropout import check_probability, weight_dropout
from .kl import gaussian_kl
from .sample import gaussian_sample


# -- VI ---------------------------------------------------------------------------------------------
def _gaussian_forward_kernel(
    mus: list[Tensor],
    rhos: list[Tensor],
    prior_means: list[Tensor | None],
    prior_stds: list[float],
    seed: Tensor,
    offsets: list[int],
    stream: int,
) -> tuple[list[Tensor], Tensor]:
    kernel = _kernels("gaussian_sample_kl", mus[0])
    out: tuple[list[Tensor], Tensor] = kernel.gaussian_sample_kl(
        mus, rhos, prior_means, prior_stds, int(seed), offsets, stream
    )
    return out


_gaussian_sample_kl = torch.library.custom_op("bayeskern::gaussian_sample_kl", mutates_args=())(
    _gaussian_forward_kernel
)


@_gaussian_sample_kl.register_fake
def _(
    mus: list[Tensor],
    rhos: list[Tensor],
    prior_means: list[Tensor | None],
    prior_stds: list[float],
    seed: Tensor,
    offsets: list[int],
    stream: int,
) -> tuple[list[Tensor], Tensor]:
    return [mu.new_empty(mu.shape) for mu in mus], mus[0].new_empty((), dtype=torch.float32)


def _gaussian_backward_kernel(
    grads: list[Tensor],
    grad_kl: Tensor,
    mus: list[Tensor],
    rhos: list[Tensor],
    samples: list[Tensor],
    prior_means: list[Tensor | None],
    prior_stds: list[float],
    seed: Tensor,
    offsets: list[int],
    stream: int,
) -> tuple[list[Tensor], list[Tensor]]:
    grads = [g.contiguous() for g in grads]
    args = (prior_means, prior_stds, int(seed), offsets, stream)
    backend = backend_for("gaussian_sample_kl_backward", mus[0])
    kernel = kernels(backend, "gaussian_sample_kl_backward")
    out: tuple[list[Tensor], list[Tensor]]
    if backend == "triton":  # regenerates the noise: no samples
        out = kernel.gaussian_sample_kl_backward(grads, grad_kl, mus, rhos, *args)
    else:
        out = kernel.gaussian_sample_kl_backward(grads, grad_kl, mus, rhos, samples, *args)
    return out


_gaussian_sample_kl_backward = torch.library.custom_op("bayeskern::gaussian_sample_kl_backward", mutates_args=())(
    _gaussian_backward_kernel
)


@_gaussian_sample_kl_backward.register_fake
def _(
    grads: list[Tensor],
    grad_kl: Tensor,
    mus: list[Tensor],
    rhos: list[Tensor],
    samples: list[Tensor],
    prior_means: list[Tensor | None],
    prior_stds: list[float],
    seed: Tensor,
    offsets: list[int],
    stream: int,
) -> tuple[list[Tensor], list[Tensor]]:
    return [mu.new_empty(mu.shape) for mu in mus], [rho.new_empty(rho.shape) for rho in rhos]


def _setup_gaussian(ctx: Any, inputs: tuple[Any, ...], output: tuple[list[Tensor], Tensor]) -> None:
    mus, rhos, prior_means, prior_stds, seed, offsets, stream = inputs
    # the C++ CPU backward takes the noise from the samples (held by the layers that read them anyway)
    samples = output[0] if backend_for("gaussian_sample_kl", mus[0]) == "cpp" else []
    _save(ctx, [*mus, *rhos, *samples], prior_means, seed)
    ctx.prior_stds, ctx.offsets, ctx.stream = prior_stds, offsets, stream


def _gaussian_grads(
    ctx: Any,
    grads: list[Tensor],
    grad_kl: Tensor,
    backward: Callable[..., tuple[list[Tensor], list[Tensor]]],
) -> tuple[list[Tensor], list[Tensor]]:
    tensors, prior_means, seed = _saved(ctx)
    k = len(prior_means)
    return backward(
        grads,
        grad_kl,
        tensors[:k],
        tensors[k : 2 * k],
        tensors[2 * k :],
        prior_means,
        ctx.prior_stds,
        seed,
        ctx.offsets,
        ctx.stream,
    )


def _backward_gaussian(
    ctx: Any, grads: list[Tensor], grad_kl: Tensor
) -> tuple[list[Tensor], list[Tensor], list[None] | None, None, None, None, None]:
    grad_mus, grad_rhos = _gaussian_grads(ctx, grads, grad_kl, _gaussian_sample_kl_backward)
    return grad_mus, grad_rhos, _no_grad_means(ctx), None, None, None, None


_gaussian_sample_kl.register_autograd(_backward_gaussian, setup_context=_setup_gaussian)


class _EagerGaussianSampleKL(torch.autograd.Function):
    """``_gaussian_sample_kl`` on the C++ CPU kernels in eager mode, without the custom-op layer
    (which boxes the tensor lists through the dispatcher and pytree each way); same kernels, context
    and gradients.  ``tensors`` = mus + rhos."""

    @staticmethod
    def forward(ctx: Any, args: tuple[Any, ...], *tensors: Tensor) -> tuple[Tensor, ...]:
        k = len(tensors) // 2
        inputs = (list(tensors[:k]), list(tensors[k:]), *args)
        samples, kl = _gaussian_forward_kernel(*inputs)
        _setup_gaussian(ctx, inputs, (samples, kl))
        return (*samples, kl)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        grad_mus, grad_rhos = _gaussian_grads(ctx, list(grads[:-1]), grads[-1], _gaussian_backward_kernel)
        return None, *grad_mus, *grad_rhos


# -- MC-dropout -------------------------------------------------------------------------------------
def _dropout_forward_kernel(
    mus: list[Tensor],
    p: float,
    fill_prior: bool,
    prior_means: list[Tensor | None],
    prior_stds: list[float],
    seed: Tensor,
    offsets: list[int],
    stream: int,
) -> tuple[list[Tensor], Tensor]:
    kernel = _kernels("weight_dropout_l2", mus[0])
    out: tuple[list[Tensor], Tensor] = kernel.weight_dropout_l2(
        mus, p, fill_prior, prior_means, prior_stds, int(seed), offsets, stream
    )
    return out


_weight_dropout_l2 = torch.library.custom_op("bayeskern::weight_dropout_l2", mutates_args=())(_dropout_forward_kernel)


@_weight_dropout_l2.register_fake
def _(
    mus: list[Tensor],
    p: float,
    fill_prior: bool,
    prior_means: list[Tensor | None],
    prior_stds: list[float],
    seed: Tensor,
    offsets: list[int],
    stream: int,
) -> tuple[list[Tensor], Tensor]:
    return [mu.new_empty(mu.shape) for mu in mus], mus[0].new_empty((), dtype=torch.float32)


def _dropout_backward_kernel(
    grads: list[Tensor],
    grad_l2: Tensor,
    mus: list[Tensor],
    p: float,
    fill_prior: bool,
    prior_means: list[Tensor | None],
    prior_stds: list[float],
    seed: Tensor,
    offsets: list[int],
    stream: int,
) -> list[Tensor]:
    out: list[Tensor] = _kernels("weight_dropout_l2_backward", mus[0]).weight_dropout_l2_backward(
        [g.contiguous() for g in grads],
        grad_l2,
        mus,
        p,
        fill_prior,
        prior_means,
        prior_stds,
        int(seed),
        offsets,
        stream,
    )
    return out


_weight_dropout_l2_backward = torch.library.custom_op("bayeskern::weight_dropout_l2_backward", mutates_args=())(
    _dropout_backward_kernel
)


@_weight_dropout_l2_backward.register_fake
def _(
    grads: list[Tensor],
    grad_l2: Tensor,
    mus: list[Tensor],
    p: float,
    fill_prior: bool,
    prior_means: list[Tensor | None],
    prior_stds: list[float],
    seed: Tensor,
    offsets: list[int],
    stream: int,
) -> list[Tensor]:
    return [mu.new_empty(mu.shape) for mu in mus]


def _setup_dropout(ctx: Any, inputs: tuple[Any, ...], output: tuple[list[Tensor], Tensor]) -> None:
    mus, p, fill_prior, prior_means, prior_stds, seed, offsets, stream = inputs
    _save(ctx, mus, prior_means, seed)
    ctx.p, ctx.fill_prior, ctx.prior_stds, ctx.offsets, ctx.stream = p, fill_prior, prior_stds, offsets, stream


def _dropout_grads(
    ctx: Any, grads: list[Tensor], grad_l2: Tensor, backward: Callable[..., list[Tensor]]
) -> list[Tensor]:
    mus, prior_means, seed = _saved(ctx)
    return backward(
        grads, grad_l2, mus, ctx.p, ctx.fill_prior, prior_means, ctx.prior_stds, seed, ctx.offsets, ctx.stream
    )


def _backward_dropout(
    ctx: Any, grads: list[Tensor], grad_l2: Tensor
) -> tuple[list[Tensor], None, None, list[None] | None, None, None, None, None]:
    grad_mus = _dropout_grads(ctx, grads, grad_l2, _weight_dropout_l2_backward)
    return grad_mus, None, None, _no_grad_means(ctx), None, None, None, None


_weight_dropout_l2.register_autograd(_backward_dropout, setup_context=_setup_dropout)


class _EagerWeightDropoutL2(torch.autograd.Function):
    """``_weight_dropout_l2`` on the C++ CPU kernels in eager mode, without the custom-op layer (as
    ``_EagerGaussianSampleKL``).  ``tensors`` = mus."""

    @staticmethod
    def forward(ctx: Any, args: tuple[Any, ...], *mus: Tensor) -> tuple[Tensor, ...]:
        inputs = (list(mus), *args)
        samples, l2 = _dropout_forward_kernel(*inputs)
        _setup_dropout(ctx, inputs, (samples, l2))
        return (*samples, l2)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        return None, *_dropout_grads(ctx, list(grads[:-1]), grads[-1], _dropout_backward_kernel)


# -- shared machinery -------------------------------------------------------------------------------
def _kernels(op: str, t: Tensor) -> Any:
    """The namespace of the fused kernel ``op`` serving tensors like ``t`` (once the fused path is taken)."""
    return kernels(backend_for(op, t), op)


def _eager(backend: str) -> bool:
    """Whether the fused draw runs eagerly on the C++ CPU kernels, past the custom-op layer (under
    torch.compile the custom ops keep the draw traceable)."""
    return backend == "cpp" and not torch.compiler.is_compiling()


def _save(ctx: Any, tensors: list[Tensor], prior_means: list[Tensor | None], seed: Tensor) -> None:
    ctx.count = len(tensors)
    ctx.has_mean = [m is not None for m in prior_means]
    ctx.save_for_backward(*tensors, *[m for m in prior_means if m is not None], seed)


def _saved(ctx: Any) -> tuple[list[Tensor], list[Tensor | None], Tensor]:
    saved = ctx.saved_tensors
    given = iter(saved[ctx.count : -1])
    return list(saved[: ctx.count]), [next(given) if has else None for has in ctx.has_mean], saved[-1]


def _no_grad_means(ctx: Any) -> list[None] | None:
    # custom_op's structure check: a list holding None is one leaf, a list of tensors is a list
    return [None] * len(ctx.has_mean) if all(ctx.has_mean) else None


def _check_lists(
    mus: Sequence[Tensor],
    prior_means: Sequence[Tensor | None],
    prior_stds: Sequence[float | Tensor],
    offsets: Sequence[int],
    stream: int,
    **paired: Sequence[Tensor],
) -> None:
    if not mus:
        raise ValueError("mus must hold at least one tensor")
    lengths = {"prior_means": len(prior_means), "prior_stds": len(prior_stds), "offsets": len(offsets)}
    lengths.update((name, len(values)) for name, values in paired.items())
    for name, count in lengths.items():
        if count != len(mus):
            raise ValueError(f"{name} has {count} entries but mus has {len(mus)}")
    for k, (mu, m0, sp, offset) in enumerate(zip(mus, prior_means, prior_stds, offsets)):
        check_floating(mu, f"mus[{k}]")
        for name, values in paired.items():
            check_same_layout(mu, values[k], f"mus[{k}]", f"{name}[{k}]")
        if m0 is not None:
            check_same_layout(mu, m0, f"mus[{k}]", f"prior_means[{k}]")
        if not isinstance(sp, Tensor) and not (isinstance(sp, (int, float)) and math.isfinite(sp) and sp > 0):
            raise ValueError(f"prior_stds[{k}] must be positive, got {sp!r}")
        check_index(offset, f"offsets[{k}]")
    check_index(stream, "stream")


_FusedArgs = tuple[list[Tensor | None], list[float], Tensor, list[int], int]


def _kernel_args(
    op: str,
    mus: Sequence[Tensor],
    prior_means: Sequence[Tensor | None],
    prior_stds: Sequence[float | Tensor],
    seed: Tensor,
    offsets: Sequence[int],
    stream: int,
) -> tuple[str, _FusedArgs | None]:
    """The backend serving ``op`` and the fused kernel's list arguments (None where the per-tensor
    ops serve)."""
    backend = backend_for(op, mus[0], tensors=[*mus, *(m for m in prior_means if m is not None)], prior_stds=prior_stds)
    if backend == "reference":
        return backend, None
    philox.check_key(int(seed), max(o + mu.numel() for o, mu in zip(offsets, mus)), stream)
    means = [None if m is None else m.contiguous() for m in prior_means]
    return backend, (means, [float(sp) for sp in prior_stds], seed, list(offsets), stream)


def _term_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def gaussian_sample_kl(
    mus: Sequence[Tensor],
    rhos: Sequence[Tensor],
    prior_means: Sequence[Tensor | None],
    prior_stds: Sequence[float | Tensor],
    seed: int | Tensor,
    offsets: Sequence[int],
    *,
    stream: int = 0,
) -> tuple[list[Tensor], Tensor]:
    """Draw ``w_k = mu_k + softplus(rho_k) * eps_k`` for every k and sum ``KL(q_k || N(m0_k, sp_k^2))``.

    ``prior_means[k]`` None means zero; ``prior_stds[k]`` is a positive float or a tensor
    broadcastable to ``mu_k``.  Returns the samples (contiguous, of ``mu_k``'s dtype) and the KL,
    differentiable in every ``mu_k`` and ``rho_k`` (see the module docstring).
    """
    _check_lists(mus, prior_means, prior_stds, offsets, stream, rhos=rhos)
    seed = philox.seed_tensor(seed)
    backend, fused = _kernel_args("gaussian_sample_kl", mus, prior_means, prior_stds, seed, offsets, stream)
    if fused is not None:
        mus, rhos = [mu.contiguous() for mu in mus], [rho.contiguous() for rho in rhos]
        if _eager(backend):
            *samples, kl = _EagerGaussianSampleKL.apply(fused, *mus, *rhos)
            return samples, kl
        samples, kl = _gaussian_sample_kl(mus, rhos, *fused)
        return list(samples), kl
    samples = [gaussian_sample(mu, rho, seed, offset, stream=stream) for mu, rho, offset in zip(mus, rhos, offsets)]
    # mus is non-empty (_check_lists), so the sum is a tensor, never the start value 0
    kl = cast(
        Tensor,
        sum(
            gaussian_kl(mu, rho, m0, sp).to(_term_dtype(mu))
            for mu, rho, m0, sp in zip(mus, rhos, prior_means, prior_stds)
        ),
    )
    return samples, kl


def weight_dropout_l2(
    mus: Sequence[Tensor],
    p: float,
    prior_means: Sequence[Tensor | None],
    prior_stds: Sequence[float | Tensor],
    seed: int | Tensor,
    offsets: Sequence[int],
    *,
    fill_prior: bool = False,
    stream: int = 0,
) -> tuple[list[Tensor], Tensor]:
    """Drop each weight of every ``mu_k`` with probability ``p`` and sum ``(1 - p) ||mu_k - m0_k||^2 / (2 sp_k^2)``.

    Kept weights are scaled by ``1 / (1 - p)``, or, with ``fill_prior``, unscaled with dropped ones
    taking the prior mean.  Returns the dropped-out tensors and the prior term, differentiable in
    every ``mu_k`` (see the module docstring).
    """
    check_probability(p)
    _check_lists(mus, prior_means, prior_stds, offsets, stream)
    seed = philox.seed_tensor(seed)
    backend, fused = _kernel_args("weight_dropout_l2", mus, prior_means, prior_stds, seed, offsets, stream)
    if fused is not None:
        mus = [mu.contiguous() for mu in mus]
        if _eager(backend):
            *samples, l2 = _EagerWeightDropoutL2.apply((float(p), fill_prior, *fused), *mus)
            return samples, l2
        samples, l2 = _weight_dropout_l2(mus, float(p), fill_prior, *fused)
        return list(samples), l2
    fills = [(torch.zeros_like(mu) if m0 is None else m0) if fill_prior else None for mu, m0 in zip(mus, prior_means)]
    samples = [
        weight_dropout(mu, p, seed, offset, fill, stream=stream) for mu, offset, fill in zip(mus, offsets, fills)
    ]
    # mus is non-empty (_check_lists), so the sum is a tensor, never the start value 0
    l2 = cast(
        Tensor,
        sum(
            ((mu if m0 is None else mu - m0).to(_term_dtype(mu)).square() / (2 * sp**2)).sum()
            for mu, m0, sp in zip(mus, prior_means, prior_stds)
        ),
    )
    return samples, (1 - p) * l2
