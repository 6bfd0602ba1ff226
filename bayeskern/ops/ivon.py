"""IVON's step (Shen et al. 2024, "Variational Learning is Effective for Large Deep Networks") as three
multi-tensor ops, and their three implementations side by side.

The posterior over a parameter is ``N(m, sigma^2)`` elementwise, m the parameter itself, with

    sigma = 1 / sqrt(ess (h + delta)),   ess = N / T,   delta = 1 / (N sp^2)

(N training examples, temperature T, prior std sp; h the running Hessian estimate).  A step takes K
samples ``theta_k = m + sigma eps_k`` and the gradients ``g_k`` of the mean minibatch loss there.
eps_k is the Philox normal of (seed, offsets[i] + element index, stream_k) (``philox.py``; lay tensors
out with ``philox.tensor_offsets``), so it is drawn twice, by ``ivon_draw_`` and ``ivon_collect_``,
and never stored.  Maths in float32 for fp32/fp16/bf16 tensors (float64 for float64):

* ``ivon_draw_``: ``means <- params`` (an exact copy), ``params <- m + sigma eps``;
* ``ivon_collect_``: ``grad_sums <- [grad_sums +] g``, ``grad_eps_sums <- [grad_eps_sums +] g eps``
  (the sums are float32, float64 for float64; without ``accumulate`` they are overwritten);
* ``ivon_update_``, with ``g = scale grad_sums`` and ``e = scale grad_eps_sums`` (scale = 1 / K), at
  step t (from 1):

      g_bar <- beta1 g_bar + (1 - beta1) g
      h_hat  = e sqrt(ess (h + delta))                           (= e / sigma: reparameterisation Hessian)
      h     <- beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 / 2 (h - h_hat)^2 / (h + delta)
      m     <- m - lr clip((g_bar / (1 - beta1^t) + delta (m - theta0)) / (h + delta), -r, r)

  with h on the right the old one and (h + delta) in the step the new one, theta0 the prior mean
  (zero when ``prior_means`` is empty), r ``clip_radius`` (inf: no clipping); ``lr`` is the rescaled
  lr' of ``bayeskern.IVON`` (``lr (h0 + delta)`` under ``rescale_lr``, ``ivon-opt``'s convention).
  The third term of the h update keeps h positive.

The implementations (``ivon_step``'s callers pick one, as ``IVON``'s ``foreach`` / ``fused`` flags ask):

* ``reference_ivon_*`` -- the specification, one tensor at a time in plain PyTorch;
* ``_foreach_ivon_*``  -- ``torch._foreach`` ops over a (device, dtype) bucket, the noise from
  ``noise.normal`` (the fastest backend's Philox);
* ``ivon_draw_`` / ``ivon_collect_`` / ``ivon_update_`` -- the fused kernels over a whole bucket
  (Triton, or the C++ CPU / CUDA kernels; ``backend.py``'s policy chooses, the reference for float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..validation import check_nonnegative, check_positive
from . import noise, philox
from .backend import backend_for, kernels
from .checks import check_index, check_same_layout

IMPLEMENTATIONS = ("fused", "foreach", "reference")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sum_dtype(param: Tensor) -> torch.dtype:
    """The dtype of a parameter's gradient sums: float32, float64 for a float64 parameter."""
    return _compute_dtype(param)


def posterior_std(hess: Tensor, ess: float, delta: float) -> Tensor:
    """``sigma = 1 / sqrt(ess (h + delta))`` in the compute dtype of ``hess``."""
    return hess.to(_compute_dtype(hess)).add(delta).mul_(ess).sqrt_().reciprocal_()


# -- the specification ------------------------------------------------------------------------------
@torch.no_grad()
def reference_ivon_draw_(
    params: list[Tensor],
    means: list[Tensor],
    hesses: list[Tensor],
    ess: float,
    delta: float,
    seed: int,
    stream: int,
    offsets: list[int],
) -> None:
    """``means[i] <- params[i]``, ``params[i] <- m + sigma eps`` (module docstring)."""
    for i, p in enumerate(params):
        means[i].copy_(p)
        eps = philox.normal(seed, offsets[i], p.numel(), stream, device=p.device).view(p.shape)
        p.copy_(p.to(_compute_dtype(p)) + posterior_std(hesses[i], ess, delta) * eps.to(_compute_dtype(p)))


@torch.no_grad()
def reference_ivon_collect_(
    grads: list[Tensor],
    grad_sums: list[Tensor],
    grad_eps_sums: list[Tensor],
    accumulate: bool,
    seed: int,
    stream: int,
    offsets: list[int],
) -> None:
    """``grad_sums[i] <- [grad_sums[i] +] g``, ``grad_eps_sums[i] <- [grad_eps_sums[i] +] g eps``."""
    for i, g in enumerate(grads):
        grad = g.to(grad_sums[i].dtype)
        eps = philox.normal(seed, offsets[i], g.numel(), stream, device=g.device).view(g.shape).to(grad.dtype)
        if accumulate:
            grad_sums[i].add_(grad)
            grad_eps_sums[i].add_(grad * eps)
        else:
            grad_sums[i].copy_(grad)
            grad_eps_sums[i].copy_(grad * eps)


@torch.no_grad()
def reference_ivon_update_(
    params: list[Tensor],
    momenta: list[Tensor],
    hesses: list[Tensor],
    grad_sums: list[Tensor],
    grad_eps_sums: list[Tensor],
    prior_means: list[Tensor],
    lr: float,
    ess: float,
    delta: float,
    beta1: float,
    beta2: float,
    bias_correction: float,
    clip_radius: float,
    scale: float,
) -> None:
    """One IVON update of ``params`` (m), ``momenta`` (g_bar) and ``hesses`` (h) in place (module
    docstring; ``bias_correction`` is ``1 - beta1^t``)."""
    for i, param in enumerate(params):
        dtype = _compute_dtype(param)
        h = hesses[i].to(dtype)
        g = grad_sums[i].to(dtype) * scale
        h_hat = grad_eps_sums[i].to(dtype) * scale * (h + delta).mul(ess).sqrt()
        g_bar = momenta[i].to(dtype) * beta1 + g * (1.0 - beta1)
        h_new = h * beta2 + h_hat * (1.0 - beta2) + (h - h_hat).square() * (0.5 * (1.0 - beta2) ** 2) / (h + delta)
        m = param.to(dtype)
        offset = m - prior_means[i].to(dtype) if prior_means else m
        direction = (g_bar / bias_correction + delta * offset) / (h_new + delta)
        direction = direction.clamp(-clip_radius, clip_radius)
        param.copy_(m - lr * direction)
        momenta[i].copy_(g_bar)
        hesses[i].copy_(h_new)


# -- the foreach implementation ---------------------------------------------------------------------
def _eps(tensors: list[Tensor], seed: int, stream: int, offsets: list[int], dtype: torch.dtype) -> list[Tensor]:
    return [noise.normal(t.shape, seed, o, stream=stream, device=t.device).to(dtype) for t, o in zip(tensors, offsets)]


def _up(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _foreach(tensors: Sequence[Tensor]) -> list[Tensor]:
    """A torch._foreach result as a list."""
    return list(tensors)


def _std(hesses: list[Tensor], ess: float, delta: float, dtype: torch.dtype) -> list[Tensor]:
    sigma = _foreach(torch._foreach_add(_up(hesses, dtype), delta))
    torch._foreach_mul_(sigma, ess)
    torch._foreach_sqrt_(sigma)
    torch._foreach_reciprocal_(sigma)
    return sigma


@torch.no_grad()
def _foreach_ivon_draw_(
    params: list[Tensor],
    means: list[Tensor],
    hesses: list[Tensor],
    ess: float,
    delta: float,
    seed: int,
    stream: int,
    offsets: list[int],
) -> None:
    dtype = _compute_dtype(params[0])
    torch._foreach_copy_(means, params)
    sample = _std(hesses, ess, delta, dtype)
    torch._foreach_mul_(sample, _eps(params, seed, stream, offsets, dtype))
    torch._foreach_add_(sample, _up(params, dtype))
    torch._foreach_copy_(params, sample)


@torch.no_grad()
def _foreach_ivon_collect_(
    grads: list[Tensor],
    grad_sums: list[Tensor],
    grad_eps_sums: list[Tensor],
    accumulate: bool,
    seed: int,
    stream: int,
    offsets: list[int],
) -> None:
    dtype = grad_sums[0].dtype
    grad = _up(grads, dtype)
    products = torch._foreach_mul(_eps(grads, seed, stream, offsets, dtype), grad)
    if accumulate:
        torch._foreach_add_(grad_sums, grad)
        torch._foreach_add_(grad_eps_sums, products)
    else:
        torch._foreach_copy_(grad_sums, grad)
        torch._foreach_copy_(grad_eps_sums, products)


@torch.no_grad()
def _foreach_ivon_update_(
    params: list[Tensor],
    momenta: list[Tensor],
    hesses: list[Tensor],
    grad_sums: list[Tensor],
    grad_eps_sums: list[Tensor],
    prior_means: list[Tensor],
    lr: float,
    ess: float,
    delta: float,
    beta1: float,
    beta2: float,
    bias_correction: float,
    clip_radius: float,
    scale: float,
) -> None:
    dtype = _compute_dtype(params[0])
    h = _up(hesses, dtype)
    h_delta = torch._foreach_add(h, delta)
    h_hat = torch._foreach_mul(h_delta, ess)
    torch._foreach_sqrt_(h_hat)
    torch._foreach_mul_(h_hat, _up(grad_eps_sums, dtype))
    torch._foreach_mul_(h_hat, scale)
    g_bar = torch._foreach_mul(_up(momenta, dtype), beta1)
    torch._foreach_add_(g_bar, _up(grad_sums, dtype), alpha=(1.0 - beta1) * scale)
    gap = torch._foreach_sub(h, h_hat)
    torch._foreach_mul_(gap, gap)
    torch._foreach_div_(gap, h_delta)
    h_new = torch._foreach_mul(h, beta2)
    torch._foreach_add_(h_new, h_hat, alpha=1.0 - beta2)
    torch._foreach_add_(h_new, gap, alpha=0.5 * (1.0 - beta2) ** 2)
    m = _up(params, dtype)
    direction = torch._foreach_sub(m, _up(prior_means, dtype)) if prior_means else torch._foreach_mul(m, 1.0)
    torch._foreach_mul_(direction, delta)
    torch._foreach_add_(direction, g_bar, alpha=1.0 / bias_correction)
    torch._foreach_div_(direction, torch._foreach_add(h_new, delta))
    if math.isfinite(clip_radius):
        torch._foreach_clamp_min_(direction, -clip_radius)
        torch._foreach_clamp_max_(direction, clip_radius)
    torch._foreach_add_(m, direction, alpha=-lr)
    torch._foreach_copy_(params, m)
    torch._foreach_copy_(momenta, g_bar)
    torch._foreach_copy_(hesses, h_new)


# -- the fused kernels ------------------------------------------------------------------------------
def _is_tensor_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], Tensor)


def _run(op: str, reference: Callable[..., None], main: Tensor, args: tuple, written: tuple[int, ...]) -> None:
    """``op`` on the backend the policy picks for ``main``: the reference, or the kernel on dense
    tensors (a strided tensor is updated through a contiguous copy, copied back)."""
    backend = backend_for(op, main)
    if backend == "reference":
        reference(*args)
        return
    dense = [[t.contiguous() for t in ts] if _is_tensor_list(ts) else ts for ts in args]
    getattr(kernels(backend, op), op)(*dense)
    for index in written:
        for dst, src in zip(args[index], dense[index]):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)


@torch.library.custom_op("bayeskern::ivon_draw_", mutates_args=("params", "means"))
def _ivon_draw_(
    params: list[Tensor],
    means: list[Tensor],
    hesses: list[Tensor],
    ess: float,
    delta: float,
    seed: Tensor,
    stream: int,
    offsets: list[int],
) -> None:
    args = (params, means, hesses, ess, delta, int(seed), stream, offsets)
    _run("ivon_draw_", reference_ivon_draw_, params[0], args, written=(0, 1))


@_ivon_draw_.register_fake
def _(
    params: list[Tensor],
    means: list[Tensor],
    hesses: list[Tensor],
    ess: float,
    delta: float,
    seed: Tensor,
    stream: int,
    offsets: list[int],
) -> None:
    return None


@torch.library.custom_op("bayeskern::ivon_collect_", mutates_args=("grad_sums", "grad_eps_sums"))
def _ivon_collect_(
    grads: list[Tensor],
    grad_sums: list[Tensor],
    grad_eps_sums: list[Tensor],
    accumulate: bool,
    seed: Tensor,
    stream: int,
    offsets: list[int],
) -> None:
    args = (grads, grad_sums, grad_eps_sums, accumulate, int(seed), stream, offsets)
    _run("ivon_collect_", reference_ivon_collect_, grads[0], args, written=(1, 2))


@_ivon_collect_.register_fake
def _(
    grads: list[Tensor],
    grad_sums: list[Tensor],
    grad_eps_sums: list[Tensor],
    accumulate: bool,
    seed: Tensor,
    stream: int,
    offsets: list[int],
) -> None:
    return None


@torch.library.custom_op("bayeskern::ivon_update_", mutates_args=("params", "momenta", "hesses"))
def _ivon_update_(
    params: list[Tensor],
    momenta: list[Tensor],
    hesses: list[Tensor],
    grad_sums: list[Tensor],
    grad_eps_sums: list[Tensor],
    prior_means: list[Tensor],
    lr: float,
    ess: float,
    delta: float,
    beta1: float,
    beta2: float,
    bias_correction: float,
    clip_radius: float,
    scale: float,
) -> None:
    args = (params, momenta, hesses, grad_sums, grad_eps_sums, prior_means, lr, ess, delta, beta1, beta2,
            bias_correction, clip_radius, scale)  # fmt: skip
    _run("ivon_update_", reference_ivon_update_, params[0], args, written=(0, 1, 2))


@_ivon_update_.register_fake
def _(*args: object) -> None:
    return None


# -- the public, checked entry points ----------------------------------------------------------------
def _check_lists(lists: dict[str, list[Tensor]], sums: dict[str, list[Tensor]], offsets: list[int]) -> None:
    """Every list holds one entry per tensor of the first; tensor i of each list is laid out as the
    first list's (a sum: its shape and device, dtype ``sum_dtype``)."""
    (first_name, first), *others = lists.items()
    for name, values in [*others, *sums.items()]:
        if len(values) != len(first):
            raise ValueError(f"{name} has {len(values)} entries but {first_name} has {len(first)}")
    if len(offsets) != len(first):
        raise ValueError(f"offsets has {len(offsets)} entries but {first_name} has {len(first)}")
    for i, t in enumerate(first):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{first_name}[{i}] must be a floating-point tensor, got {t.dtype}")
        for name, values in others:
            check_same_layout(t, values[i], f"{first_name}[{i}]", f"{name}[{i}]")
        for name, values in sums.items():
            s = values[i]
            if s.shape != t.shape or s.device != t.device or s.dtype != sum_dtype(t):
                raise ValueError(
                    f"{name}[{i}] must be {sum_dtype(t)} of shape {tuple(t.shape)} on {t.device}, "
                    f"got {s.dtype} of shape {tuple(s.shape)} on {s.device}"
                )
        check_index(offsets[i], f"offsets[{i}]")
        philox.check_key(0, offsets[i] + t.numel(), 0)


def _buckets(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): each group is one fused call."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def ivon_draw_(
    params: Sequence[Tensor],
    means: Sequence[Tensor],
    hesses: Sequence[Tensor],
    *,
    ess: float,
    delta: float,
    seed: int | Tensor,
    stream: int,
    offsets: Sequence[int],
    implementation: str = "fused",
) -> None:
    """Put a posterior sample ``m + sigma eps`` in every tensor of ``params``, keeping m in ``means``
    (module docstring); tensors may mix devices and dtypes (one call per (device, dtype) bucket)."""
    _check_implementation(implementation)
    ps, ms, hs, offs = list(params), list(means), list(hesses), [int(o) for o in offsets]
    _check_lists({"params": ps, "means": ms, "hesses": hs}, {}, offs)
    check_positive(ess, "ess")
    check_nonnegative(delta, "delta")
    check_index(stream, "stream")
    key = philox.seed_tensor(seed)
    for idx in _buckets(ps):
        bucket = ([ps[i] for i in idx], [ms[i] for i in idx], [hs[i] for i in idx], float(ess), float(delta))
        if implementation == "fused":
            _ivon_draw_(*bucket, key, stream, [offs[i] for i in idx])
        else:
            impl = _foreach_ivon_draw_ if implementation == "foreach" else reference_ivon_draw_
            impl(*bucket, int(key), stream, [offs[i] for i in idx])


def ivon_collect_(
    grads: Sequence[Tensor],
    grad_sums: Sequence[Tensor],
    grad_eps_sums: Sequence[Tensor],
    *,
    accumulate: bool,
    seed: int | Tensor,
    stream: int,
    offsets: Sequence[int],
    implementation: str = "fused",
) -> None:
    """Add (``accumulate``) or write one sample's ``g`` and ``g eps`` into the float32 (float64) sums
    (module docstring); eps is the draw of ``stream``."""
    _check_implementation(implementation)
    gs, ss, es, offs = list(grads), list(grad_sums), list(grad_eps_sums), [int(o) for o in offsets]
    _check_lists({"grads": gs}, {"grad_sums": ss, "grad_eps_sums": es}, offs)
    check_index(stream, "stream")
    key = philox.seed_tensor(seed)
    for idx in _buckets(gs):
        bucket = ([gs[i] for i in idx], [ss[i] for i in idx], [es[i] for i in idx], bool(accumulate))
        if implementation == "fused":
            _ivon_collect_(*bucket, key, stream, [offs[i] for i in idx])
        else:
            impl = _foreach_ivon_collect_ if implementation == "foreach" else reference_ivon_collect_
            impl(*bucket, int(key), stream, [offs[i] for i in idx])


def ivon_update_(
    params: Sequence[Tensor],
    momenta: Sequence[Tensor],
    hesses: Sequence[Tensor],
    grad_sums: Sequence[Tensor],
    grad_eps_sums: Sequence[Tensor],
    prior_means: Sequence[Tensor] | None = None,
    *,
    lr: float,
    ess: float,
    delta: float,
    beta1: float,
    beta2: float,
    step: int,
    clip_radius: float = math.inf,
    scale: float = 1.0,
    implementation: str = "fused",
) -> None:
    """One IVON update of ``params`` (m), ``momenta`` and ``hesses`` in place from the gradient sums of
    K samples (``scale`` = 1 / K) at step ``step`` >= 1 (module docstring); ``prior_means`` None: zero."""
    _check_implementation(implementation)
    ps, ms, hs, ss, es = list(params), list(momenta), list(hesses), list(grad_sums), list(grad_eps_sums)
    thetas = list(prior_means or [])
    lists = {"params": ps, "momenta": ms, "hesses": hs, **({"prior_means": thetas} if thetas else {})}
    _check_lists(lists, {"grad_sums": ss, "grad_eps_sums": es}, [0] * len(ps))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step!r}")
    check_nonnegative(lr, "lr")
    check_positive(ess, "ess")
    check_nonnegative(delta, "delta")
    check_positive(scale, "scale")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    if isinstance(clip_radius, bool) or not isinstance(clip_radius, (int, float)) or not clip_radius > 0:
        raise ValueError(f"clip_radius must be > 0 (inf: no clipping), got {clip_radius!r}")
    impl: dict[str, Callable[..., None]] = {
        "fused": _ivon_update_,
        "foreach": _foreach_ivon_update_,
        "reference": reference_ivon_update_,
    }
    for idx in _buckets(ps):
        impl[implementation](
            [ps[i] for i in idx],
            [ms[i] for i in idx],
            [hs[i] for i in idx],
            [ss[i] for i in idx],
            [es[i] for i in idx],
            [thetas[i] for i in idx] if thetas else [],
            float(lr),
            float(ess),
            float(delta),
            float(beta1),
            float(beta2),
            1.0 - float(beta1) ** step,
            float(clip_radius),
            float(scale),
        )
