"""``bayeskern.app.config.RunConfig``: one frozen record of a run's options, built once from the
command line; bad options fail while it is built, with the CLI's one-line exit-2 messages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bayeskern.app.cli import build_parser, main
from bayeskern.app.config import ALL_METHODS, DEFAULT_MODEL, METHOD_NAMES, TABULAR_MODEL, RunConfig
from bayeskern.app.errors import UsageError
from bayeskern.app.methods import METHODS


def _config(*argv: str) -> RunConfig:
    return RunConfig.from_args(build_parser().parse_args(list(argv)))


def test_config_is_frozen():
    config = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]
    assert dataclasses.replace(config, epochs=3).epochs == 3 and config.epochs != 3


def test_config_has_one_field_per_option_and_leaves_the_arguments_alone():
    args = build_parser().parse_args(["--dataset", "diabetes"])
    before = vars(args).copy()
    config = RunConfig.from_args(args)
    assert vars(args) == before
    assert [f.name for f in dataclasses.fields(RunConfig)] == list(vars(args))
    assert config.model == TABULAR_MODEL  # the default model resolved for a tabular dataset


def test_record_is_what_config_json_keeps():
    args = build_parser().parse_args(["--out", "somewhere", "--device", "cpu"])
    record = _config("--out", "somewhere", "--device", "cpu").record()
    assert record == {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    assert json.loads(json.dumps(record)) == record


def test_resolved_values():
    config = _config("--method", "sgld, vi", "--laplace-params", "fc.*,layer4.*", "--device", "cpu")
    assert config.methods == ("sgld", "vi")
    assert config.device == torch.device("cpu")
    assert config.laplace_selection == ["fc.*", "layer4.*"]
    assert config.text is None
    assert _config().methods == ALL_METHODS and set(ALL_METHODS) < set(METHOD_NAMES)
    assert _config("--laplace-params", "last_layer").laplace_selection == "last_layer"
    assert _config().laplace_selection is None
    assert _config("--model", "convnet", "--dataset", "diabetes").model == "convnet"  # given: kept (run rejects it)
    assert _config().model == DEFAULT_MODEL
    assert _config("--name", "x", "--out", "o").run_dir == Path("o/x")
    assert _config("--model", "timm:resnet18", "--out", "o").run_dir == Path("o/digits-timm-resnet18")


def test_an_hf_model_takes_the_checkpoints_weights():
    config = _config("--model", "hf:some/model", "--dataset", "csv:reviews.csv", "--lora-r", "4")
    assert config.pretrained == "hf"
    assert config.text is not None and config.text.model == "some/model" and config.text.lora_r == 4


def test_the_registry_names_the_methods_a_run_can_take():
    """``--method`` takes the registry's names; each class is registered under its own name."""
    assert all(cls.name == name for name, cls in METHODS.items())
    assert _config("--method", "kron_laplace,vi").methods == ("kron_laplace", "vi")


BAD = [
    (["--method", "bayes-by-magic"], "unknown method 'bayes-by-magic'"),
    (["--method", ","], "unknown method ','"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--sgld-thin", "0"], "--sgld-thin must be at least 1"),
    (["--ivon-epochs", "0"], "--ivon-epochs must be at least 1"),
    (["--ivon-beta2", "1"], "--ivon-beta2 must be in [0, 1)"),
    (["--dropout-p", "1.5"], "--dropout-p must be in [0, 1)"),
    (["--sgld-burnin", "1"], "--sgld-burnin must be in [0, 1)"),
    (["--study", "temperature"], "unknown --study 'temperature'"),
    (["--fsdp", "--resume"], "--fsdp cannot --resume"),
    (["--fsdp", "--vi-train-samples", "2"], "--fsdp needs --vi-train-samples 1"),
    (["--corruptions", "rotate,fog"], "unknown corruption 'fog'"),
    (["--severities", "1,6"], "--severities must lie in 1..5"),
    (["--device", "no-such-device"], "unknown device 'no-such-device'"),
    (["--model", "hf:x"], "--model hf:x classifies text"),
    (["--dataset", "csv:x.csv"], "--dataset csv:x.csv holds text"),
    (["--lora-r", "4"], "--lora-r / --lora-targets / --lora-alpha need --model hf:"),
    (["--model", "hf:x", "--dataset", "csv:x.csv", "--pretrained", "timm"], "drop --pretrained"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_options_fail_while_the_config_is_built_with_the_clis_message(tmp_path, capsys, argv, message):
    with pytest.raises(UsageError) as raised:
        _config(*argv)
    assert message in str(raised.value)
    out = tmp_path / "out"
    assert main([*argv, "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bayeskern-finetune: error: {raised.value}"]
    assert not out.exists()  # nothing was started
