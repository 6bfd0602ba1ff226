"""Which parameters of a module are Bayesian.

``select_parameters(model, params)`` turns a selection into parameter names, in
``model.named_parameters()`` order:

* ``None`` -- every parameter;
* a string or a sequence of strings -- names or ``fnmatch`` globs (``"head.*"``); each must match
  at least one parameter;
* a callable ``(name, param) -> bool``;
* ``"last_layer"`` -- the parameters owned directly by the last module, in ``named_modules()``
  (registration) order, that owns any eligible parameter (a fresh classifier head in timm models);
* ``"lora"`` -- the adapter weights of a ``peft`` LoRA model: every parameter named ``lora_A`` /
  ``lora_B`` (``...q_proj.lora_A.default.weight``) or ``lora_embedding_A`` / ``lora_embedding_B``.
  The base weights stay as they are (frozen by peft: never copied, never trained); a model without
  adapters raises ValueError.

Biases and normalisation parameters are then kept or dropped by ``include_bias`` and
``include_norm``, decided by the owning module, not by name: a bias is the tensor a module holds as
its ``bias`` attribute (the ``torch.nn`` convention of Linear, Conv, Embedding bags, ...), a norm
parameter is any parameter of an instance of ``NORM_TYPES`` (BatchNorm, LayerNorm, GroupNorm,
InstanceNorm, RMSNorm and their subclasses, e.g. timm's ``LayerNorm2d`` and ``BatchNormAct2d``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

ParamSelection = None | str | Sequence[str] | Callable[[str, nn.Parameter], bool]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name -> (module that owns it directly, attribute name), deduplicated like
    ``named_parameters`` (a tied parameter belongs to its first owner)."""
    owners: dict[str, tuple[nn.Module, str]] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                owners[f"{prefix}.{attr}" if prefix else attr] = (module, attr)
    return owners


LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def is_lora_adapter(name: str) -> bool:
    """True for the name of a peft LoRA adapter weight (a path component in ``LORA_PARTS``)."""
    return any(part in LORA_PARTS for part in name.split("."))


def _eligible(module: nn.Module, attr: str, include_bias: bool, include_norm: bool) -> bool:
    if isinstance(module, NORM_TYPES):
        return include_norm
    if attr == "bias" and getattr(module, "bias", None) is not None:
        return include_bias
    return True


def _match_patterns(names: list[str], patterns: Sequence[str]) -> set[str]:
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"params must hold parameter names or globs, got {pattern!r}")
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"params: {pattern!r} matches no parameter of the model")
        chosen.update(hits)
    return chosen


def select_parameters(
    model: nn.Module,
    params: ParamSelection = None,
    *,
    include_bias: bool = True,
    include_norm: bool = True,
) -> list[str]:
    """Names of the selected parameters of ``model``, in ``named_parameters()`` order.

    Raises ValueError when the selection is malformed or selects nothing.
    """
    owners = _owners(model)
    eligible = [n for n, (m, a) in owners.items() if _eligible(m, a, include_bias, include_norm)]
    params_by_name = dict(model.named_parameters())
    if params is None:
        chosen = set(eligible)
    elif isinstance(params, str) and params == "lora":
        chosen = {n for n in eligible if is_lora_adapter(n)}
        if not chosen:
            raise ValueError(
                "params='lora' selects the LoRA adapter weights (lora_A / lora_B), but the model has "
                "none: wrap it with peft.get_peft_model(model, LoraConfig(...)) first"
            )
    elif isinstance(params, str) and params == "last_layer":
        last = None
        for name in eligible:  # named_modules order: the last owner wins
            last = owners[name][0]
        chosen = {n for n in eligible if owners[n][0] is last}
    elif isinstance(params, str):
        chosen = _match_patterns(list(owners), [params]) & set(eligible)
    elif callable(params):
        chosen = {n for n in eligible if params(n, params_by_name[n])}
    elif isinstance(params, Sequence):
        chosen = _match_patterns(list(owners), params) & set(eligible)
    else:
        raise ValueError(f"params must be None, 'last_layer', 'lora', names/globs or a predicate, got {params!r}")
    names = [n for n in eligible if n in chosen]
    if not names:
        raise ValueError(f"params={params!r} selects no parameter of the model")
    return names
