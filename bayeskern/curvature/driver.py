"""The driver: one forward and one backward pass per batch accumulate, for every chosen parameter,

    F = sum over examples n of (d l_n / d theta)^2,

``l_n`` the loss of example n alone.  ``loss_fn(output, target)`` must be a sum of per-example
terms (``reduction="sum"``) or their mean (``reduction="mean"``; the batch loss is multiplied by
the batch size B before differentiating, so both give the same F).  Rule and broadcast parameters
(``tracing.py``) cost one backward pass with respect to activations only, the weight-gradient
GEMMs replaced by the squared ones; fallback parameters add a torch.func pass over the batch.

The model runs in eval mode (dropout off, BatchNorm on its running statistics, so examples are
independent) and is restored afterwards; it is never edited, and ``.grad`` is never written.

A ``fully_shard``-ed model (FSDP2; every rank calls with its own batches, as many as the others):
the result holds DTensors laid out like the parameters, each rank's shard of F over the union of the
ranks' examples (``sums.py``); ``loss`` and ``num_examples`` stay this rank's.  Every chosen parameter
must then be served by a rule or a broadcast (the torch.func fallback and the unused-parameter check
run the model outside FSDP2's gathering, so they raise instead).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves, tree_map
from tqdm.auto import tqdm

from ..batches import OutputFn, as_call, batch_length, logits_of, split_batch
from ..distributed.sharding import from_local_like, is_sharded, local_tensor
from .fallback import PerExample
from .sums import Sums
from .tracing import Plan, Probe, Tap

REDUCTIONS = ("sum", "mean")


@dataclass
class SquaredGradients:
    """What a pass over the data produced."""

    fisher: dict[str, Tensor]  # name -> sum of squared per-example gradients (float32/float64; DTensor if sharded)
    loss: float  # sum over examples of loss_fn(output, true target) (per-example convention)
    num_examples: int
    plan: Plan


def _to(value: Any, device: torch.device) -> Any:
    """Tensors moved to ``device`` and detached (a gradient-carrying input would bypass the trigger)."""
    return tree_map(lambda t: t.detach().to(device) if isinstance(t, Tensor) else t, value)


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')[:200]}"


def _warn(message: str) -> None:
    """A RuntimeWarning from ``squared_gradients`` (Python's default filter shows each message once)."""
    warnings.warn(f"squared_gradients: {message}", RuntimeWarning, stacklevel=3)


def _same_outputs(out: Any, expected: Any) -> bool:
    outs, wanted = tree_leaves(out), tree_leaves(expected)
    return len(outs) == len(wanted) and all(
        not isinstance(o, Tensor) or (o.shape == w.shape and torch.allclose(o.float(), w.float(), rtol=1e-3, atol=1e-5))
        for o, w in zip(outs, wanted)
    )


class _Pass:
    """State of one accumulation: the plan (from the first batch) and the accumulators."""

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        loss_fn: Callable[[Any, Tensor], Tensor],
        reduction: str,
        sample_targets: Callable[[Tensor], Tensor] | None,
        output_fn: OutputFn | None,
    ) -> None:
        self.model, self.reduction, self.sample_targets = model, reduction, sample_targets
        self.raw_loss_fn, self.output_fn = loss_fn, output_fn
        self.params = dict(model.named_parameters())
        self.chosen = {name: self.params[name] for name in names}
        self.fisher = {  # of the local shard's shape for a sharded parameter
            name: torch.zeros(
                local_tensor(p).shape,
                dtype=torch.float64 if p.dtype == torch.float64 else torch.float32,
                device=p.device,
            )
            for name, p in self.chosen.items()
        }
        sharded = any(is_sharded(p) for p in self.chosen.values())
        self.sharded_model = model if sharded else None
        self.plan: Plan | None = None
        self.trigger = torch.zeros((), device=next(iter(self.chosen.values())).device, requires_grad=True)
        self.loss = 0.0
        self.num_examples = 0
        self.per_example = PerExample()

    def _tap_forward(self, args: tuple, kwargs: dict, batch: int) -> Any:
        plan = self.plan
        assert plan is not None, "the first batch sets the plan"
        tapped = plan.rule + list(plan.broadcast) + plan.viewed
        if not tapped:
            with torch.no_grad():
                return self.model(*args, **kwargs)
        fisher = Sums({name: self.fisher[name] for name in tapped}, self.params)
        with torch.enable_grad(), Tap(self.params, fisher, plan, self.trigger, batch, self.sharded_model):
            return self.model(*args, **kwargs)

    def _unseen_but_used(self, args: tuple, kwargs: dict, y: Tensor) -> list[str]:
        """Of the parameters the probe never saw, those the loss depends on all the same (used by
        code the tracing cannot see, e.g. a C++ op): a plain backward on this batch tells."""
        plan = self.plan
        assert plan is not None, "the first batch sets the plan"
        if not plan.unused:
            return []
        # frozen ones (peft's base weights, a ModulesToSaveWrapper's original_module) are asked
        # through stand-ins that require grad; the model is not touched
        stand_ins = {
            name: self.params[name].detach().requires_grad_()
            for name in plan.unused
            if not self.params[name].requires_grad
        }
        asked = {name: stand_ins.get(name, self.params[name]) for name in plan.unused}
        with torch.enable_grad():
            out = functional_call(self.model, stand_ins, args, kwargs) if stand_ins else self.model(*args, **kwargs)
            loss = self.loss_fn(out, y, (args, kwargs))
            if not loss.requires_grad:
                return []
            grads = torch.autograd.grad(loss, list(asked.values()), allow_unused=True)
        return [name for name, g in zip(asked, grads) if g is not None]

    def _probe(self, args: tuple, kwargs: dict, batch: int) -> tuple[Plan, Any]:
        probe = Probe(self.chosen, batch, self.sharded_model)
        with torch.no_grad(), probe:
            out = self.model(*args, **kwargs)
        return probe.plan(), out

    def _first_forward(self, args: tuple, kwargs: dict, y: Tensor, batch: int) -> Any:
        """Plan on the first batch, probed at two batch sizes (B and a slice of 1-2 examples): a
        parameter whose treatment differs (a sequence-first layer whose length equals B) falls
        back.  So do leading-one parameters whose expansion to the batch changes the output (they
        are reduced over, or meet another axis) and parameters used where the probe cannot see them."""
        self.plan, expected = self._probe(args, kwargs, batch)
        if batch > 1:
            small = 2 if batch > 2 else 1
            sliced_args, sliced_kwargs = tree_map(lambda t: t[:small] if _is_batched(t, batch) else t, (args, kwargs))
            try:
                self.plan.agree(self._probe(sliced_args, sliced_kwargs, small)[0])
            except RuntimeError as error:  # a model that cannot run so few examples: keep the first plan
                _warn(f"the plan was checked at batch size {batch} only ({small} examples failed: {_reason(error)})")
        self._check_sharded_plan()
        if self.plan.unused:
            hidden = self._unseen_but_used(args, kwargs, y)
            self.plan.unused = [name for name in self.plan.unused if name not in hidden]
            self.plan.fallback += hidden
        if self.plan.broadcast or self.plan.viewed:
            moved = list(self.plan.broadcast) + self.plan.viewed
            try:
                out = self._tap_forward(args, kwargs, batch)
                if _same_outputs(out, expected):
                    return out
            except RuntimeError as error:  # the outputs differing is the designed check; an error is not
                _warn(
                    f"{', '.join(moved)} go to the torch.func fallback: their broadcast rules raised {_reason(error)}"
                )
            self.plan.fallback += moved
            self.plan.broadcast, self.plan.viewed = {}, []
            self._check_sharded_plan()
        return self._tap_forward(args, kwargs, batch)

    def _check_sharded_plan(self) -> None:
        plan = self.plan
        assert plan is not None, "the first batch sets the plan"
        unserved = plan.fallback + plan.unused
        if self.sharded_model is not None and unserved:
            raise ValueError(
                f"parameters {unserved} of the fully_shard-ed model need the torch.func fallback or are not seen "
                "in the forward pass, which a sharded model does not support; leave them out (params=...)"
            )

    def loss_fn(self, out: Any, target: Tensor, call: tuple[tuple, dict[str, Any]]) -> Tensor:
        """``loss_fn`` on the logits read from the model's output for the inputs of ``call``."""
        args, kwargs = call
        return self.raw_loss_fn(logits_of(out, kwargs if kwargs else args, self.output_fn), target)

    def step(self, x: Any, y: Tensor) -> None:
        device = self.trigger.device
        args, kwargs = _to(as_call(x), device)
        y = y.to(device)
        batch = batch_length((args, kwargs))
        out = (
            self._first_forward(args, kwargs, y, batch) if self.plan is None else self._tap_forward(args, kwargs, batch)
        )
        scale = batch if self.reduction == "mean" else 1
        logits = logits_of(_detach(out), kwargs if kwargs else args, self.output_fn)
        target = y if self.sample_targets is None else self.sample_targets(logits)
        loss = self.loss_fn(out, target, (args, kwargs)) * scale
        if isinstance(loss, Tensor) and loss.requires_grad:
            torch.autograd.grad(loss, self.trigger, allow_unused=True)
        true_loss = loss if self.sample_targets is None else self.raw_loss_fn(logits, y) * scale
        self.loss += float(true_loss.detach())
        self.num_examples += batch
        plan = self.plan
        assert plan is not None, "the first batch sets the plan"
        if plan.fallback:
            fisher = {name: self.fisher[name] for name in plan.fallback}
            self.per_example(self.model, fisher, args, kwargs, target, self.loss_fn)


def _is_batched(value: Any, batch: int) -> bool:
    """Whether ``value`` is a tensor of the batch's examples (first dimension ``batch``)."""
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch


def _detach(out: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)


def squared_gradients(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[Any, Tensor], Tensor],
    names: Sequence[str] | None = None,
    *,
    reduction: str = "sum",
    sample_targets: Callable[[Tensor], Tensor] | None = None,
    output_fn: OutputFn | None = None,
    progress: bool = False,
) -> SquaredGradients:
    """Sum over all examples of ``batches`` of the squared per-example gradients of ``loss_fn``.

    ``batches`` yields loader batches (``bayeskern.batches``: ``(inputs, targets, ...)`` or a Mapping
    holding ``labels``); the inputs (a tensor, a sequence of positional arguments or a Mapping of
    keyword arguments) have the examples along the first dimension.  ``loss_fn(logits, targets)``
    sees the logits read from the model's output (``bayeskern.batches.logits_of``, ``output_fn``).
    ``names`` picks parameters (default: all).  ``sample_targets(logits)``, if given, draws the
    targets the gradients are taken for (the MC Fisher) instead of ``y``; ``loss`` in the result
    always uses ``y``.  Raises ValueError for an empty ``batches``, an unknown name or reduction, a
    batch without targets.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    params = dict(model.named_parameters())
    names = list(params) if names is None else list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"names: {unknown} are not parameters of the model")
    if not names:
        raise ValueError("names selects no parameter")
    state = _Pass(model, names, loss_fn, reduction, sample_targets, output_fn)
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for batch in tqdm(batches, disable=not progress, desc="fisher"):
            inputs, targets = split_batch(batch)
            # split_batch raises for a batch holding no targets (need_targets); typed for step only
            state.step(inputs, cast(Tensor, targets))
    finally:
        for module, mode in training.items():
            module.training = mode
    if state.plan is None:
        raise ValueError("no batches to accumulate (the loader is empty)")
    fisher = {name: from_local_like(f, params[name]) for name, f in state.fisher.items()}
    return SquaredGradients(fisher, state.loss, state.num_examples, state.plan)
