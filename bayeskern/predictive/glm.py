"""The linearised (GLM) predictive (Immer, Korzepa and Bauer 2021; laplace-torch's ``pred_type="glm"``).

Around the posterior mean theta* of a Gaussian posterior ``N(theta*, Sigma)``
(``bayeskern.protocol.GaussianPosterior``) the network is replaced by its linearisation

    f_lin(x, theta) = f(x, theta*) + J(x) (theta - theta*),   J = d f(x, theta) / d theta at theta*,

whose outputs are Gaussian: ``N(f(x, theta*), J Sigma J^T)``.  Per input x and output c the variance
``var_c = J_c Sigma J_c^T`` comes from the posterior (``functional_variance``) and the per-output
rows ``J_c`` of the per-example Jacobian (vector-Jacobian products over the Bayesian tensors; the
model runs in eval mode, so example n's outputs depend on example n alone).

* ``link_approx="probit"`` (classification): ``p = softmax(f(x, theta*) / sqrt(1 + (pi/8) var))``
  (laplace-torch's multiclass probit); ``entropy = H[p]``; there are no samples, so
  ``expected_entropy`` and ``mutual_info`` stay None.
* ``link_approx="mc"``: ``num_samples`` samples ``f(x, theta*) + J (theta_s - theta*)`` with theta_s
  the posterior's own samples (deterministic in s), each a forward-mode product
  ``torch.func.jvp`` (K samples per call under ``vmap``): no Jacobian is formed, so it serves models
  with many outputs.  Classification: the averages of the ``nn`` predictive over the linearised
  logits (every field set); regression: their mean and variance.
* Regression (probit link): mean ``f(x, theta*)``, variance ``var + noise_std^2``.
* Last layer: when the Bayesian tensors are exactly one ``nn.Linear``'s weight (and bias) and the
  model returns that layer's output as it is, ``d f_c / d W[c', h] = [c = c'] phi_h`` with phi the
  layer's input: the Jacobians come from one forward pass, with no autodiff.

Cost: the probit path takes the rows of J from the layers that own the Bayesian tensors
(``layer_rows.py``: one forward, one input-gradient pass per output, and per layer the products of
``curvature.rows.OuterRows``), at most ``JACOBIAN_BYTES`` of them at once.  Where the layers cannot
give them (a tied weight, a module run twice; a warning says why) it forms the per-example
Jacobians (``vmap`` over the examples of ``jacrev``), at most ``JACOBIAN_BYTES`` at once; one
example's Jacobian larger than that raises.  For many outputs the MC link, one forward-mode product
per sample, is the path.
A sharded posterior has no linearised predictive (``pred_type="nn"`` serves it).  Attention
(``scaled_dot_product_attention``) runs its math kernel here: the fused CPU and GPU kernels have no
forward-mode derivative and no batching rule for their backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from ..batches import OutputFn, as_call, batch_length, logits_of, move_to, split_inputs
from ..protocol import GaussianPosterior, Posterior
from .base import SAMPLE_CACHE_BYTES, Prediction, _batches, _entropy, _is_one_batch, _state, _warn
from .layer_rows import LayerRows, RowsTooLarge, RowsUnavailable

LINK_APPROXES = ("probit", "mc")
JACOBIAN_BYTES = 256 << 20  # the probit path's per-example Jacobians of one chunk of examples at most this
SAMPLE_CHUNK = 8  # linearised samples per vmapped jvp call


def _is_example_tensor(value: Any, count: int, batched: bool = True) -> bool:
    """Whether ``value`` is a tensor of the batch's examples (first dimension ``count``); inside vmap
    (``batched=False``) any tensor is one example's."""
    return isinstance(value, Tensor) and (not batched or (value.dim() > 0 and value.shape[0] == count))


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')[:160]}"


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def predict_linearized(
    posterior: Posterior,
    inputs: Any,
    *,
    link_approx: str,
    num_samples: int,
    batch_size: int | None,
    return_logits: bool,
    likelihood: str,
    noise_std: float,
    output_fn: OutputFn | None,
) -> Prediction:
    """The linearised predictive of ``posterior`` on ``inputs`` (module docstring), arguments as
    ``bayeskern.predict`` checked and resolved them.  Raises TypeError for a posterior that is not a
    ``GaussianPosterior``, ValueError for a sharded one."""
    if not isinstance(posterior, GaussianPosterior):
        raise TypeError(
            f"posterior: a {type(posterior).__name__} is not Gaussian (no functional_variance): "
            "pred_type='glm' needs one (DiagLaplace, KronLaplace, VI); use pred_type='nn'"
        )
    if posterior.is_sharded:
        raise ValueError("pred_type='glm': a sharded posterior has no linearised predictive; use pred_type='nn'")
    classification = likelihood == "classification"
    one_batch = _is_one_batch(inputs)
    model = posterior.model
    was_training = model.training
    model.eval()
    try:
        mean = {name: t.detach() for name, t in posterior.mean().items()}
        base = {**_state(model), **posterior.fixed_tensors()}
        device = next(iter(mean.values())).device
        linearized = _Linearized(posterior, base, mean, output_fn, classification)
        parts = []
        with sdpa_kernel(SDPBackend.MATH):  # attention with forward-mode and batching rules
            for x in (move_to(batch, device) for batch in _batches(inputs, one_batch, batch_size)):
                if link_approx == "probit":
                    parts.append(linearized.probit(x, noise_std))
                else:
                    parts.append(linearized.sampled(x, num_samples, noise_std, return_logits))
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("inputs holds no batch")
    fields = {key: torch.cat([part[key] for part in parts], dim=1 if key == "logits" else 0) for key in parts[0]}
    return Prediction(**fields)


class _Linearized:
    """The network as a function of the Bayesian tensors, around the posterior mean."""

    def __init__(
        self,
        posterior: GaussianPosterior,
        base: dict[str, Tensor],
        mean: dict[str, Tensor],
        output_fn: OutputFn | None,
        classification: bool,
    ) -> None:
        self.posterior, self.base, self.mean = posterior, base, mean
        self.output_fn, self.classification = output_fn, classification
        self.vectorize = True  # K samples per jvp call until vmap fails once
        self.shape: tuple[int, ...] = ()  # the outputs' shape per example, as the model gives them
        self.tangents: dict[int, dict[str, Tensor]] = {}  # stacked theta_s - theta* by first sample, kept
        self.tangent_bytes = 0
        self.head = self._head()  # the nn.Linear whose tensors are the Bayesian ones, if there is one
        self.by_layers = True  # the probit's rows from the layers until they fail once
        self.layer_rows: LayerRows | None = None
        self.rows_chunk: int | None = None  # examples per call of layer_rows, once a batch was too large

    def function(self, x: Any) -> Callable[[dict[str, Tensor]], Tensor]:
        """theta -> the outputs (logits or regression mean) on ``x``, shaped ``(N, outputs)``."""
        args, kwargs = as_call(x)

        def outputs(theta: dict[str, Tensor]) -> Tensor:
            out = functional_call(self.posterior.model, {**self.base, **theta}, args, kwargs)
            logits = logits_of(out, x, self.output_fn, classification=self.classification)
            self.shape = tuple(logits.shape[1:])
            return logits.reshape(logits.shape[0], -1)

        return outputs

    def probit(self, x: Any, noise_std: float) -> dict[str, Tensor]:
        """The closed form, by the cheapest path that applies: the head's features (last layer), the
        layers' rows, the per-example Jacobians."""
        f_star, features = self._outputs_and_head_features(x) if self.head is not None else (None, None)
        if features is None and self.by_layers:
            try:
                return self._probit_fields(*self._layer_variance(x), noise_std)
            except RowsUnavailable as error:
                self.by_layers = False
                _warn(f"pred_type='glm': no Jacobian rows from the layers ({error}); per-example jacrev")
        if f_star is None:
            f_star = self.function(x)(self.mean)
        per_example = f_star.shape[1] * _nbytes(self.mean)  # one example's Jacobian
        if per_example > JACOBIAN_BYTES:
            raise ValueError(
                f"link_approx='probit': one example's Jacobian takes {per_example / 2**20:.0f} MiB "
                f"({f_star.shape[1]} outputs x the Bayesian tensors), over {JACOBIAN_BYTES >> 20} MiB; "
                "use link_approx='mc' (one forward-mode product per sample, no Jacobian)"
            )
        examples = max(1, JACOBIAN_BYTES // per_example)
        if features is not None:  # the last-layer path: the Jacobian is the features
            parts = [self._head_jacobians(chunk, f_star.shape[1]) for chunk in features.split(examples)]
        else:
            chunks = split_inputs(x, examples) if batch_length(as_call(x)) > examples else [x]
            parts = [self._jacobians(part) for part in chunks]
        variance = torch.cat([self.posterior.functional_variance(j).to(f_star.dtype) for j in parts])
        return self._probit_fields(f_star, variance, noise_std)

    def _probit_fields(self, f_star: Tensor, variance: Tensor, noise_std: float) -> dict[str, Tensor]:
        variance = variance.to(f_star.dtype)
        if not self.classification:
            shape = (-1, *self.shape)
            return {"mean": f_star.reshape(shape), "variance": (variance + noise_std**2).reshape(shape)}
        probs = torch.softmax(f_star / torch.sqrt(1 + math.pi / 8 * variance), dim=-1)
        return {"probs": probs, "entropy": _entropy(probs)}

    def _layer_variance(self, x: Any) -> tuple[Tensor, Tensor]:
        """The outputs at theta* and ``J Sigma J^T``'s diagonal from the layers' rows (``layer_rows.py``),
        ``rows_chunk`` examples at a time once a batch's rows took more than ``JACOBIAN_BYTES``."""
        if self.layer_rows is None:
            self.layer_rows = LayerRows(self.posterior.model, self.base, self.mean)
        count = batch_length(as_call(x))
        chunks = split_inputs(x, self.rows_chunk) if self.rows_chunk and count > self.rows_chunk else [x]
        outputs, variances = [], []
        for part in chunks:
            try:
                f_star, rows = self.layer_rows(self.function(part), part, batch_length(as_call(part)), JACOBIAN_BYTES)
            except RowsTooLarge as error:
                self.rows_chunk = max(1, JACOBIAN_BYTES // error.per_example)
                return self._layer_variance(x)
            outputs.append(f_star)
            variances.append(self.posterior.functional_variance(rows))
        return torch.cat(outputs), torch.cat(variances)

    def _head(self) -> tuple[str, nn.Linear] | None:
        """The name prefix and the ``nn.Linear`` whose weight (and bias, if it has one) are exactly the
        Bayesian tensors, or None."""
        for prefix, module in self.posterior.model.named_modules():
            if isinstance(module, nn.Linear):
                attrs = [a for a in ("weight", "bias") if getattr(module, a) is not None]
                if {f"{prefix}.{a}" if prefix else a for a in attrs} == set(self.mean):
                    return prefix, module
        return None

    def _outputs_and_head_features(self, x: Any) -> tuple[Tensor, Tensor | None]:
        """The outputs at theta* on ``x``, and the head's inputs (N, features) when the Bayesian tensors
        are one ``nn.Linear``'s that ran once on (N, features) and whose output is the model's, as it is
        (else None: the Jacobian then comes from ``_jacobians``)."""
        head = self.head
        if head is None:
            return self.function(x)(self.mean), None
        calls: list[tuple[Tensor, Tensor]] = []
        handle = head[1].register_forward_hook(lambda module, args, output: calls.append((args[0], output)))
        try:
            f_star = self.function(x)(self.mean)
        finally:
            handle.remove()
        if len(calls) != 1:
            return f_star, None
        features, output = calls[0]
        if features.dim() != 2 or output.shape != f_star.shape or not torch.equal(output, f_star):
            return f_star, None
        return f_star, features.detach()

    def _head_jacobians(self, features: Tensor, outputs: int) -> dict[str, Tensor]:
        """The per-example Jacobians of a last layer ``f = W phi + b``: ``d f_c / d W[c', h] = [c = c'] phi_h``
        and ``d f_c / d b[c'] = [c = c']``, ``(N, outputs, *shape)`` per name."""
        head = self.head
        assert head is not None, "the last-layer path found one"
        prefix = f"{head[0]}." if head[0] else ""
        eye = torch.eye(outputs, dtype=features.dtype, device=features.device)
        jacobians = {f"{prefix}weight": eye[None, :, :, None] * features[:, None, None, :]}
        if head[1].bias is not None:
            jacobians[f"{prefix}bias"] = eye.expand(features.shape[0], outputs, outputs)
        return jacobians

    def _jacobians(self, x: Any) -> dict[str, Tensor]:
        """Per Bayesian name, the per-example Jacobians of the outputs on ``x``: ``(N, outputs, *shape)``.
        ``vmap`` over the examples of ``jacrev`` of one example's outputs (one backward pass per
        output for the whole chunk); where vmap cannot run the model, one ``jacrev`` per example."""
        count = batch_length(as_call(x))
        in_dims = tree_map(lambda t: 0 if _is_example_tensor(t, count) else None, x)

        def one(theta: dict[str, Tensor], example: Any) -> Tensor:
            batched = tree_map(lambda t: t.unsqueeze(0) if _is_example_tensor(t, count, batched=False) else t, example)
            return self.function(batched)(theta)[0]

        if self.vectorize:
            try:
                jacobians: dict[str, Tensor] = vmap(jacrev(one), in_dims=(None, in_dims))(self.mean, x)
                return jacobians
            except RuntimeError as error:
                self.vectorize = False
                _warn(f"pred_type='glm': vmap over the examples failed ({_reason(error)}); one jacrev per example")
        rows = [jacrev(self.function(part))(self.mean) for part in split_inputs(x, 1)]
        return {name: torch.cat([r[name] for r in rows]) for name in self.mean}

    def _tangents(self, start: int, stop: int) -> dict[str, Tensor]:
        """``theta_s - theta*`` of samples ``start..stop-1``, stacked; kept for the next batches while the
        kept ones take at most ``SAMPLE_CACHE_BYTES`` (``sample`` is deterministic, so the rest are redrawn)."""
        if start in self.tangents:
            return self.tangents[start]
        draws = [self.posterior.sample(s) for s in range(start, stop)]
        stacked = {name: torch.stack([d[name] for d in draws]) - mean for name, mean in self.mean.items()}
        size = _nbytes(stacked)
        if self.tangent_bytes + size <= SAMPLE_CACHE_BYTES:
            self.tangents[start] = stacked
            self.tangent_bytes += size
        return stacked

    def _linear_terms(self, f: Callable[[dict[str, Tensor]], Tensor], tangents: dict[str, Tensor]) -> Tensor:
        """``J (theta_s - theta*)`` for each of the stacked tangents: ``(K, N, outputs)``."""

        def one(tangent: dict[str, Tensor]) -> Tensor:
            term: Tensor = jvp(f, (self.mean,), (tangent,))[1]
            return term

        if self.vectorize:
            try:
                terms: Tensor = vmap(one)(tangents)
                return terms
            except RuntimeError as error:
                self.vectorize = False
                _warn(f"pred_type='glm': vmap over the samples failed ({_reason(error)}); one jvp per sample")
        count = next(iter(tangents.values())).shape[0]
        return torch.stack([one({n: t[k] for n, t in tangents.items()}) for k in range(count)])

    def sampled(self, x: Any, num_samples: int, noise_std: float, return_logits: bool) -> dict[str, Tensor]:
        f = self.function(x)
        f_star = f(self.mean)
        terms = [
            self._linear_terms(f, self._tangents(start, min(start + SAMPLE_CHUNK, num_samples)))
            for start in range(0, num_samples, SAMPLE_CHUNK)
        ]
        logits = f_star + torch.cat(terms).to(f_star.dtype)  # (S, N, outputs)
        shape = (-1, *self.shape)
        fields: dict[str, Tensor] = {}
        if self.classification:
            per_sample = torch.softmax(logits.float(), dim=-1)
            probs = per_sample.mean(0)
            expected = _entropy(per_sample).mean(0)
            entropy = _entropy(probs)
            fields = {"probs": probs, "entropy": entropy, "expected_entropy": expected}
            fields["mutual_info"] = (entropy - expected).clamp_min(0.0)
        else:
            variance = logits.var(0, correction=0) + noise_std**2
            fields = {"mean": logits.mean(0).reshape(shape), "variance": variance.reshape(shape)}
        if return_logits:
            fields["logits"] = logits.reshape(logits.shape[0], *shape)
        return fields
