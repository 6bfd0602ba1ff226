"""``Laplace``: what every Laplace approximation around a trained network shares.

With theta* the network's weights when ``fit`` runs (the MAP), theta0 the prior mean, prior
precision lambda (isotropic: ``prior_precision = 1 / prior_std**2`` of the other methods) and
temperature T (the target is the tempered posterior ``p(theta | D)^(1/T)``, docs/vocabulary.md):

* curvature ``F``: a positive semi-definite approximation of the Hessian of the summed negative
  log-likelihood at theta*, from per-example gradients ``g_n`` of example n's negative
  log-likelihood, with the true label (``fisher_type="empirical"``) or a label drawn from the
  model's own predictive (``fisher_type="mc"``: an unbiased estimate of the GGN).  A subclass says
  which structure F has (``DiagLaplace``: its diagonal; ``KronLaplace``: Kronecker blocks) through
  its eigendecomposition ``F = sum_i e_i u_i u_i^T``, block by block;
* posterior ``q(theta) = N(theta*, T (F + lambda I)^-1)``; ``posterior precision = (F + lambda I) / T``;
* sample s: ``theta* + sum_i u_i eps_{s,i} sqrt(T / (e_i + lambda))``, ``eps_s`` the Philox normals of
  (seed, element offset, stream = s): deterministic in s;
* log marginal likelihood of the model (the Laplace evidence; it does not depend on T)::

      log Z(lambda) = log p(D | theta*) - lambda/2 ||theta* - theta0||^2
                      + (D/2) log lambda - 1/2 sum_i log(e_i + lambda)

  (D Bayesian weights); concave in ``log lambda``, maximised by bisection on its derivative
  ``-lambda/2 ||theta* - theta0||^2 + D/2 - 1/2 sum_i lambda / (e_i + lambda)``.

Data parallel (``torch.distributed``): give each rank its shard (e.g. a ``DistributedSampler``) and
call ``fit`` on every rank with the same (unwrapped) model; the curvature sums, ``log p(D | theta*)``
and the example count are sums over examples, so each rank accumulates its shard and they are
all-reduced (summed) once at the end: every rank then holds the posterior of the whole data set.  A
default seed is rank 0's, broadcast; the ``fisher_type="mc"`` label draws use a per-rank generator
(rank 0's is the single-process one).

Negative log-likelihoods: ``bayeskern.likelihoods`` (regression: Gaussian with std ``noise_std``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..batches import OutputFn, check_classification_logits, split_batch
from ..curvature.rows import JacobianRows
from ..distributed.ranks import all_reduce_sum, is_distributed, rank_seed
from ..distributed.sharding import common_mesh, forward_with, global_sum, is_sharded, local_tensor
from ..likelihoods import LIKELIHOODS, gaussian_nll, negative_log_likelihood
from ..predictive import predict
from ..validation import check_choice, check_count, check_nonnegative, check_positive
from .prior import PriorMean
from .selection import ParamSelection
from .setup import PosteriorSetup

FISHER_TYPES = ("empirical", "mc")
METHODS = ("marglik", "val_nll")
LOG_LAMBDA_RANGE = (-12 * math.log(10), 12 * math.log(10))  # marglik search interval for log lambda


class Laplace:
    """Base of the Laplace approximations (module docstring); a subclass supplies the curvature.

    Args (docs/vocabulary.md):
        model: any ``nn.Module``, trained (its current weights are theta*); never modified.
        likelihood: ``"classification"`` (cross-entropy on logits) or ``"regression"`` (Gaussian).
        params, include_bias, include_norm: which parameters are Bayesian (``select_parameters``;
            ``"last_layer"`` works).
        prior_mean, new_params: theta0 (``GaussianPrior``; default the weights at construction).
        prior_precision: lambda > 0 (``optimize_prior_precision`` tunes it).
        temperature: T >= 0 (module docstring; 0 puts every sample at theta*).
        noise_std: observation-noise std of the regression likelihood.
        fisher_type: ``"empirical"`` (true labels) or ``"mc"`` (labels sampled from the model).
        output_fn: ``(output, inputs) -> logits`` for outputs ``bayeskern.batches`` cannot read.
        seed: Philox seed of the samples (None: drawn on rank 0 and broadcast, so every rank must
            construct the posterior).

    Subclass hooks: ``_fit_curvature`` (one pass over the data), ``_curvature_sums`` (the tensors summed
    over ranks), ``_eigenvalues``, ``std``, ``_draw``, ``_curvature_state`` / ``_load_curvature``, and
    ``_forget`` (drop what depends on lambda or T).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        likelihood: str = "classification",
        params: ParamSelection = None,
        include_bias: bool = True,
        include_norm: bool = True,
        prior_mean: PriorMean = "pretrained",
        new_params: str | Sequence[str] | None = None,
        prior_precision: float = 1.0,
        temperature: float = 1.0,
        noise_std: float = 1.0,
        fisher_type: str = "empirical",
        output_fn: OutputFn | None = None,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.likelihood = check_choice(likelihood, "likelihood", LIKELIHOODS)
        self.fisher_type = check_choice(fisher_type, "fisher_type", FISHER_TYPES)
        self.noise_std = check_positive(noise_std, "noise_std")
        self.output_fn = output_fn
        self.setup = PosteriorSetup.build(
            model,
            params=params,
            include_bias=include_bias,
            include_norm=include_norm,
            prior_mean=prior_mean,
            new_params=new_params,
            seed=seed,
        )
        self.prior = self.setup.require_prior()
        self.names: list[str] = self.setup.names
        self.offsets = self.setup.offsets
        self.prior_precision = prior_precision
        self.temperature = temperature
        self._fitted = False
        self._map: dict[str, Tensor] = {}
        self._mesh: Any = None  # the device mesh of a fit on a sharded model
        self.log_likelihood: float | None = None  # log p(D | theta*), set by fit
        self.num_data = 0

    @property
    def seed(self) -> int:
        """The Philox seed of the samples (``setup.seed``; a loaded state dict brings its own)."""
        return self.setup.seed

    # -- hyperparameters ------------------------------------------------------------------------
    @property
    def prior_precision(self) -> float | dict[str, float]:
        """lambda: one float for every Bayesian parameter, or one per parameter name (a dict, as
        ``optimize_prior_precision(per_layer=True)`` sets it)."""
        return dict(self._prior_precision) if isinstance(self._prior_precision, dict) else self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Mapping[str, float]) -> None:
        self._prior_precision = self._checked_precision(value)
        self._forget()

    def _checked_precision(self, value: float | Mapping[str, float]) -> float | dict[str, float]:
        if not isinstance(value, Mapping):
            return check_positive(value, "prior_precision")
        unknown = sorted(set(value) - set(self.names))
        missing = [n for n in self.names if n not in value]
        if unknown or missing:
            raise ValueError(
                "prior_precision: a dict needs one value per Bayesian parameter "
                f"(unknown: {unknown}, missing: {missing})"
            )
        return {n: check_positive(value[n], f"prior_precision[{n!r}]") for n in self.names}

    def precision_of(self, name: str) -> float:
        """lambda of Bayesian parameter ``name``."""
        lam = self._prior_precision
        return lam[name] if isinstance(lam, dict) else lam

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_nonnegative(value, "temperature")
        self._forget()

    # -- subclass hooks --------------------------------------------------------------------------
    def _fit_curvature(
        self, loader: Iterable, sample_targets: Callable[[Tensor], Tensor] | None, progress: bool
    ) -> tuple[float, int]:
        """Accumulate this rank's curvature sums over ``loader``; return (summed NLL of the true
        targets, example count)."""
        raise NotImplementedError

    def _curvature_sums(self) -> dict[str, Tensor]:
        """The curvature tensors that are sums over examples (all-reduced under data parallelism)."""
        raise NotImplementedError

    def _eigenvalues(self) -> dict[str, Tensor]:
        """Per Bayesian parameter, the eigenvalues ``e_i`` of its curvature block(s), flattened
        (this rank's shard when sharded)."""
        raise NotImplementedError

    def std(self) -> dict[str, Tensor]:
        """Marginal posterior standard deviations per parameter name."""
        raise NotImplementedError

    def _draw(self, name: str, index: int) -> Tensor:
        """Parameter ``name`` of the index-th posterior sample."""
        raise NotImplementedError

    def _curvature_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_curvature(self, state: Mapping[str, Any], params: Mapping[str, Tensor]) -> None:
        raise NotImplementedError

    def functional_variance(self, jacobians: JacobianRows) -> Tensor:
        """``j^T Sigma j`` per Jacobian row, Sigma = T (F + lambda I)^-1 (``protocol.GaussianPosterior``:
        the linearised predictive)."""
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop what was computed for the current lambda and T."""

    def _check_fit(self, mesh: Any, reduce: bool | None) -> None:
        """Raise ValueError when this structure cannot be fitted on the model as it is (``mesh``: the
        device mesh of sharded parameters, else None) with ``fit``'s ``reduce``."""

    # -- fitting -------------------------------------------------------------------------------
    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """Summed negative log-likelihood of a batch (``bayeskern.likelihoods``)."""
        if self.likelihood == "classification":
            check_classification_logits(output, self.output_fn)
        return negative_log_likelihood(output, target, self.likelihood, self.noise_std, reduction="sum")

    def _label_sampler(self, device: torch.device) -> Callable[[Tensor], Tensor]:
        generator = torch.Generator(device=device).manual_seed(rank_seed(self.seed))

        def sample(output: Tensor) -> Tensor:
            output = output.float()
            if self.likelihood == "classification":
                check_classification_logits(output, self.output_fn)
                return torch.multinomial(output.softmax(-1), 1, generator=generator).squeeze(-1)
            noise = torch.randn(output.shape, generator=generator, device=output.device)
            return output + self.noise_std * noise

        return sample

    def fit(self, loader: Iterable, *, progress: bool = True, reduce: bool | None = None) -> Laplace:
        """Accumulate the curvature over ``loader`` around the model's current weights (batches
        ``(inputs, targets)`` or Mappings holding ``labels``, ``bayeskern.batches``); returns ``self``.

        ``reduce``: sum the curvature, the log-likelihood and the example count over the ranks of
        ``torch.distributed`` (a collective; None: whenever a process group is initialised; a sharded
        model always reduces).  The progress bar shows on rank 0 only.  Raises ValueError if ``loader``
        yields no batch.
        """
        params = dict(self.model.named_parameters())
        device = params[self.names[0]].device
        mesh = common_mesh((params[n] for n in self.names), f"parameters of the {type(self).__name__}")
        self._check_fit(mesh, reduce)
        sampler = self._label_sampler(device) if self.fisher_type == "mc" else None
        try:
            loss, count = self._fit_curvature(loader, sampler, progress)
        except ValueError as error:
            raise ValueError(f"fit: {error}") from None
        totals = torch.tensor([loss, count], dtype=torch.float64, device=device)
        if mesh is not None:
            all_reduce_sum({"": totals})  # the curvature is reduced already, shard by shard
        elif is_distributed() if reduce is None else reduce:
            all_reduce_sum({**self._curvature_sums(), "": totals})
        self._mesh = mesh
        self._fitted = True
        self._map = {name: params[name].detach().clone() for name in self.names}
        self.log_likelihood = -float(totals[0])
        self.num_data = int(totals[1])
        self._forget()
        return self

    def _require_fit(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}: call fit(loader) (or load_state_dict) first")

    def _check_layout(self) -> None:
        """The fit's tensors must be laid out as the model's parameters are now."""
        params = dict(self.model.named_parameters())
        for name in self.names:
            if is_sharded(params[name]) != is_sharded(self._map[name]):
                now = "sharded" if is_sharded(params[name]) else "unsharded"
                raise RuntimeError(
                    f"{type(self).__name__}: the model's parameter {name!r} is {now} but was not when fit ran "
                    "(fully_shard between fit and sampling?); fit again on the model as it is"
                )

    # -- the posterior -------------------------------------------------------------------------
    def mean(self) -> dict[str, Tensor]:
        """theta* (the weights at ``fit``)."""
        self._require_fit()
        return dict(self._map)

    @property
    def is_sharded(self) -> bool:
        """True after a fit on a ``fully_shard``-ed model (``bayeskern.predict`` then runs
        ``functional_forward``, on every rank)."""
        return self._mesh is not None

    @property
    def pred_type(self) -> str:
        """``"glm"``: ``bayeskern.predict`` linearises the network around theta* (the model this Gaussian
        is exact for), with the probit link by default; ``"nn"`` (sampled networks) for a sharded fit,
        which has no linearised predictive."""
        return "nn" if self.is_sharded else "glm"

    def functional_forward(self, weights: dict[str, Tensor], inputs: Any) -> Any:
        """The sharded model's output on ``inputs`` with ``weights`` (a sample) for the Bayesian
        parameters (``distributed.sharding.forward_with``; the model's weights are restored)."""
        self._check_layout()
        return forward_with(self.model, weights, inputs)

    def fixed_tensors(self) -> dict[str, Tensor]:
        """Nothing: every tensor but the Bayesian ones is the model's own."""
        return {}

    def sample(self, index: int) -> dict[str, Tensor]:
        """The index-th posterior sample (deterministic in ``index``; module docstring)."""
        index = check_count(index, "index", 0)
        self._require_fit()
        self._check_layout()
        return {name: self._draw(name, index) for name in self.names}

    # -- evidence and prior precision ----------------------------------------------------------
    def _evidence_terms(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per Bayesian parameter b (float64): ``||theta*_b - theta0_b||^2`` and D_b, and the stacked
        eigenvalues with the index b of each (this rank's shards when sharded; the distances are summed
        over the mesh)."""
        self._require_fit()
        local = {n: local_tensor(self._map[n]).double() for n in self.names}
        distances = torch.stack(
            [(local[n] - local_tensor(self.prior.mean(n)).double()).square().sum() for n in self.names]
        )
        distances = self._sums(distances)
        counts = torch.tensor([self._map[n].numel() for n in self.names], dtype=torch.float64)
        eigenvalues = self._eigenvalues()
        flat = [eigenvalues[n].double().flatten() for n in self.names]
        index = torch.cat([torch.full((len(e),), b, dtype=torch.long) for b, e in enumerate(flat)])
        return distances, counts, torch.cat(flat), index

    def _sums(self, values: Tensor) -> Tensor:
        """Per-parameter sums over this rank's shards, added over the mesh of a sharded fit (one
        collective for the vector)."""
        if self._mesh is None:
            return values
        return global_sum(values.detach().to(self._mesh.device_type), self._mesh).cpu()

    def _lambda_vector(self, prior_precision: float | Mapping[str, float] | None) -> Tensor:
        lam = self._prior_precision if prior_precision is None else self._checked_precision(prior_precision)
        values = [lam[n] if isinstance(lam, dict) else lam for n in self.names]
        return torch.tensor(values, dtype=torch.float64)

    def log_marginal_likelihood(self, prior_precision: float | Mapping[str, float] | None = None) -> float:
        """The Laplace evidence ``log Z(lambda)`` of the model (module docstring; with one lambda_b per
        parameter b, the prior terms are summed per parameter), at ``prior_precision`` (a float or a
        dict by name) or the current one."""
        lam = self._lambda_vector(prior_precision)
        distances, counts, eigenvalues, index = self._evidence_terms()
        log_det = self._sums(
            torch.zeros(len(self.names), dtype=torch.float64).index_add_(0, index, torch.log(eigenvalues + lam[index]))
        )
        log_likelihood = cast(float, self.log_likelihood)  # set by fit, which _evidence_terms requires
        return log_likelihood + float((-0.5 * lam * distances + 0.5 * counts * lam.log() - 0.5 * log_det).sum())

    def _marglik_argmax(self, per_layer: bool) -> float | dict[str, float]:
        """The maximiser of the evidence in lambda (one for all parameters, or one per parameter: the
        evidence is a sum of per-parameter terms, each concave in its log lambda_b), by bisection on
        the slopes ``-lambda/2 ||theta* - theta0||^2 + D/2 - 1/2 sum_i lambda / (e_i + lambda)``, all
        groups at once."""
        distances, counts, eigenvalues, index = self._evidence_terms()
        groups = len(self.names) if per_layer else 1
        group = index if per_layer else torch.zeros_like(index)
        distances = distances if per_layer else distances.sum(0, keepdim=True)
        counts = counts if per_layer else counts.sum(0, keepdim=True)

        def slope(log_lam: Tensor) -> Tensor:  # d log Z / d log lambda per group, decreasing
            lam = log_lam.exp()
            ratios = torch.zeros(groups, dtype=torch.float64).index_add_(
                0, group, lam[group] / (eigenvalues + lam[group])
            )
            return -0.5 * lam * distances + 0.5 * counts - 0.5 * self._sums(ratios)

        low = torch.full((groups,), LOG_LAMBDA_RANGE[0], dtype=torch.float64)
        high = torch.full((groups,), LOG_LAMBDA_RANGE[1], dtype=torch.float64)
        grows, falls = slope(high) >= 0, slope(low) <= 0
        if bool(grows.any()):
            warnings.warn(
                f"{type(self).__name__}: the marginal likelihood still grows at prior_precision="
                f"{math.exp(LOG_LAMBDA_RANGE[1]):.0e} (theta* equals the prior mean, e.g. prior_mean='pretrained' "
                "fitted at the pretrained weights); the search stops there",
                RuntimeWarning,
                stacklevel=3,
            )
        for _ in range(100):
            middle = 0.5 * (low + high)
            up = slope(middle) > 0
            low, high = torch.where(up, middle, low), torch.where(up, high, middle)
        best = torch.where(grows, high, torch.where(falls, low, 0.5 * (low + high))).exp()
        if not per_layer:
            return float(best[0])
        return {n: float(v) for n, v in zip(self.names, best)}

    def validation_nll(
        self,
        val_loader: Iterable,
        *,
        pred_type: str | None = None,
        link_approx: str = "probit",
        num_samples: int = 16,
        compile: bool = False,
    ) -> float:
        """Mean negative log predictive density of ``val_loader`` (batches as ``fit`` takes them) under
        ``bayeskern.predict``'s predictive (``pred_type`` None: ``self.pred_type``; ``link_approx``,
        ``num_samples``; regression: with ``noise_std``)."""
        # split_batch raises where a batch holds no targets
        targets = torch.cat([cast(Tensor, split_batch(batch)[1]) for batch in val_loader])
        prediction = predict(
            self, val_loader, pred_type=pred_type, link_approx=link_approx, num_samples=num_samples, compile=compile
        )
        if self.likelihood == "classification":
            mean_probs = cast(Tensor, prediction.probs)  # set for classification
            probs = mean_probs.gather(-1, targets.to(mean_probs.device).long().view(-1, 1))
            return float(-probs.clamp_min(torch.finfo(probs.dtype).tiny).log().mean())
        mean, variance = cast(Tensor, prediction.mean), cast(Tensor, prediction.variance)  # set for regression
        y = targets.to(mean.device).reshape(mean.shape).float()
        return float(gaussian_nll(mean, y, variance).mean())

    def optimize_prior_precision(
        self,
        *,
        method: str = "marglik",
        per_layer: bool = False,
        val_loader: Iterable | None = None,
        grid: Sequence[float] | None = None,
        pred_type: str | None = None,
        link_approx: str = "probit",
        num_samples: int = 16,
        compile: bool = False,
    ) -> float | dict[str, float]:
        """Set lambda and return it.

        ``"marglik"``: the maximiser of ``log_marginal_likelihood`` (bisection in log lambda); with
        ``per_layer``, one lambda_b per Bayesian parameter (a dict by name), each the exact maximiser of
        its own terms of the evidence, which separates by parameter.
        ``"val_nll"``: the value of ``grid`` (default ``logspace(-4, 4, 21)``) with the lowest
        ``validation_nll(val_loader, pred_type=..., link_approx=..., num_samples=...)`` (the predictive
        the posterior will be used with; sampled predictives share their noise across the grid);
        values whose predictive overflows (NaN or infinite NLL) are never chosen.
        """
        self._require_fit()
        check_choice(method, "method", METHODS)
        if method == "marglik":
            self.prior_precision = self._marglik_argmax(per_layer)
            return self.prior_precision
        if per_layer:
            raise ValueError("per_layer=True needs method='marglik' (the validation search tunes one lambda)")
        if val_loader is None:
            raise ValueError("method='val_nll' needs a val_loader")
        grid = [float(v) for v in (torch.logspace(-4, 4, 21) if grid is None else grid)]
        if not grid:
            raise ValueError("grid must hold at least one prior precision")
        scores = []
        for value in grid:
            self.prior_precision = value
            score = self.validation_nll(
                val_loader, pred_type=pred_type, link_approx=link_approx, num_samples=num_samples, compile=compile
            )
            scores.append(score if math.isfinite(score) else math.inf)  # a too-wide posterior overflows
        if all(score == math.inf for score in scores):
            raise ValueError("the validation NLL is not finite for any prior precision of the grid")
        self.prior_precision = grid[min(range(len(grid)), key=scores.__getitem__)]
        return self.prior_precision

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything ``load_state_dict`` needs to rebuild the fitted posterior on the same model."""
        self._require_fit()
        return {
            "names": list(self.names),
            "likelihood": self.likelihood,
            "fisher_type": self.fisher_type,
            "prior_precision": self.prior_precision,
            "temperature": self.temperature,
            "noise_std": self.noise_std,
            "seed": self.seed,
            "log_likelihood": self.log_likelihood,
            "num_data": self.num_data,
            "mean": {n: t.clone() for n, t in self._map.items()},
            "prior": self.prior.state_dict(),
            **self._curvature_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict``; its parameter names must be this posterior's."""
        if list(state_dict["names"]) != self.names:
            raise ValueError(f"state_dict covers other parameters than this {type(self).__name__}")
        self.likelihood = state_dict["likelihood"]
        self.fisher_type = state_dict["fisher_type"]
        self.temperature = state_dict["temperature"]
        self.noise_std = check_positive(state_dict["noise_std"], "noise_std")
        self.setup = dataclasses.replace(self.setup, seed=int(state_dict["seed"]))
        self.log_likelihood = state_dict["log_likelihood"]
        self.num_data = int(state_dict["num_data"])
        params = dict(self.model.named_parameters())
        self._load_curvature(state_dict, params)
        self.prior.load_state_dict(state_dict["prior"])
        self._map = {n: t.detach().to(params[n].device, params[n].dtype).clone() for n, t in state_dict["mean"].items()}
        self._fitted = True
        self.prior_precision = state_dict["prior_precision"]
