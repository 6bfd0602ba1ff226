"""Checks shared by the VI and MC-dropout tests: the wrapped network is never modified."""

from __future__ import annotations

import timm
import torch
from torch import nn


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], param_ids: dict[str, int]) -> None:
    """Same parameter objects, same values, same buffers."""
    assert {n: id(p) for n, p in model.named_parameters()} == param_ids
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(tensor, before[name]), name


def timm_models() -> list[tuple[str, nn.Module]]:
    """A CNN with BatchNorm and a small ViT (LayerNorm, attention), both untrained, for 32x32 inputs."""
    torch.manual_seed(0)
    return [
        ("resnet18", timm.create_model("resnet18", pretrained=False, num_classes=10)),
        (
            "vit",
            timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                num_classes=10,
                img_size=32,
                patch_size=8,
                depth=2,
            ),
        ),
    ]


def train_wrapped_timm_model(make_posterior, steps: int = 2) -> None:
    """A few optimizer steps of ``make_posterior(model)`` on each timm model: the loss is finite, the
    wrapper's parameters move, the model's code, parameter objects, values and buffers do not."""
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for label, model in timm_models():
        before, ids = snapshot(model), {n: id(p) for n, p in model.named_parameters()}
        post = make_posterior(model)
        post.train()
        start = [p.detach().clone() for p in post.parameters()]
        opt = torch.optim.SGD(post.parameters(), lr=0.01)
        for _ in range(steps):
            loss = post.loss(x, y)
            assert torch.isfinite(loss), label
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(start, post.parameters())), label
        assert_unchanged(model, before, ids)
