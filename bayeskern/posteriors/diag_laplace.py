"""``DiagLaplace``: the Laplace approximation with a diagonal curvature (``posteriors/laplace.py`` has
the maths every Laplace shares).

The curvature is ``F = sum_n g_n^2`` over the training set (elementwise), ``g_n`` the gradient of
example n's negative log-likelihood (``curvature.squared_gradients``): its eigenvectors are the
coordinate axes and its eigenvalues the entries of F, so the posterior is
``N(theta*, diag(T / (F + lambda)))`` and sample s is ``theta* + eps_s * sqrt(T / (F + lambda))``,
drawn through ``ops.noise.gaussian`` with the std computed once for all samples.

Sharded (FSDP2, a ``fully_shard``-ed model; the posterior may be created before or after sharding,
and is fitted after): each rank feeds its own batches (as many as the other ranks), the curvature
driver forms each block's squared per-example gradients while FSDP2 has the block gathered and
reduce-scatters them (``curvature/sums.py``), so ``fisher``, ``mean``, ``std`` and the prior means are
DTensors laid out like the parameters, each rank holding its shard of F over the union of the data.
Sums over the parameters (the evidence, the marglik search) add the ranks' shards with one all-reduce
each.  Sample s draws element j with the Philox counter of its global index
(``distributed.sharding.element_offset``), so it equals the single-process sample;
``bayeskern.predict`` takes the DTensor samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from ..curvature import squared_gradients
from ..curvature.rows import JacobianRows
from ..distributed.ranks import is_rank_zero
from ..distributed.sharding import common_mesh, element_offset, from_local_like, is_sharded, local_tensor
from ..ops import noise
from .gaussian import diagonal_functional_variance
from .laplace import Laplace


class DiagLaplace(Laplace):
    """Diagonal Laplace posterior over the selected parameters of ``model`` (module docstring); the
    arguments are ``Laplace``'s."""

    _fisher: dict[str, Tensor] | None = None
    _std: dict[str, Tensor] | None = None
    _variance_cache: dict[str, Tensor] | None = None

    def _forget(self) -> None:
        self._std = None  # std(), computed once for all samples
        self._variance_cache = None  # std()^2, once for all batches of the linearised predictive

    def _check_fit(self, mesh: Any, reduce: bool | None) -> None:
        if mesh is None:
            return
        if reduce is False:
            raise ValueError("fit: reduce=False is not possible on a fully_shard-ed model (its F is reduced)")
        params = dict(self.model.named_parameters())
        if not all(is_sharded(params[n]) for n in self.names):
            raise ValueError("fit: the model mixes DTensor (fully_shard-ed) and plain parameters; shard it whole")
        self._shard_prior(params)

    def _fit_curvature(
        self, loader: Iterable, sample_targets: Callable[[Tensor], Tensor] | None, progress: bool
    ) -> tuple[float, int]:
        result = squared_gradients(
            self.model,
            loader,
            self.nll,
            self.names,
            sample_targets=sample_targets,
            output_fn=self.output_fn,
            progress=progress and is_rank_zero(),
        )
        self._fisher = result.fisher
        return result.loss, result.num_examples

    def _curvature_sums(self) -> dict[str, Tensor]:
        assert self._fisher is not None, "set by _fit_curvature"
        return self._fisher

    def _require_fisher(self) -> dict[str, Tensor]:
        self._require_fit()
        assert self._fisher is not None, "set with the fit"
        return self._fisher

    def _shard_prior(self, params: Mapping[str, Tensor]) -> None:
        """Lay out the prior's tensors like the sharded ``params`` unless they are already (a posterior
        created before the model was sharded, or a sharded state loaded into one created after)."""
        tensors = [self.prior.mean(n) for n in self.names if not self.prior.is_zero_mean(n)]
        tensors += [sp for n in self.names if isinstance(sp := self.prior.std(n), Tensor)]
        if not all(is_sharded(t) for t in tensors):
            self.prior.shard_like(params)

    @property
    def fisher(self) -> dict[str, Tensor]:
        """F per parameter name: the summed squared per-example gradients."""
        return dict(self._require_fisher())

    @property
    def posterior_precision(self) -> dict[str, Tensor]:
        """``(F + lambda) / T`` per parameter name (infinite at T = 0)."""
        return {name: (f + self.precision_of(name)) / self.temperature for name, f in self._require_fisher().items()}

    def _eigenvalues(self) -> dict[str, Tensor]:
        return {n: local_tensor(f) for n, f in self._require_fisher().items()}

    def std(self) -> dict[str, Tensor]:
        """Posterior standard deviations ``sqrt(T / (F + lambda))``."""
        scale = math.sqrt(self.temperature)
        return {name: (f + self.precision_of(name)).rsqrt() * scale for name, f in self._require_fisher().items()}

    def functional_variance(self, jacobians: JacobianRows) -> Tensor:
        """``sum_p j_p^2 T / (F_p + lambda)``."""
        if self._variance_cache is None:
            self._variance_cache = {name: std.square() for name, std in self.std().items()}
        return diagonal_functional_variance(jacobians, self._variance_cache)

    def _draw(self, name: str, index: int) -> Tensor:
        if self._std is None:
            self._std = {n: local_tensor(s.to(self._map[n].dtype)) for n, s in self.std().items()}
        mean = self._map[name]
        offset = self.offsets[name] + element_offset(mean)
        local = noise.gaussian(local_tensor(mean), self._std[name], self.seed, offset, stream=index)
        return from_local_like(local, mean)

    def _curvature_state(self) -> dict[str, Any]:
        return {"fisher": {n: t.clone() for n, t in self._require_fisher().items()}}

    def _load_curvature(self, state: Mapping[str, Any], params: Mapping[str, Tensor]) -> None:
        if any(is_sharded(t) for t in state["fisher"].values()):
            self._shard_prior(params)
        self._fisher = {n: t.detach().to(params[n].device).clone() for n, t in state["fisher"].items()}
        self._mesh = common_mesh(self._fisher.values(), "tensors of the state_dict")  # DTensors: a sharded fit
