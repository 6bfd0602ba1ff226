"""``KronLaplace``: the Laplace approximation with Kronecker-factored curvature (K-FAC; Martens and
Grosse 2015, Ritter et al. 2018; over LoRA adapters, Laplace-LoRA, Yang et al. 2024).
``posteriors/laplace.py`` has the maths every Laplace shares.

Blocks of the curvature F (``curvature/kron.py`` has the factors and their conventions):

* the weight of an ``nn.Linear`` or ungrouped ``nn.Conv2d`` (peft's LoRA ``A`` and ``B`` included):
  ``G kron A`` over the weight flattened to (outputs, inputs);
* the bias of such a layer: its own dense block ``G``;
* every other Bayesian parameter (norms, embeddings, grouped convolutions): the diagonal of its
  Fisher (``curvature.squared_gradients``, a second pass over the data).

With the eigendecompositions ``G = Q_G diag(l_G) Q_G^T`` and ``A = Q_A diag(l_A) Q_A^T`` (float64),
the block's eigenvalues are ``l_G,i l_A,j`` with eigenvectors ``q_G,i kron q_A,j``, so

* log determinant: ``sum_ij log(l_G,i l_A,j + lambda)``;
* sample s of a weight: ``W* + Q_G (eps_s * sqrt(T / (l_G l_A^T + lambda))) Q_A^T``, ``eps_s`` the
  Philox normals of (seed, the weight's element offsets, stream = s), shaped (outputs, inputs);
* marginal variances: ``T (Q_G o Q_G) (1 / (l_G l_A^T + lambda)) (Q_A o Q_A)^T`` (``o``: elementwise).

Data parallel: G, N A and the diagonal F are sums over examples, all-reduced once (``Laplace.fit``).
A ``fully_shard``-ed model is not supported (``DiagLaplace`` is).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..curvature import squared_gradients
from ..curvature.kron import kronecker_factors, kronecker_layers
from ..curvature.rows import JacobianRows, OuterRows, rotated_rows
from ..distributed.ranks import is_rank_zero
from ..ops import noise
from .gaussian import diagonal_functional_variance
from .laplace import Laplace


@dataclass(frozen=True)
class _Eigen:
    """The eigendecomposition of one Kronecker block ``G kron A`` (float64)."""

    l_g: Tensor
    q_g: Tensor
    l_a: Tensor
    q_a: Tensor

    @property
    def values(self) -> Tensor:
        """The block's eigenvalues ``l_G,i l_A,j`` as an (outputs, inputs) matrix."""
        return torch.outer(self.l_g, self.l_a)


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0: the factors are positive semi-definite) and eigenvectors, float64.

    LAPACK's symmetric solver can fail to converge on a factor with many repeated eigenvalues (a
    convolution's patches at zero padding, a ReLU's zeros); the SVD of a symmetric positive
    semi-definite matrix is its eigendecomposition (U S U^T), and it converges there."""
    symmetric = matrix.double()
    symmetric = (symmetric + symmetric.T) / 2
    try:
        values, vectors = torch.linalg.eigh(symmetric)
    except torch.linalg.LinAlgError:
        vectors, values, _ = torch.linalg.svd(symmetric)
    return values.clamp_min(0), vectors


class KronLaplace(Laplace):
    """K-FAC Laplace posterior over the selected parameters of ``model`` (module docstring); the
    arguments are ``Laplace``'s (``DiagLaplace``'s)."""

    _g: dict[str, Tensor] | None = None  # G per Kronecker parameter (a sum over examples)
    _a_sums: dict[str, Tensor] | None = None  # N A per Kronecker parameter
    _diagonal: dict[str, Tensor] | None = None  # F per other parameter
    _eigen: dict[str, _Eigen] | None = None  # decompositions, from the factors (cached)
    _variance_cache: dict[str, Tensor] | None = None  # _variances, for the current lambda and T

    def _forget(self) -> None:
        self._variance_cache = None  # the decompositions depend on neither lambda nor T

    def _check_fit(self, mesh: Any, reduce: bool | None) -> None:
        if mesh is not None:
            raise ValueError("fit: KronLaplace does not support a fully_shard-ed model; use DiagLaplace there")

    @property
    def kron_names(self) -> list[str]:
        """The Bayesian parameters with a Kronecker block (the others have a diagonal one)."""
        layers = kronecker_layers(self.model, self.names)
        return [n for n in self.names if n in layers]

    def _fit_curvature(
        self, loader: Iterable, sample_targets: Callable[[Tensor], Tensor] | None, progress: bool
    ) -> tuple[float, int]:
        kron = self.kron_names
        diagonal = [n for n in self.names if n not in kron]
        show = progress and is_rank_zero()
        loss, count = 0.0, 0
        self._g, self._a_sums, self._diagonal = {}, {}, {}
        if kron:
            factors = kronecker_factors(
                self.model,
                loader,
                self.nll,
                kron,
                sample_targets=sample_targets,
                output_fn=self.output_fn,
                progress=show,
            )
            self._g, self._a_sums = factors.g, factors.a_sums
            loss, count = factors.loss, factors.num_examples
        if diagonal:
            result = squared_gradients(
                self.model,
                loader,
                self.nll,
                diagonal,
                sample_targets=sample_targets,
                output_fn=self.output_fn,
                progress=show,
            )
            if kron and result.num_examples != count:
                raise ValueError(
                    f"the loader yielded {count} examples, then {result.num_examples}: KronLaplace reads it twice "
                    "(Kronecker factors, then the diagonal blocks); pass a re-iterable loader"
                )
            self._diagonal = result.fisher
            loss, count = result.loss, result.num_examples
        self._eigen = None
        return loss, count

    def _curvature_sums(self) -> dict[str, Tensor]:
        assert self._g is not None and self._a_sums is not None and self._diagonal is not None, "set by the fit"
        return {
            **{f"G/{n}": t for n, t in self._g.items()},
            **{f"A/{n}": t for n, t in self._a_sums.items()},
            **{f"F/{n}": t for n, t in self._diagonal.items()},
        }

    def _decomposed(self) -> dict[str, _Eigen]:
        self._require_fit()
        if self._eigen is None:
            assert self._g is not None and self._a_sums is not None, "set by the fit"
            eigen = {}
            for name, g in self._g.items():
                l_g, q_g = _eigh(g)
                l_a, q_a = _eigh(self._a_sums[name] / self.num_data)
                eigen[name] = _Eigen(l_g, q_g, l_a, q_a)
            self._eigen = eigen
        return self._eigen

    def _diagonal_fisher(self) -> dict[str, Tensor]:
        self._require_fit()
        assert self._diagonal is not None, "set by the fit"
        return self._diagonal

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``(G, A)`` per Kronecker parameter (``curvature/kron.py``)."""
        self._require_fit()
        assert self._g is not None and self._a_sums is not None, "set by the fit"
        return {n: (g, self._a_sums[n] / self.num_data) for n, g in self._g.items()}

    @property
    def fisher(self) -> dict[str, Tensor]:
        """F of the parameters without a Kronecker block (their summed squared per-example gradients)."""
        return dict(self._diagonal_fisher())

    def _eigenvalues(self) -> dict[str, Tensor]:
        values = {n: e.values.flatten() for n, e in self._decomposed().items()}
        return {**values, **self._diagonal_fisher()}

    def _variances(self, name: str) -> Tensor:
        """``T / (e + lambda)``: the posterior variances of parameter ``name`` along its curvature's
        eigenvectors (an (outputs, inputs) matrix for a Kronecker block, the parameter's shape for a
        diagonal one)."""
        if self._variance_cache is None:
            self._variance_cache = {}
        if name not in self._variance_cache:
            eigen = self._decomposed().get(name)
            values = self._diagonal_fisher()[name] if eigen is None else eigen.values
            self._variance_cache[name] = self.temperature / (values + self.precision_of(name))
        return self._variance_cache[name]

    def std(self) -> dict[str, Tensor]:
        """Marginal posterior standard deviations (module docstring)."""
        stds = {}
        for name in self.names:
            eigen = self._decomposed().get(name)
            variance = self._variances(name)
            if eigen is not None:
                variance = (eigen.q_g.square() @ variance @ eigen.q_a.square().T).reshape(self._map[name].shape)
            stds[name] = variance.sqrt().to(self._map[name].dtype)
        return stds

    def functional_variance(self, jacobians: JacobianRows) -> Tensor:
        """Per Kronecker block, ``sum_ij (Q_G^T J Q_A)_ij^2 T / (l_G,i l_A,j + lambda)`` with J the row
        shaped (outputs, inputs) (``OuterRows`` rotate their factors, in their own dtype); the diagonal
        blocks as ``DiagLaplace``."""
        diagonal = {n: self._variances(n) for n in self._diagonal_fisher()}
        total = diagonal_functional_variance(jacobians, diagonal) if diagonal else None
        for name, e in self._decomposed().items():
            rows = jacobians[name]
            if isinstance(rows, OuterRows):
                term = rows.rotated(e.q_g, e.q_a).weighted_square_sum(self._variances(name)).double()
            else:
                shape = self._map[name].shape
                dense = rows.double()
                lead = dense.shape[: dense.dim() - len(shape)]
                rotated = rotated_rows(dense.reshape(*lead, e.l_g.numel(), -1), e.q_g, e.q_a)
                term = (rotated.square() * self._variances(name)).sum((-2, -1))
            total = term if total is None else total + term
        assert total is not None, "a Laplace has at least one Bayesian parameter"
        return total

    def _draw(self, name: str, index: int) -> Tensor:
        mean = self._map[name]
        eigen = self._decomposed().get(name)
        if eigen is None:
            std = self._variances(name).sqrt().to(mean.dtype)
            return noise.gaussian(mean, std, self.seed, self.offsets[name], stream=index)
        rows = eigen.l_g.numel()
        eps = noise.normal(
            (rows, mean.numel() // rows), self.seed, self.offsets[name], stream=index, device=mean.device
        )
        scale = self._variances(name).sqrt().to(eps.dtype)
        q_g, q_a = eigen.q_g.to(eps.dtype), eigen.q_a.to(eps.dtype)  # the rotation in the noise's float32
        delta = q_g @ (eps * scale) @ q_a.T
        return mean + delta.reshape(mean.shape).to(mean.dtype)

    def _curvature_state(self) -> dict[str, Any]:
        self._require_fit()
        assert self._g is not None and self._a_sums is not None and self._diagonal is not None, "set by the fit"
        return {
            "kron_g": {n: t.clone() for n, t in self._g.items()},
            "kron_a_sums": {n: t.clone() for n, t in self._a_sums.items()},
            "fisher": {n: t.clone() for n, t in self._diagonal.items()},
        }

    def _load_curvature(self, state: Mapping[str, Any], params: Mapping[str, Tensor]) -> None:
        if set(state["kron_g"]) != set(self.kron_names):
            raise ValueError("state_dict: its Kronecker blocks are not this KronLaplace's")
        device = lambda n: params[n].device  # noqa: E731
        self._g = {n: t.detach().to(device(n)).clone() for n, t in state["kron_g"].items()}
        self._a_sums = {n: t.detach().to(device(n)).clone() for n, t in state["kron_a_sums"].items()}
        self._diagonal = {n: t.detach().to(device(n)).clone() for n, t in state["fisher"].items()}
        self._eigen = None
