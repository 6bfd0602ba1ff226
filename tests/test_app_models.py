"""Backbones of the fine-tuning application: factories, pretrained weights, the new head."""

import pytest
import torch
from safetensors.torch import save_file

from bayeskern.app.errors import UsageError
from bayeskern.app.models import create_backbone


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory):
    source = create_backbone("timm:resnet18", 1000).model
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    return path, source


def test_pretrained_state_dict_loads_and_new_head_is_reported(resnet18_checkpoint):
    path, source = resnet18_checkpoint
    backbone = create_backbone("timm:resnet18", 7, pretrained=str(path))
    assert backbone.new_params == ["fc.weight", "fc.bias"]
    assert backbone.model.fc.out_features == 7
    theirs = source.state_dict()
    for name, tensor in backbone.model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, theirs[name]), name


def test_safetensors_weights_load(tmp_path):
    source = create_backbone("convnet", 10).model
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    backbone = create_backbone("convnet", 10, pretrained=str(tmp_path / "w.safetensors"))
    assert backbone.new_params == []
    assert torch.equal(backbone.model.head.weight, source.head.weight)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(create_backbone("timm:resnet34", 10).model.state_dict(), tmp_path / "r34.pt")
    with pytest.raises(UsageError, match="checkpoint does not fit the model"):
        create_backbone("timm:resnet18", 10, pretrained=str(tmp_path / "r34.pt"))


def test_torchvision_and_builtin_heads_are_found():
    assert create_backbone("torchvision:resnet18", 5).classifier == ["fc.weight", "fc.bias"]
    assert create_backbone("convnet", 5).classifier == ["head.weight", "head.bias"]


@pytest.mark.parametrize(
    "spec, pretrained, match",
    [
        ("timm:no_such_net", None, "unknown timm model"),
        ("torchvision:no_such_net", None, "unknown torchvision model"),
        ("keras:resnet", None, "unknown model family"),
        ("mlp9000", None, "unknown model"),
        ("torchvision:resnet18", "timm", "needs a timm:NAME model"),
        ("convnet", "/no/such/file.pt", "not found"),
    ],
)
def test_bad_model_input_raises_usage_error(spec, pretrained, match):
    with pytest.raises(UsageError, match=match):
        create_backbone(spec, 10, pretrained=pretrained)
