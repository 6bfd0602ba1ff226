"""Seeing how a network uses its parameters, without editing it: two ``TorchFunctionMode``s.

``Probe`` watches one forward pass and assigns every chosen parameter a treatment (``Plan``):

* ``rule``      -- the ``weight``/``bias`` of exactly one call of an op in ``rules.RULES`` (batch-first
  input, supported configuration) and used nowhere else;
* ``broadcast`` -- never such an argument, and either of shape ``(1, ...)`` (class token, position
  embedding) or used once, in an elementwise op with a batch-first operand of higher rank
  (LayerScale); the driver checks that the network computes the same with it expanded to the batch;
* ``viewed``    -- used once, by a view op giving shape ``(1, ...)`` (ConvNeXt's
  ``gamma.reshape(1, -1, 1, 1)``): that view is expanded to the batch instead (checked likewise);
* ``unused``    -- seen in no op (the driver checks with one plain backward that the loss does not
  depend on it either -- through a stand-in requiring grad for a frozen parameter, e.g. the unused
  ``original_module`` of peft's ModulesToSaveWrapper; then its Fisher stays zero);
* ``fallback``  -- anything else (shared weights, custom maths, a view read as an attribute such as
  peft's ``lora_embedding_A.T``): per-example gradients by torch.func.

Attribute reads (``p.shape``) are no use, except those giving a differentiable view (``p.T``,
``p.mT``, ...); in ``Tap`` these are detached like every other use of a parameter, so no
parameter reaches the graph except through the trigger (one that did would let the backward pass
skip the hooks).

``Tap`` runs the forward pass of the Fisher computation.  Every model parameter reaching an op is
detached, so the backward pass computes no weight gradient at all; a zero scalar ``trigger``
(requiring grad) is added to the outputs of rule ops whose inputs carry no gradient, so the whole
graph hangs from it (and to outputs that are views: a hook on a view is lost if the view is later
modified in place, e.g. ``linear(x).mul_(gamma)`` for 3-d x).  Hooks on the outputs of rule ops
(and on the expanded broadcast parameters) receive ``dL/dy`` and accumulate the squared
per-example gradients, replacing the weight-gradient GEMM of a plain backward by the squared one.
``torch.autograd.grad(loss, trigger)`` runs it.

A ``fully_shard``-ed model (FSDP2) swaps each block's DTensor parameters for gathered plain ones
around its forward and backward; given the model, both modes name those too (looked up in
``model.named_parameters()`` when an unknown parameter first reaches an op), and the hooks add
through ``sums.Sums``, which reduces the full contributions to each rank's shard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from .rules import (
    ROLES,
    RULES,
    VIEWS,
    Rule,
    add_square_sum,
    broadcastable,
    elementwise_rank,
    expand_to_batch,
    is_batch_broadcast_view,
)
from .sums import Sums

_CONTAINERS = (tuple, list, dict)


def _is_attribute_read(func: Callable) -> bool:
    return getattr(func, "__name__", "") == "__get__"  # p.shape, p.dtype, ...: not a use


# attribute reads that are differentiable views of the tensor (peft's ``lora_embedding_A.T``): a use
VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


def _is_view_read(func: Callable) -> bool:
    return getattr(getattr(func, "__self__", None), "__name__", None) in VIEW_ATTRIBUTES


@dataclass
class Plan:
    """The treatment of every chosen parameter (see the module docstring)."""

    rule: list[str] = field(default_factory=list)
    broadcast: dict[str, int] = field(default_factory=dict)  # name -> rank it is expanded to
    viewed: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)

    def treatment(self, name: str) -> tuple[str, Any]:
        for kind in ("rule", "viewed", "unused", "fallback"):
            if name in getattr(self, kind):
                return kind, None
        return "broadcast", self.broadcast.get(name)

    def agree(self, other: Plan) -> None:
        """Send to the fallback every parameter ``other`` (a probe at another batch size) treats
        differently: which axis is the batch must not depend on a coincidence of sizes."""
        for name in self.rule + list(self.broadcast) + self.viewed:
            if self.treatment(name) != other.treatment(name):
                if name in self.broadcast:
                    del self.broadcast[name]
                else:
                    (self.rule if name in self.rule else self.viewed).remove(name)
                self.fallback.append(name)


class _ParamModes(TorchFunctionMode):
    def __init__(self, params: Mapping[str, Tensor], batch: int, model: nn.Module | None = None) -> None:
        super().__init__()
        self.names = {id(p): name for name, p in params.items()}
        self.batch = batch
        self.model = model  # a sharded model: its gathered parameters are named on first sight
        self.unknown: set[int] = set()

    def name(self, value: Any) -> str | None:
        if not isinstance(value, Tensor):
            return None
        found = self.names.get(id(value))
        if (
            found is None
            and self.model is not None
            and isinstance(value, nn.Parameter)
            and id(value) not in self.unknown
        ):
            wanted = set(self.names.values())
            self.names.update({id(p): n for n, p in self.model.named_parameters() if n in wanted})
            found = self.names.get(id(value))
            if found is None:
                self.unknown.add(id(value))
        return found


class Probe(_ParamModes):
    """Counts, for each chosen parameter, its uses as a rule op's weight/bias and its other uses."""

    def __init__(self, params: Mapping[str, Tensor], batch: int, model: nn.Module | None = None) -> None:
        super().__init__(params, batch, model)
        self.params = params
        self.rule_uses: Counter[str] = Counter()
        self.other_uses: Counter[str] = Counter()
        self.unsupported: set[str] = set()
        self.ranks: dict[str, int] = {}  # rank of the batch-first operand of an elementwise use
        self.viewed: set[str] = set()  # used by a view op that gives shape (1, ...)
        self.attribute_views: set[str] = set()  # read as p.T, p.mT, ...: torch.func only

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if _is_attribute_read(func):
            name = self.name(args[0]) if args and _is_view_read(func) else None
            if name is not None:
                self.other_uses[name] += 1
                self.attribute_views.add(name)
            return func(*args, **kwargs)
        rule = RULES.get(func)
        roles: dict[str, Any] = {}
        if rule is not None:
            call = rule.bind(args, kwargs)
            roles = {role: call.get(role) for role in ROLES}
            for value in roles.values():
                name = self.name(value)
                if name is not None:
                    self.rule_uses[name] += 1
                    if not rule.supports(call, self.batch):
                        self.unsupported.add(name)
        out = func(*args, **kwargs)
        in_roles = {id(v) for v in roles.values() if v is not None}
        for leaf in tree_leaves((args, kwargs)):
            name = self.name(leaf)
            if name is not None and id(leaf) not in in_roles:
                self.other_uses[name] += 1
                rank = elementwise_rank(func, args, leaf, self.batch)
                if rank is not None:
                    self.ranks[name] = rank
                if is_batch_broadcast_view(func, args, leaf, out):
                    self.viewed.add(name)
        return out

    def plan(self) -> Plan:
        plan = Plan()
        for name, param in self.params.items():
            rule_uses, other_uses = self.rule_uses[name], self.other_uses[name]
            if name in self.attribute_views:
                plan.fallback.append(name)
            elif rule_uses == 1 and other_uses == 0 and name not in self.unsupported:
                plan.rule.append(name)
            elif rule_uses == 0 and other_uses > 0 and broadcastable(param):
                plan.broadcast[name] = param.dim()
            elif rule_uses == 0 and other_uses == 1 and name in self.ranks:
                plan.broadcast[name] = self.ranks[name]
            elif rule_uses == 0 and other_uses == 1 and name in self.viewed:
                plan.viewed.append(name)
            elif rule_uses + other_uses == 0:
                plan.unused.append(name)
            else:
                plan.fallback.append(name)
        return plan


class Tap(_ParamModes):
    """The Fisher forward pass: detached parameters, hooks on rule outputs and broadcast parameters.

    ``params`` are all the model's parameters (each is detached where it is used); ``fisher`` holds
    the accumulators of the names planned as ``rule``, ``broadcast`` or ``viewed``; ``model`` is given
    for a sharded model (see the module docstring).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        fisher: Sums,
        plan: Plan,
        trigger: Tensor,
        batch: int,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__(params, batch, model)
        self.fisher = fisher
        self.broadcast = plan.broadcast
        self.viewed = set(plan.viewed)
        self.trigger = trigger
        self.expanded: dict[str, Tensor] = {}

    def _per_example(self, name: str, expanded: Tensor) -> Tensor:
        """``expanded`` (a parameter broadcast to ``(B, ...)``) as a fresh tensor whose gradient,
        one slice per example, is squared into ``fisher[name]``."""
        expanded = expanded + self.trigger
        fisher = self.fisher
        expanded.register_hook(lambda g: fisher.add({"": name}, lambda slots: add_square_sum(slots[""], g)))
        return expanded

    def _substitute(self, value: Any) -> Any:
        name = self.name(value)
        if name is None:
            return value
        if name not in self.broadcast:
            return value.detach()
        if name not in self.expanded:  # one expansion per forward: all uses add up before squaring
            self.expanded[name] = self._per_example(
                name, expand_to_batch(value.detach(), self.broadcast[name], self.batch)
            )
        return self.expanded[name]

    def _substitute_all(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``_substitute`` on every leaf of an op's arguments (a flat comprehension for flat ones:
        this runs for every op of the forward pass, and a pytree map costs more than small ops)."""
        if any(isinstance(v, _CONTAINERS) for v in args) or any(isinstance(v, _CONTAINERS) for v in kwargs.values()):
            substituted: tuple[tuple, dict] = tree_map(self._substitute, (args, kwargs))
            return substituted
        return tuple(self._substitute(v) for v in args), {k: self._substitute(v) for k, v in kwargs.items()}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if _is_attribute_read(func):
            out = func(*args, **kwargs)
            if isinstance(out, Tensor) and out.requires_grad and args and self.name(args[0]) is not None:
                out = out.detach()  # p.T: a parameter must not reach the graph past the trigger
            return out
        if func in VIEWS and args and (viewed := self.name(args[0])) in self.viewed:
            view = func(args[0].detach(), *args[1:], **kwargs)
            return self._per_example(viewed, view.expand(self.batch, *view.shape[1:]))
        rule = RULES.get(func)
        names = None
        if rule is not None:
            call = rule.bind(args, kwargs)
            names = {role: name if (name := self.name(call.get(role))) in self.fisher else None for role in ROLES}
        args, kwargs = self._substitute_all(args, kwargs)
        out = func(*args, **kwargs)
        if rule is not None and names is not None and any(n is not None for n in names.values()):
            out = self._hook(out, rule, names, call)
        return out

    def _hook(self, out: Tensor, rule: Rule, names: dict[str, str | None], call: dict[str, Any]) -> Tensor:
        if not out.requires_grad or out._is_view():
            # a fresh tensor hanging from the trigger; an in-place op on a view would drop the hook
            out = out + self.trigger
        x = call["input"]
        version = x._version

        def accumulate(g: Tensor) -> None:
            if x._version != version:
                raise RuntimeError(
                    "bayeskern: the input of a layer was modified in place after the layer used it; "
                    "its per-example gradients cannot be formed (use out-of-place operations)"
                )
            self.fisher.add(names, lambda slots: rule.accumulate(slots, g, call))

        out.register_hook(accumulate)
        return out
