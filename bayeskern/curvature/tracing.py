"""Seeing how a network uses its parameters, without editing it: two ``TorchFunctionMode``s.

``Probe`` watches one forward pass and assigns every chosen parameter a treatment (``Plan``):

* ``rule``      -- the ``weight``/``bias`` of exactly one call of an op in ``rules.RULES`` (batch-first
  input, supported configuration) and used nowhere else;
* ``broadcast`` -- never such an argument, shape ``(1, ...)``, and the network still runs with it
  expanded to ``(B, ...)`` (class token, position embedding);
* ``unused``    -- seen in no op (the driver checks with one plain backward that the loss does not
  depend on it either; then its Fisher stays zero);
* ``fallback``  -- anything else (shared weights, custom maths): per-example gradients by torch.func.

``Tap`` runs the forward pass of the Fisher computation.  Every model parameter reaching an op is
detached, so the backward pass computes no weight gradient at all; a zero scalar ``trigger``
(requiring grad) is added to the outputs of rule ops whose inputs carry no gradient, so the whole
graph hangs from it.  Hooks on the outputs of rule ops (and on the expanded broadcast parameters)
receive ``dL/dy`` and accumulate the squared per-example gradients, replacing the weight-gradient
GEMM of a plain backward by the squared one.  ``torch.autograd.grad(loss, trigger)`` runs it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from .rules import RULES, ROLES, Rule, add_square_sum, broadcastable


def _is_attribute_read(func: Callable) -> bool:
    return getattr(func, "__name__", "") == "__get__"  # p.shape, p.dtype, ...: not a use


@dataclass
class Plan:
    """The treatment of every chosen parameter (see the module docstring)."""

    rule: list[str] = field(default_factory=list)
    broadcast: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)


class _ParamModes(TorchFunctionMode):
    def __init__(self, params: dict[str, Tensor], batch: int) -> None:
        super().__init__()
        self.names = {id(p): name for name, p in params.items()}
        self.batch = batch

    def name(self, value: Any) -> str | None:
        return self.names.get(id(value)) if isinstance(value, Tensor) else None


class Probe(_ParamModes):
    """Counts, for each chosen parameter, its uses as a rule op's weight/bias and its other uses."""

    def __init__(self, params: dict[str, Tensor], batch: int) -> None:
        super().__init__(params, batch)
        self.params = params
        self.rule_uses: Counter[str] = Counter()
        self.other_uses: Counter[str] = Counter()
        self.unsupported: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_attribute_read(func):
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
        in_roles = {id(v) for v in roles.values() if v is not None}
        for leaf in tree_leaves((args, kwargs)):
            name = self.name(leaf)
            if name is not None and id(leaf) not in in_roles:
                self.other_uses[name] += 1
        return func(*args, **kwargs)

    def plan(self) -> Plan:
        plan = Plan()
        for name, param in self.params.items():
            rule_uses, other_uses = self.rule_uses[name], self.other_uses[name]
            if rule_uses == 1 and other_uses == 0 and name not in self.unsupported:
                plan.rule.append(name)
            elif rule_uses == 0 and other_uses > 0 and broadcastable(param):
                plan.broadcast.append(name)
            elif rule_uses + other_uses == 0:
                plan.unused.append(name)
            else:
                plan.fallback.append(name)
        return plan


class Tap(_ParamModes):
    """The Fisher forward pass: detached parameters, hooks on rule outputs and broadcast parameters.

    ``params`` are all the model's parameters (each is detached where it is used); ``fisher`` maps
    the names planned as ``rule`` or ``broadcast`` to their accumulators.
    """

    def __init__(
        self, params: dict[str, Tensor], fisher: dict[str, Tensor], broadcast: list[str], trigger: Tensor, batch: int
    ) -> None:
        super().__init__(params, batch)
        self.fisher = fisher
        self.broadcast = set(broadcast)
        self.trigger = trigger
        self.expanded: dict[str, Tensor] = {}

    def _substitute(self, value: Any) -> Any:
        name = self.name(value)
        if name is None:
            return value
        if name not in self.broadcast:
            return value.detach()
        if name not in self.expanded:
            expanded = value.detach().expand(self.batch, *value.shape[1:]) + self.trigger
            fisher = self.fisher[name]
            expanded.register_hook(lambda g: add_square_sum(fisher, g))
            self.expanded[name] = expanded
        return self.expanded[name]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_attribute_read(func):
            return func(*args, **kwargs)
        rule = RULES.get(func)
        slots = None
        if rule is not None:
            call = rule.bind(args, kwargs)
            slots = {role: self.fisher.get(self.name(call.get(role)) or "") for role in ROLES}
        args, kwargs = tree_map(self._substitute, (args, kwargs))
        out = func(*args, **kwargs)
        if slots is not None and any(s is not None for s in slots.values()):
            out = self._hook(out, rule, slots, call)
        return out

    def _hook(self, out: Tensor, rule: Rule, slots: dict[str, Tensor | None], call: dict[str, Any]) -> Tensor:
        if not out.requires_grad:
            out = out + self.trigger
        x = call["input"]
        version = x._version

        def accumulate(g: Tensor) -> None:
            if x._version != version:
                raise RuntimeError(
                    "bayeskern: the input of a layer was modified in place after the layer used it; "
                    "its per-example gradients cannot be formed (use out-of-place operations)"
                )
            rule.accumulate(slots, g, call)

        out.register_hook(accumulate)
        return out
