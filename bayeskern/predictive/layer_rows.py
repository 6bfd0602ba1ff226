"""Per-example Jacobian rows layer by layer, for the linearised predictive's probit (``glm.py``).

The rows ``J_c = d f_c(x_n) / d theta`` at theta* come from the layers that own the Bayesian
parameters, with no Jacobian of the whole network:

1. one forward pass at theta* records, for every module that owns a Bayesian parameter, its inputs
   and its output;
2. one backward pass per network output c (input gradients only) gives each recorded output's
   gradient ``g_c`` (the model runs in eval mode, so example n's outputs depend on example n alone);
3. per module: the weight of a layer with an outer form (``curvature.rows.has_outer_form``) gets
   ``OuterRows(g_c by position, its inputs by position)`` and its bias ``sum_t g_c,t``; any other
   module's parameters (norms, embeddings, grouped convolutions) get dense rows from the module
   alone, ``vmap`` over its examples of its ``vjp`` with the C gradients.

A parameter also used outside its owner's forward (a tied weight, a parent reading a child's
weight) would lose that use, so the rows are checked against the network: for a random direction v
(fixed seed), ``sum_p row_p v_p`` must equal the forward-mode product ``J v`` of every example and
output (``torch.func.jvp``) to ``CHECK_RTOL`` in norm.  Whatever stops the rows (a module that runs
twice or does not run, an output without the examples on its first axis, a failed check) raises
``RowsUnavailable`` with the reason; ``glm.py`` then forms the Jacobians with ``jacrev``.

Cost: one forward, C backward passes without weight gradients, one ``jvp`` and the rows' own
products (``OuterRows`` forms a row only for layers with several positions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..curvature.rows import OuterRows, grads_by_position, has_outer_form, inputs_by_position

CHECK_RTOL = 1e-3
Rows = dict[str, Tensor | OuterRows]  # a JacobianRows being built


class RowsUnavailable(Exception):
    """The layers do not give the rows (the message says why)."""


class RowsTooLarge(Exception):
    """One batch's rows would take more than the budget; ``per_example`` bytes each."""

    def __init__(self, per_example: int) -> None:
        super().__init__(f"{per_example} bytes per example")
        self.per_example = per_example


@dataclass
class _Call:
    args: tuple
    kwargs: dict[str, Any]
    output: Any


def _examples(value: Any, count: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == count


class LayerRows:
    """The rows of ``model``'s Bayesian tensors ``mean`` (theta*), the others from ``base``."""

    def __init__(self, model: nn.Module, base: dict[str, Tensor], mean: dict[str, Tensor]) -> None:
        self.model, self.base, self.mean = model, base, mean
        self.owners: dict[nn.Module, tuple[str, dict[str, str]]] = {}  # module -> (prefix, attr -> name)
        for name in mean:
            prefix, _, attr = name.rpartition(".")
            module = model.get_submodule(prefix)
            if attr not in module._parameters:
                raise RowsUnavailable(f"{name} is not a parameter of a module")
            self.owners.setdefault(module, (prefix, {}))[1][attr] = name
        generator = torch.Generator().manual_seed(0)
        self.direction = {n: torch.randn(t.shape, generator=generator).to(t) for n, t in mean.items()}

    def __call__(
        self, function: Callable[[dict[str, Tensor]], Tensor], x: Any, count: int, budget: int
    ) -> tuple[Tensor, Rows]:
        """The outputs at theta* (``function(theta)``: ``(count, C)``) and the rows of ``x``'s examples
        by name (``(count, C, ...)``).  Raises ``RowsTooLarge`` when they take more than ``budget`` bytes."""
        calls: dict[nn.Module, list[_Call]] = {module: [] for module in self.owners}

        def record(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            """Keep the call's inputs and output as they are now, and give the network a copy of the
            output: an in-place operation after the module (``ReLU(inplace=True)``, ``out += identity``)
            then changes the copy, not what the gradients are taken at."""
            args, kwargs = tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, (args, kwargs))
            calls[module].append(_Call(args, kwargs, output))
            return output.clone() if isinstance(output, Tensor) else output

        theta = {n: t.detach().requires_grad_() for n, t in self.mean.items()}
        handles = [m.register_forward_hook(record, with_kwargs=True) for m in self.owners]
        try:
            with torch.enable_grad():
                f_star = function(theta)
        finally:
            for handle in handles:
                handle.remove()
        outputs = f_star.shape[1]
        for module, seen in calls.items():
            name = next(iter(self.owners[module][1].values()))
            if len(seen) != 1:
                raise RowsUnavailable(f"the module owning {name} ran {len(seen)} times in one forward")
            if not _examples(seen[0].output, count):
                raise RowsUnavailable(f"the output of the module owning {name} is not a tensor of the examples")
        per_example = self._bytes(calls, outputs, count)
        if per_example * count > budget and count > 1:
            raise RowsTooLarge(per_example)
        with torch.enable_grad():
            grads = self._output_grads(f_star, calls)
        rows: Rows = {}
        for module, (prefix, attrs) in self.owners.items():
            call = calls[module][0]
            if has_outer_form(module) and not set(attrs) - {"weight", "bias"}:
                rows.update(self._outer_rows(module, attrs, call, grads[module]))
            else:
                rows.update(self._module_rows(module, prefix, attrs, call, grads[module], count))
        self._check(function, rows)
        return f_star.detach(), rows

    def _bytes(self, calls: dict[nn.Module, list[_Call]], outputs: int, count: int) -> int:
        """Bytes per example of the output gradients, the outer-form inputs and the dense rows."""
        total = 0
        for module, (_, attrs) in self.owners.items():
            call = calls[module][0]
            total += outputs * call.output[0].numel() * call.output.element_size()
            if has_outer_form(module) and not set(attrs) - {"weight", "bias"}:
                if isinstance(module, nn.Conv2d) and "weight" in attrs:  # the patches: a weight column per position
                    weight = self.mean[attrs["weight"]]
                    total += call.output[0, 0].numel() * weight[0].numel() * weight.element_size()
            else:
                total += outputs * sum(self.mean[n].numel() * self.mean[n].element_size() for n in attrs.values())
        return total

    def _output_grads(self, f_star: Tensor, calls: dict[nn.Module, list[_Call]]) -> dict[nn.Module, Tensor]:
        """Per module, ``d f_c / d output`` stacked as ``(count, C, *output shape)``."""
        modules = [m for m in calls if calls[m][0].output.requires_grad]
        outputs = [calls[m][0].output for m in modules]
        per_class: list[tuple[Tensor | None, ...]] = []
        for c in range(f_star.shape[1]):
            per_class.append(
                torch.autograd.grad(
                    f_star[:, c].sum(), outputs, retain_graph=c + 1 < f_star.shape[1], allow_unused=True
                )
            )
        grads = {}
        for module in calls:
            output = calls[module][0].output.detach()
            index = modules.index(module) if module in modules else None
            columns = []
            for grad in per_class:
                column = None if index is None else grad[index]
                columns.append(torch.zeros_like(output) if column is None else column)
            grads[module] = torch.stack(columns, dim=1)
        return grads

    def _outer_rows(self, module: nn.Module, attrs: dict[str, str], call: _Call, grad: Tensor) -> Rows:
        count, outputs = grad.shape[:2]
        by_position = grads_by_position(module, grad.flatten(0, 1)).unflatten(0, (count, outputs))
        rows: Rows = {}
        if "weight" in attrs:
            inputs = inputs_by_position(module, call.args[0].detach()).to(by_position.dtype)
            rows[attrs["weight"]] = OuterRows(by_position, inputs[:, None])
        if "bias" in attrs:
            rows[attrs["bias"]] = by_position.sum(-2)
        return rows

    def _module_rows(
        self, module: nn.Module, prefix: str, attrs: dict[str, str], call: _Call, grad: Tensor, count: int
    ) -> Rows:
        """Dense rows ``(count, C, *shape)`` of the module's parameters, from the module alone."""
        start = f"{prefix}." if prefix else ""
        local = {k[len(start) :]: v for k, v in self.base.items() if k.startswith(start)}
        params = {attr: self.mean[name].detach() for attr, name in attrs.items()}
        args, kwargs = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (call.args, call.kwargs))
        in_dims = tree_map(lambda t: 0 if _examples(t, count) else None, (args, kwargs))
        batched = [_examples(leaf, count) for leaf in tree_flatten((args, kwargs))[0]]

        def one(p: dict[str, Tensor], a: tuple, k: dict[str, Any], cotangents: Tensor) -> dict[str, Tensor]:
            leaves, spec = tree_flatten((a, k))
            a, k = tree_unflatten([t.unsqueeze(0) if b else t for t, b in zip(leaves, batched, strict=True)], spec)

            def output(q: dict[str, Tensor]) -> Tensor:
                out: Tensor = functional_call(module, {**local, **q}, a, k)[0]
                return out

            pull = vjp(output, p)[1]
            rows: dict[str, Tensor] = vmap(pull)(cotangents)[0]
            return rows

        try:
            per_example = vmap(one, in_dims=(None, in_dims[0], in_dims[1], 0))(params, args, kwargs, grad)
        except RuntimeError as error:
            raise RowsUnavailable(
                f"vmap over the module owning {next(iter(attrs.values()))} failed ({error})"
            ) from error
        return {attrs[attr]: rows for attr, rows in per_example.items()}

    def _check(self, function: Callable[[dict[str, Tensor]], Tensor], rows: Rows) -> None:
        """``sum_p row_p v_p == J v`` (module docstring) or ``RowsUnavailable``."""
        try:
            expected: Tensor = jvp(function, (self.mean,), (self.direction,))[1]
        except RuntimeError as error:
            raise RowsUnavailable(f"the check's forward-mode product failed ({error})") from error
        total = torch.zeros_like(expected)
        for name, row in rows.items():
            v = self.direction[name]
            if isinstance(row, OuterRows):
                total += row.dot(v.reshape(v.shape[0], -1))
            else:
                total += (row * v).flatten(2).sum(-1)
        if (total - expected).norm() > CHECK_RTOL * expected.norm() + 1e-12:
            raise RowsUnavailable(
                "the layers' rows miss a use of a Bayesian parameter (a tied or shared weight, or one read "
                "outside its module's forward)"
            )
