"""Kronecker-factored curvature (K-FAC) of ``nn.Linear`` and ``nn.Conv2d`` layers, in one pass.

For a layer ``y = W a (+ b)`` the Fisher block of ``W`` (rows: outputs, columns: inputs, flattened
row-major) is approximated by ``G kron A`` with, over the N examples of the data,

    A = (1/N) sum_n (1/T) sum_t a_{n,t} a_{n,t}^T      G = sum_n sum_t g_{n,t} g_{n,t}^T,

``g_{n,t}`` the gradient of example n's loss with respect to the layer's output at position t and
``T`` the positions that share the weight (tokens of a sequence, output pixels of a convolution; 1
for a plain batch): A is a mean over examples and positions, G a sum (K-FAC "expand", the convention
of laplace-torch's ``KronLaplace`` with curvlinops, separate weight and bias).  The bias ``b`` is a
block of its own, the dense ``G`` (its input is the constant 1).  A convolution's inputs are its
patches (``F.unfold``: ``in_channels * kh * kw`` columns in the order of ``weight.flatten(1)``).
Padded positions are not masked: every position the layer computes counts.  peft's LoRA ``A`` and
``B`` matrices are ``nn.Linear`` layers, so each adapter gets its own two blocks.

Only these layers have a Kronecker form: ``kronecker_layers`` says which selected parameters do
(``curvature.rows.has_outer_form``: no grouped convolution, nor one with string padding or a padding
mode other than zeros); the others get the diagonal of their Fisher from ``squared_gradients``.
The loss is a sum of per-example terms (``reduction="sum"``) and the model runs in eval mode, so the
output gradient of the batch loss at example n is example n's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ..batches import OutputFn, as_call, batch_length, logits_of, split_batch
from .rows import grads_by_position, has_outer_form, inputs_by_position


@dataclass
class KroneckerFactors:
    """What a pass over the data produced, per parameter name: ``G`` and ``N A`` (``a_sums``: sums over
    examples, so passes over several shards of the data add up; a bias's is ``[[N]]``), plus the summed
    loss of the true targets and the example count N."""

    g: dict[str, Tensor]
    a_sums: dict[str, Tensor]
    loss: float
    num_examples: int

    def a(self, name: str) -> Tensor:
        """``A`` of parameter ``name``: its input second moment, a mean over the examples."""
        return self.a_sums[name] / self.num_examples


def kronecker_layers(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[str, nn.Module]]:
    """The parameters among ``names`` with a Kronecker form: name -> (``"weight"`` or ``"bias"``, layer)."""
    owners: dict[str, tuple[str, nn.Module]] = {}
    for prefix, module in model.named_modules():
        if not has_outer_form(module):
            continue
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None:
                owners[f"{prefix}.{attr}" if prefix else attr] = (attr, module)
    wanted = set(names)
    return {name: owner for name, owner in owners.items() if name in wanted}


@torch.no_grad()
def _accumulate(sums: dict[int, Tensor], key: int, value: Tensor) -> None:
    if key in sums:
        sums[key] += value
    else:
        sums[key] = value.clone()


def kronecker_factors(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    names: Sequence[str],
    *,
    sample_targets: Callable[[Tensor], Tensor] | None = None,
    output_fn: OutputFn | None = None,
    progress: bool = False,
) -> KroneckerFactors:
    """``G`` and ``A`` (module docstring) of every parameter in ``names`` that has a Kronecker form.

    ``batches``, ``loss_fn`` (summed over the batch), ``sample_targets`` (the MC Fisher's targets) and
    ``output_fn`` as for ``squared_gradients``.  Raises ValueError for a name without a Kronecker form,
    an empty ``batches`` or a batch without targets.
    """
    layers = kronecker_layers(model, names)
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"names: {missing} have no Kronecker form (only nn.Linear / ungrouped nn.Conv2d)")
    modules = {id(module): module for _, module in layers.values()}
    inputs: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}

    def capture(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Keep the layer's input and output, and give the network a copy of both: an in-place
        operation after the layer (``ReLU(inplace=True)``) then changes the copy, not what the
        gradient is taken at."""
        if id(module) in outputs:
            raise ValueError(
                f"kronecker_factors: a {type(module).__name__} runs twice in one forward (a shared layer); "
                "leave its parameters out of the Kronecker blocks"
            )
        inputs[id(module)] = args[0].detach().clone()
        outputs[id(module)] = output
        return output.clone()

    a_sums_by_layer: dict[int, Tensor] = {}
    g_sums: dict[int, Tensor] = {}
    loss_total, count = 0.0, 0
    training = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    handles = [module.register_forward_hook(capture) for module in modules.values()]
    model.eval()
    try:
        for batch in tqdm(batches, disable=not progress, desc="kron"):
            x, y = split_batch(batch)
            args, kwargs = tree_map(lambda t: t.detach().to(device) if isinstance(t, Tensor) else t, as_call(x))
            y = cast(Tensor, y).to(device)
            inputs.clear()
            outputs.clear()
            with torch.enable_grad():
                out = model(*args, **kwargs)
                logits = logits_of(out, kwargs if kwargs else args, output_fn)
                target = y if sample_targets is None else sample_targets(logits.detach())
                loss = loss_fn(logits, target)
                wanted = [outputs[key] for key in modules if key in outputs and outputs[key].requires_grad]
                output_grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else []
            by_output = dict(zip([id(t) for t in wanted], output_grads))
            true_loss = loss if sample_targets is None else loss_fn(logits.detach(), y)
            loss_total += float(true_loss.detach())
            count += batch_length((args, kwargs))
            for key, module in modules.items():
                if key not in outputs:
                    raise ValueError(f"kronecker_factors: a layer of {sorted(layers)} did not run in the forward")
                grad = by_output.get(id(outputs[key]))
                if grad is None:  # the loss does not depend on this layer's output
                    grad = torch.zeros_like(outputs[key])
                acts = inputs_by_position(module, inputs[key]).float()
                grads = grads_by_position(module, grad).float()
                positions = acts.shape[1]
                acts, grads = acts.reshape(-1, acts.shape[-1]), grads.reshape(-1, grads.shape[-1])
                _accumulate(a_sums_by_layer, key, acts.T @ acts / positions)
                _accumulate(g_sums, key, grads.T @ grads)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    if count == 0:
        raise ValueError("kronecker_factors: no batches to accumulate (the loader is empty)")
    g, a_sums = {}, {}
    for name, (attr, module) in layers.items():
        g[name] = g_sums[id(module)]
        if attr == "bias":  # the input of a bias is the constant 1
            a_sums[name] = torch.full((1, 1), float(count), dtype=g[name].dtype, device=g[name].device)
        else:
            a_sums[name] = a_sums_by_layer[id(module)]
    return KroneckerFactors(g, a_sums, loss_total, count)
