"""``DiagonalGaussian``: a fixed mean-field Gaussian ``N(mean, diag(std^2))`` over some parameters of a
model, as an optimizer's posterior is handed to ``bayeskern.predict`` (``IVON.posterior``).

Sample i of parameter ``name`` is ``mean + std * eps``, eps the Philox normals of (seed, the
parameter's element offsets, stream = i): deterministic in i, so the predictive may chunk and
compile its loop.  The posterior is Gaussian, so the linearised (``"glm"``) predictive serves it too
(``functional_variance``); its default predictive is the sampled network (``"nn"``).  Its tensors are
snapshots: training the model on does not move them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..batches import Inputs, OutputFn, as_call, move_to
from ..curvature.rows import JacobianRows
from ..ops import noise, philox
from ..validation import check_choice, check_positive
from .gaussian import diagonal_functional_variance

LIKELIHOODS = ("classification", "regression")


class DiagonalGaussian:
    """``N(mean, diag(std^2))`` over the parameters ``mean`` names (module docstring).

    Args:
        model: the module the parameters belong to (``model.named_parameters()`` names).
        mean, std: one tensor per Bayesian parameter name, shaped like the parameter (std > 0).
        seed: Philox key of the samples.
        likelihood: ``"classification"`` or ``"regression"``.
        noise_std: the regression likelihood's observation-noise std.
        output_fn: ``(output, inputs) -> logits`` for outputs ``bayeskern.batches`` cannot read.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Mapping[str, Tensor],
        std: Mapping[str, Tensor],
        *,
        seed: int,
        likelihood: str = "classification",
        noise_std: float = 1.0,
        output_fn: OutputFn | None = None,
    ) -> None:
        shapes = {name: p.shape for name, p in model.named_parameters()}
        unknown = [name for name in mean if name not in shapes]
        if unknown:
            raise ValueError(f"mean: {unknown} are not parameters of the model")
        if set(std) != set(mean):
            raise ValueError("std: needs one tensor per name of mean")
        for name in mean:
            if mean[name].shape != shapes[name] or std[name].shape != shapes[name]:
                raise ValueError(f"mean/std of {name!r} must have the parameter's shape {tuple(shapes[name])}")
            if not bool((std[name] > 0).all()) or not bool(torch.isfinite(std[name]).all()):
                raise ValueError(f"std of {name!r} must be positive and finite")
        self.model = model
        self.names = [name for name in shapes if name in mean]  # model order
        self._mean = {name: mean[name].detach().clone() for name in self.names}
        self._std = {name: std[name].detach().clone() for name in self.names}
        self.offsets = philox.named_offsets({name: shapes[name] for name in self.names})
        philox.check_key(seed, 0)
        self.seed = seed
        self.likelihood = check_choice(likelihood, "likelihood", LIKELIHOODS)
        self.noise_std = check_positive(noise_std, "noise_std")
        self.output_fn = output_fn

    @property
    def is_sharded(self) -> bool:
        return False

    @property
    def pred_type(self) -> str:
        return "nn"

    def mean(self) -> dict[str, Tensor]:
        return dict(self._mean)

    def std(self) -> dict[str, Tensor]:
        return dict(self._std)

    def sample(self, index: int) -> dict[str, Tensor]:
        return {
            name: noise.gaussian(self._mean[name], self._std[name], self.seed, self.offsets[name], stream=index)
            for name in self.names
        }

    def fixed_tensors(self) -> dict[str, Tensor]:
        return {}

    def functional_forward(self, weights: dict[str, Tensor], inputs: Inputs) -> Any:
        state = {n: t.detach() for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
        device = next(iter(self._mean.values())).device
        args, kwargs = as_call(move_to(inputs, device))
        return functional_call(self.model, {**state, **weights}, args, kwargs)

    def functional_variance(self, jacobians: JacobianRows) -> Tensor:
        """``sum_p j_p^2 std_p^2`` (``protocol.GaussianPosterior``; the linearised predictive)."""
        return diagonal_functional_variance(jacobians, {name: s.square() for name, s in self._std.items()})

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loads with ``torch.load(..., weights_only=True)``)."""
        return {
            "names": list(self.names),
            "mean": {n: t.clone() for n, t in self._mean.items()},
            "std": {n: t.clone() for n, t in self._std.items()},
            "seed": self.seed,
            "likelihood": self.likelihood,
            "noise_std": self.noise_std,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict`` of a posterior over the same parameters."""
        if list(state_dict["names"]) != self.names:
            raise ValueError("state_dict covers other parameters than this DiagonalGaussian")
        restored = DiagonalGaussian(
            self.model,
            state_dict["mean"],
            state_dict["std"],
            seed=int(state_dict["seed"]),
            likelihood=state_dict["likelihood"],
            noise_std=float(state_dict["noise_std"]),
            output_fn=self.output_fn,
        )
        self.__dict__.update(restored.__dict__)
