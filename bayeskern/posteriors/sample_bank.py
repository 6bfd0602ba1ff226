"""SampleBank: the posterior an SGLD chain leaves behind, as a ``Posterior``.

Call ``update()`` after every optimizer step.  Counting those calls t = 1, 2, ..., the bank keeps the
iterate after step t when t > burnin and (t - burnin) is a multiple of thin.

* ``mode="samples"``: the kept iterates themselves, copied to ``device`` / ``dtype``, in a ring
  buffer of the newest ``max_samples``; ``sample(i)`` is stored sample ``i mod len(bank)`` (oldest
  first) and ``mean()`` their average.
* ``mode="moments"``: bounded memory whatever the chain length: Welford's running mean m and sum of
  squared deviations M2 of all kept iterates (k of them),

      k <- k + 1,   d = x - m,   m <- m + d / k,   M2 <- M2 + d * (x - m),   var = M2 / k,

  in float32 (float64 if ``dtype`` is float64); ``sample(i) = m + sqrt(var) * eps_i`` with eps_i the
  Philox normal of (seed, per-parameter offset, stream i), so sample i is the same draw every time.
  ``max_samples`` is unused in this mode.

Samples are returned on the model parameters' device and dtype, for ``bayeskern.predict``.

Data parallel: the replicas of a DDP run hold the same iterates (``BayesSGLD`` keys its noise alike on
every rank), so ``rank_zero_only=True`` keeps them once: on ranks other than 0 (``torch.distributed``'s
default group) ``update()`` is a no-op returning False and the bank stays empty.

Sharded (FSDP2, ``fully_shard``; create the bank after sharding the model): the bank stores each
rank's local shard of every kept iterate (memory 1/world of the whole, on ``device``), and
``sample``, ``mean`` and ``variance`` return DTensors laid out like the parameters, which
``bayeskern.predict`` takes as it takes the model's own.  The moments-mode draws read the Philox
counters of the global elements (``sharding.element_offset``), so sample i is the same draw whatever
the sharding.  ``rank_zero_only`` does not apply (every rank keeps its own shard).  ``state_dict()``
then holds DTensors, for ``torch.distributed.checkpoint``; ``load_checkpoint`` reads such a checkpoint
back on any number of ranks (or in one process, into an unsharded bank).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..batches import OutputFn
from ..distributed.ranks import is_rank_zero
from ..distributed.sharding import (
    common_mesh,
    element_offset,
    forward_with,
    from_local_like,
    is_sharded,
    local_tensor,
    shard_like,
)
from ..likelihoods import LIKELIHOODS
from ..ops import noise
from ..validation import check_choice, check_count, check_positive
from .selection import ParamSelection
from .setup import PosteriorSetup

MODES = ("samples", "moments")


class SampleBank:
    """Thinned SGLD iterates (or their running moments) of the selected parameters of ``model``.

    Args (docs/vocabulary.md):
        model: the network the optimizer updates (never modified by the bank).
        params, include_bias, include_norm: which parameters are Bayesian (``select_parameters``).
        burnin: number of initial steps discarded.
        thin: keep one iterate every ``thin`` steps after burn-in.
        max_samples: ring-buffer capacity in ``"samples"`` mode (the newest are kept).
        mode: ``"samples"`` or ``"moments"`` (see the module docstring).
        device, dtype: where and how the samples are stored (dtype None: the parameters' own).
        likelihood, noise_std: the likelihood ``bayeskern.predict`` uses.
        output_fn: ``(output, inputs) -> logits`` for outputs ``bayeskern.batches`` cannot read.
        seed: Philox key of the moments-mode samples (None: drawn on rank 0 and broadcast).
        rank_zero_only: under ``torch.distributed``, keep samples on rank 0 only (module docstring).
    """

    pred_type = "nn"  # bayeskern.predict runs the kept samples (protocol.Posterior.pred_type)

    def __init__(
        self,
        model: nn.Module,
        *,
        params: ParamSelection = None,
        include_bias: bool = True,
        include_norm: bool = True,
        burnin: int = 0,
        thin: int = 1,
        max_samples: int = 32,
        mode: str = "samples",
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        likelihood: str = "classification",
        noise_std: float = 1.0,
        output_fn: OutputFn | None = None,
        seed: int | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        self.burnin = check_count(burnin, "burnin", 0)
        self.thin = check_count(thin, "thin", 1)
        self.max_samples = check_count(max_samples, "max_samples", 1)
        self.mode = check_choice(mode, "mode", MODES)
        self.likelihood = check_choice(likelihood, "likelihood", LIKELIHOODS)
        self.noise_std = check_positive(noise_std, "noise_std")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        self.model, self.output_fn = model, output_fn
        self.rank_zero_only = bool(rank_zero_only)
        self.device, self.dtype = torch.device(device), dtype
        self.setup = PosteriorSetup.build(
            model, params=params, include_bias=include_bias, include_norm=include_norm, with_prior=False, seed=seed
        )
        self.names = self.setup.names
        params_by_name = dict(model.named_parameters())
        self._params = {n: params_by_name[n] for n in self.names}
        self.is_sharded = any(is_sharded(p) for p in self._params.values())  # predict asks
        if self.is_sharded:
            _check_sharded(self._params)
            if self.rank_zero_only:
                raise ValueError(
                    "rank_zero_only=True: a sharded model's ranks each keep their own shard of the samples"
                )
        self.num_updates = 0
        self._samples: deque[dict[str, Tensor]] = deque()
        self._count = 0
        self._mean: dict[str, Tensor] = {}
        self._m2: dict[str, Tensor] = {}

    @property
    def seed(self) -> int:
        """The Philox key of the moments-mode samples (``setup.seed``; a loaded state dict brings its own)."""
        return self.setup.seed

    def _storage_dtype(self, param: Tensor) -> torch.dtype:
        dtype = self.dtype or param.dtype
        if self.mode == "moments":
            return torch.float64 if dtype == torch.float64 else torch.float32
        return dtype

    def __len__(self) -> int:
        """Number of kept iterates (stored ones in samples mode, all in moments mode)."""
        return len(self._samples) if self.mode == "samples" else self._count

    @torch.no_grad()
    def update(self) -> bool:
        """Record one optimizer step; returns True if this iterate was kept (no-op on ranks other
        than 0 with ``rank_zero_only``)."""
        if self.rank_zero_only and not is_rank_zero():
            return False
        self._check_not_sharded_since()
        self.num_updates += 1
        t = self.num_updates - self.burnin
        if t <= 0 or t % self.thin:
            return False
        if self.mode == "samples":
            self._keep_sample()
        else:
            self._accumulate()
        return True

    def _keep_sample(self) -> None:
        if len(self._samples) < self.max_samples:
            self._samples.append(
                {
                    n: local_tensor(p.detach()).to(self.device, self._storage_dtype(p), copy=True)
                    for n, p in self._params.items()
                }
            )
            return
        oldest = self._samples.popleft()  # reuse its memory for the newest
        for n, p in self._params.items():
            oldest[n].copy_(local_tensor(p.detach()))
        self._samples.append(oldest)

    def _accumulate(self) -> None:
        self._count += 1
        for n, p in self._params.items():
            x = local_tensor(p.detach()).to(self.device, self._storage_dtype(p))
            if n not in self._mean:
                self._mean[n], self._m2[n] = torch.zeros_like(x), torch.zeros_like(x)
            delta = x - self._mean[n]
            self._mean[n].add_(delta, alpha=1.0 / self._count)
            self._m2[n].addcmul_(delta, x - self._mean[n])

    def _check_nonempty(self) -> None:
        if len(self) == 0:
            raise RuntimeError(
                f"SampleBank holds no samples yet ({self.num_updates} updates, burnin={self.burnin}, thin={self.thin})"
            )

    def _check_not_sharded_since(self) -> None:
        """The model must not have been sharded since (its parameters then are other, DTensor, objects)."""
        for n, p in self._params.items():
            current = self.model.get_parameter(n)
            if current is not p and is_sharded(current) != is_sharded(p):
                raise RuntimeError(
                    f"SampleBank: the model's parameter {n!r} was sharded after the bank was created; create the "
                    "SampleBank after sharding the model"
                )

    def _to_model(self, tensors: dict[str, Tensor], dtype: bool = True) -> dict[str, Tensor]:
        """Stored (local) tensors on the parameters' device (and dtype), as DTensors like them when sharded."""
        out = {}
        for n, t in tensors.items():
            p = self._params[n]
            local = t.to(p.device, p.dtype) if dtype else t.to(p.device)
            out[n] = from_local_like(local, p)
        return out

    def _local_variance(self) -> dict[str, Tensor]:
        if self.mode == "moments":
            return {n: m2 / self._count for n, m2 in self._m2.items()}
        return {n: torch.stack([s[n].float() for s in self._samples]).var(0, correction=0) for n in self.names}

    def variance(self) -> dict[str, Tensor]:
        """Per-parameter variance of the kept iterates (population form, M2 / k), on the bank's device
        (sharded: DTensors like the parameters, on their device)."""
        self._check_nonempty()
        variance = self._local_variance()
        return self._to_model(variance, dtype=False) if self.is_sharded else variance

    @torch.no_grad()
    def mean(self) -> dict[str, Tensor]:
        """Average of the kept iterates."""
        self._check_nonempty()
        if self.mode == "moments":
            return self._to_model(self._mean)
        return self._to_model({n: torch.stack([s[n].float() for s in self._samples]).mean(0) for n in self.names})

    def functional_forward(self, weights: dict[str, Tensor], inputs: Any) -> Any:
        """The sharded model's output on ``inputs`` with ``weights`` (a sample) for the Bayesian
        parameters (``sharding.forward_with``; the chain's current weights are restored): how
        ``bayeskern.predict`` runs a sharded bank, on every rank."""
        return forward_with(self.model, weights, inputs)

    def fixed_tensors(self) -> dict[str, Tensor]:
        """Nothing: every tensor but the Bayesian ones is the model's own."""
        return {}

    @torch.no_grad()
    def sample(self, index: int) -> dict[str, Tensor]:
        """Sample ``index``: stored iterate ``index mod len(self)``, or a Gaussian draw from the moments."""
        self._check_nonempty()
        index = check_count(index, "index", 0)
        if self.mode == "samples":
            return self._to_model(self._samples[index % len(self._samples)])
        draws = {}
        for n, var in self._local_variance().items():
            offset = self.setup.offsets[n] + element_offset(self._params[n])
            eps = noise.normal(var.shape, self.seed, offset, stream=index, device=var.device).to(var.dtype)
            draws[n] = self._mean[n] + var.sqrt() * eps
        return self._to_model(draws)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, step count and the samples or moments (DTensors like
        the parameters when sharded: the form ``torch.distributed.checkpoint`` saves)."""
        copy = lambda d: {n: from_local_like(t.clone(), self._params[n]) for n, t in d.items()}  # noqa: E731
        return {
            "mode": self.mode,
            "names": list(self.names),
            "burnin": self.burnin,
            "thin": self.thin,
            "max_samples": self.max_samples,
            "seed": self.seed,
            "likelihood": self.likelihood,
            "noise_std": self.noise_std,
            "num_updates": self.num_updates,
            "count": self._count,
            "num_samples": len(self._samples),
            "samples": [copy(s) for s in self._samples],
            "mean": copy(self._mean),
            "m2": copy(self._m2),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` of a bank over the same parameters and mode."""
        if state_dict["mode"] != self.mode or list(state_dict["names"]) != self.names:
            raise ValueError("state_dict is from a SampleBank with another mode or other parameters")
        for key in ("burnin", "thin", "max_samples", "likelihood", "noise_std", "num_updates"):
            setattr(self, key, state_dict[key])
        self.setup = dataclasses.replace(self.setup, seed=int(state_dict["seed"]))
        self._count = state_dict["count"]
        place = lambda d: {n: self._local_of(n, t) for n, t in d.items()}  # noqa: E731
        self._samples = deque(place(s) for s in state_dict["samples"])
        self._mean, self._m2 = place(state_dict["mean"]), place(state_dict["m2"])

    def _local_of(self, name: str, value: Tensor) -> Tensor:
        """What this rank stores of a saved tensor: the local shard of a DTensor (laid out like the
        parameter) or of a full tensor (sharded bank), the full tensor of a DTensor (unsharded bank)."""
        p = self._params[name]
        if is_sharded(p):
            value = local_tensor(value if is_sharded(value) else shard_like(value.to(p.device), p))
        elif is_sharded(value):
            value = cast(Any, value).full_tensor()
        return value.to(self.device, self._storage_dtype(p), copy=True)

    def load_checkpoint(self, checkpoint_id: Any, *, key: str = "bank") -> None:
        """Restore the bank saved under ``key`` of a ``torch.distributed.checkpoint`` checkpoint
        (``dcp.save({key: bank.state_dict(), ...})``), on any number of ranks: the stored sample count
        is read first, then the samples are loaded into tensors laid out like this bank's parameters
        (every rank must call it)."""
        import torch.distributed.checkpoint as dcp

        head: dict[str, Any] = {key: {"mode": "", "names": [], "num_samples": 0}}
        dcp.load(head, checkpoint_id=checkpoint_id)
        if head[key]["mode"] != self.mode or list(head[key]["names"]) != self.names:
            raise ValueError(f"checkpoint {checkpoint_id!r} holds a SampleBank with another mode or other parameters")
        state = self.state_dict()
        empty = {n: torch.zeros_like(p, dtype=self._storage_dtype(p)) for n, p in self._params.items()}
        state["samples"] = [{n: t.clone() for n, t in empty.items()} for _ in range(head[key]["num_samples"])]
        if self.mode == "moments":
            state["mean"], state["m2"] = empty, {n: t.clone() for n, t in empty.items()}
        dcp.load({key: state}, checkpoint_id=checkpoint_id)
        self.load_state_dict(state)


def _check_sharded(params: Mapping[str, Tensor]) -> None:
    """One mesh for all (``common_mesh``), no plain parameter among DTensors, contiguous local shards."""
    common_mesh(params.values(), "SampleBank's parameters")
    for n, p in params.items():
        if not is_sharded(p):
            raise ValueError(
                f"params: {n!r} is a plain tensor among DTensor (fully_shard-ed) parameters; shard the whole model"
            )
        element_offset(p)  # raises unless the local shard is a contiguous range (Shard(0))


__all__ = ["SampleBank"]
