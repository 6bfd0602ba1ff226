"""Backbones by name and their pretrained weights.

``--model`` takes ``timm:<name>`` (timm's own factory), ``torchvision:<name>``
(``torchvision.models.get_model``), a built-in small network (``convnet``) or ``hf:<hub id or
directory>`` (a ``transformers`` text classifier, ``app.text``).  ``--pretrained``
takes ``timm`` or ``torchvision`` (the library's published weights; needs network access) or a PATH
to a state dict (``.pt``/``.pth``, optionally nested under ``state_dict``/``model``) or a
``.safetensors`` file.  Pretrained weights become the initial point and the prior mean; the
classifier head, re-initialised for the task's classes, is reported in ``new_params`` (prior mean
zero).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .regression import MLP
from .shared import Backbone, classifier_prefix, under
from .text import hf_backbone


class ConvNet(nn.Module):
    """A small CNN for the offline default (digits at 16x16): three conv-BN-ReLU blocks and a head."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(in_chans, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 2 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


BUILTIN_MODELS: dict[str, Callable[[int], nn.Module]] = {"convnet": ConvNet, "mlp": MLP}


def _timm(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise UsageError(f"unknown timm model {name!r}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except (OSError, RuntimeError) as error:
        raise UsageError(f"could not load timm weights for {name!r} ({error}); pass --pretrained PATH") from None


def _replace_head(model: nn.Module, num_classes: int) -> None:
    prefix = classifier_prefix(model)
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _torchvision(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    from torchvision import models

    if name not in models.list_models():
        raise UsageError(f"unknown torchvision model {name!r}")
    if not pretrained:
        return models.get_model(name, weights=None, num_classes=num_classes)
    try:
        model = models.get_model(name, weights="DEFAULT")
    except (OSError, RuntimeError) as error:
        raise UsageError(f"could not load torchvision weights for {name!r} ({error}); pass --pretrained PATH") from None
    _replace_head(model, num_classes)
    return model


def _builtin(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    if name not in BUILTIN_MODELS:
        raise UsageError(
            f"unknown model {name!r} (built-in: {', '.join(BUILTIN_MODELS)}; or timm:NAME, torchvision:NAME)"
        )
    if pretrained:
        raise UsageError(f"built-in model {name!r} has no published weights; pass --pretrained PATH")
    return BUILTIN_MODELS[name](num_classes)


FACTORIES: dict[str, Callable[[str, int, bool], nn.Module]] = {"timm": _timm, "torchvision": _torchvision}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch checkpoint (nested or DDP-prefixed)."""
    if not path.is_file():
        raise UsageError(f"pretrained weights {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], classifier: list[str]) -> list[str]:
    """Copy ``state`` into ``model``; classifier tensors whose shape differs (another number of
    classes) are skipped and returned as new.  Anything else that does not fit raises UsageError."""
    own = model.state_dict()
    new, mismatched = [], []
    for key, target in own.items():
        if key not in state:
            (new if key in classifier else mismatched).append(key)
        elif state[key].shape != target.shape:
            if key in classifier:
                new.append(key)
            else:
                mismatched.append(
                    f"{key}: {tuple(state[key].shape)} in the checkpoint, {tuple(target.shape)} in the model"
                )
    unexpected = sorted(set(state) - set(own))
    if mismatched or unexpected:
        details = "; ".join([*mismatched[:3], *(f"unexpected {k}" for k in unexpected[:3])])
        raise UsageError(f"checkpoint does not fit the model ({len(mismatched) + len(unexpected)} problems: {details})")
    model.load_state_dict({k: v for k, v in state.items() if k not in new}, strict=False)
    return new


def create_backbone(spec: str, num_classes: int, pretrained: str | None = None, text=None) -> Backbone:
    """Build ``spec`` for ``num_classes`` and load ``pretrained`` weights (see module docstring);
    ``hf:NAME`` is a text classifier (``app.text.hf_backbone``, ``text`` its TextOptions)."""
    family, _, name = spec.partition(":") if ":" in spec else ("", "", spec)
    if family == "hf":
        return hf_backbone(name, num_classes, text)
    published = pretrained in ("timm", "torchvision")
    if published and pretrained != family:
        raise UsageError(f"--pretrained {pretrained} needs a {pretrained}:NAME model, got {spec!r}")
    if family and family not in FACTORIES:
        raise UsageError(f"unknown model family {family!r} in {spec!r} (known: {', '.join(FACTORIES)})")
    factory = FACTORIES[family] if family else _builtin
    model = factory(name, num_classes, published)
    prefix = classifier_prefix(model)
    classifier = [n for n, _ in model.named_parameters() if under(prefix, n)]
    backbone = Backbone(model, classifier, new_params=list(classifier) if published else [])
    if pretrained and not published:
        state_classifier = [k for k in model.state_dict() if under(prefix, k)]
        backbone.new_params = load_pretrained(model, read_state_dict(Path(pretrained)), state_classifier)
    return backbone
