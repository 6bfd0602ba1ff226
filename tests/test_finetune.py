"""bayeskern-finetune end to end on tiny settings: every method, resume, bad input, ImageFolder."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import bayeskern as bk
from bayeskern.app.finetune import main
from bayeskern.app.methods import METHODS

pytestmark = pytest.mark.slow  # runs the CLI end to end

TINY = [
    "--model",
    "convnet",
    "--epochs",
    "2",
    "--sgld-epochs",
    "2",
    "--sgld-thin",
    "1",
    "--dropout-epochs",
    "2",
    "--batch-size",
    "128",
    "--num-samples",
    "2",
    "--image-size",
    "8",
    "--quiet",
    "--laplace-params",
    "last_layer",
]


def _run(tmp_path, *extra, name="run"):
    return main([*TINY, "--out", str(tmp_path), "--name", name, *extra])


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_runs_end_to_end_on_digits(tmp_path, capsys, method):
    assert _run(tmp_path, "--method", method) == 0
    table = capsys.readouterr().out
    assert f"| {method} |" in table
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    result = payload["methods"][method]
    assert set(result["test"]) >= {"error", "ece", "mce", "nll", "brier"}
    assert set(result["val"]) >= {"error", "ece", "nll"}  # recorded for choosing settings on validation
    assert result["test"]["error"] < 0.9  # better than chance after two epochs
    assert result["temperature"] > 0 and result["train_seconds"] > 0
    assert (tmp_path / "run" / f"reliability_{method}.png").stat().st_size > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    trained = "map" if method == "laplace" else method  # Laplace fits no epochs of its own, only the MAP
    assert [r["epoch"] for r in log if r["method"] == trained] == [1, 2]


def _checkpoint_state(run_dir, method):
    return torch.load(run_dir / method / "checkpoint.pt", weights_only=True)["state"]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_adam_learning_rate_follows_the_schedule(tmp_path, schedule):
    code = _run(
        tmp_path,
        "--method",
        "vanilla",
        "--epochs",
        "4",
        "--lr",
        "0.01",
        "--lr-schedule",
        schedule,
        "--stop-after-epoch",
        "1",
        name=schedule,
    )
    assert code == 3
    state = _checkpoint_state(tmp_path / schedule, "vanilla")
    # digits keeps 100 training examples: one step per epoch at --batch-size 128, four steps in all
    expected = 0.01 * (1 + math.cos(math.pi * 1 / 4)) / 2 if schedule == "cosine" else 0.01
    rates = [g["lr"] for g in state["optimizer"]["param_groups"]]  # the body's and the head's
    assert rates == pytest.approx([expected] * 2, rel=1e-9)
    assert ("scheduler" in state) == (schedule == "cosine")


def test_mc_dropout_starts_from_the_map_with_norm_layers_as_point_estimates(tmp_path):
    assert _run(tmp_path, "--method", "vanilla,mc_dropout", "--dropout-lr", "1e-12", name="mcd") == 0
    map_weights = _checkpoint_state(tmp_path / "mcd", "vanilla")["model"]
    posterior = _checkpoint_state(tmp_path / "mcd", "mc_dropout")["posterior"]

    def store(prefix):
        return {k[len(prefix) :].replace("/", "."): v for k, v in posterior.items() if k.startswith(prefix)}

    means = store("mu.")
    assert means and all(torch.allclose(v, map_weights[k], rtol=0, atol=1e-9) for k, v in means.items())
    from bayeskern.app.models import create_backbone

    model = create_backbone("convnet", 10).model
    norm = {
        f"{m}.{p}"
        for m, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for p, _ in module.named_parameters()
    }
    assert norm and set(store("point.")) == norm and norm.isdisjoint(means)


def test_methods_refining_the_map_keep_the_pretrained_weights_as_prior_mean(tmp_path, monkeypatch):
    from bayeskern.app.models import create_backbone

    model = create_backbone("convnet", 10).model
    weights = model.state_dict()
    torch.save(weights, tmp_path / "w.pt")
    laplace_means = {}
    fit = bk.DiagLaplace.fit

    def spy(self, *args, **kwargs):
        laplace_means.update((name, self.prior.mean(name)) for name in self.names)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(bk.DiagLaplace, "fit", spy)
    code = _run(tmp_path, "--method", "mc_dropout,sgld,laplace", "--pretrained", str(tmp_path / "w.pt"), name="pre")
    assert code == 0
    posterior = _checkpoint_state(tmp_path / "pre", "mc_dropout")["posterior"]
    dropout_means = {k[len("prior.") :].replace("/", "."): v for k, v in posterior.items() if k.startswith("prior.")}
    sgld_state = _checkpoint_state(tmp_path / "pre", "sgld")["optimizer"]["state"]
    in_group_order = sorted((n for n, _ in model.named_parameters()), key=lambda n: n.startswith("head."))  # body, head
    sgld_means = {name: sgld_state[i]["prior_mean"] for i, name in enumerate(in_group_order)}
    for means in (dropout_means, sgld_means, laplace_means):  # not the MAP they start from
        assert means and all(torch.equal(value, weights[name]) for name, value in means.items())


def test_laplace_searches_prior_precisions_upward_from_the_prior(tmp_path, monkeypatch):
    grids = []
    search = bk.DiagLaplace.optimize_prior_precision

    def spy(self, *args, **kwargs):
        grids.append(kwargs["grid"])
        return search(self, *args, **kwargs)

    monkeypatch.setattr(bk.DiagLaplace, "optimize_prior_precision", spy)
    assert _run(tmp_path, "--method", "laplace", "--prior-std", "0.5", name="lap") == 0
    assert grids == [pytest.approx([10 ** (k / 2) / 0.5**2 for k in range(17)], rel=1e-5)]


def test_resume_after_interruption_gives_the_same_metrics(tmp_path):
    args = ("--method", "vanilla,vi,mc_dropout,sgld")
    assert _run(tmp_path, *args, name="whole") == 0
    assert _run(tmp_path, *args, "--stop-after-epoch", "1", name="cut") == 3
    assert _run(tmp_path, *args, "--resume", name="cut") == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["methods"]
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())["methods"]
    for method in ("vanilla", "vi", "mc_dropout", "sgld"):
        assert whole[method]["test"] == pytest.approx(resumed[method]["test"], rel=1e-6, abs=1e-9), method


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "bayes-by-magic"], "unknown method"),
        (["--model", "timm:not_a_model"], "unknown timm model"),
        (["--dataset", "mnist"], "unknown dataset"),
        (["--dataset", "imagefolder:/no/such/folder"], "not a directory"),
        (["--dataset", "cifar10", "--data-dir", "/no/such/data"], "--download"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--dropout-epochs", "0"], "--dropout-epochs must be at least 1"),
        (["--dropout-p", "1.5"], "--dropout-p"),
        (["--method", "sgld", "--sgld-thin", "5"], "SGLD keeps no sample"),
        (["--learning-rate", "1"], "unrecognized arguments"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    try:
        code = _run(tmp_path, *argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_resuming_with_another_model_exits_2(tmp_path, capsys):
    assert _run(tmp_path, "--method", "vanilla", "--stop-after-epoch", "1", name="x") == 3
    capsys.readouterr()
    code = _run(tmp_path, "--method", "vanilla", "--resume", "--model", "timm:resnet10t", name="x")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "was started with --model convnet" in err[0]


def test_checkpoint_that_does_not_fit_the_model_exits_2(tmp_path, capsys):
    assert _run(tmp_path, "--method", "vanilla", "--stop-after-epoch", "1", name="y") == 3
    (tmp_path / "y" / "config.json").unlink()  # a checkpoint from elsewhere, no record of its run
    capsys.readouterr()
    code = _run(tmp_path, "--method", "vanilla", "--resume", "--model", "timm:resnet10t", name="y")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not fit this run: " in err[0]


def test_imagefolder_run(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for label, shade in (("dark", 40), ("light", 200)):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(shade, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    code = _run(
        tmp_path,
        "--method",
        "vanilla",
        "--dataset",
        f"imagefolder:{tmp_path / 'imgs'}",
        "--model",
        "timm:resnet10t",
        name="folder",
    )
    assert code == 0
    assert "| vanilla |" in capsys.readouterr().out
    assert json.loads((tmp_path / "folder" / "metrics.json").read_text())["config"]["dataset"].startswith(
        "imagefolder:"
    )


def test_state_dict_pretrained_weights_are_the_starting_point(tmp_path, capsys):
    from bayeskern.app.models import create_backbone

    torch.save(create_backbone("convnet", 5).model.state_dict(), tmp_path / "w.pt")
    assert _run(tmp_path, "--method", "vi", "--pretrained", str(tmp_path / "w.pt"), name="pre") == 0
    config = json.loads((tmp_path / "pre" / "metrics.json").read_text())["config"]
    assert config["pretrained"] == str(tmp_path / "w.pt")


def test_a_diverged_method_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(METHODS["vanilla"], "predict", lambda self, data: torch.full((len(data), 10), float("nan")))
    code = _run(tmp_path, "--method", "vanilla", name="nan")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not finite" in err[0]
