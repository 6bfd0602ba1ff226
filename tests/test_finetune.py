"""bayeskern-finetune end to end on tiny settings: every method, the pretraining cache, the prior
mean, shift and OOD evaluation, the prior study, resume, bad input, ImageFolder."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import bayeskern as bk
from bayeskern.app.cli import main
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
    "--pretrain-epochs",
    "1",
    "--severities",
    "1,5",
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
    trained = "map" if method in ("laplace", "kron_laplace") else method  # a Laplace trains no epochs, only the MAP
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
    # digits keeps 50 training examples: one step per epoch at --batch-size 128, four steps in all
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


def _spy_on_laplace_prior_means(monkeypatch) -> dict:
    """The prior means every ``DiagLaplace.fit`` of the run sees, by parameter name (filled as it runs)."""
    means = {}
    fit = bk.DiagLaplace.fit

    def spy(self, *args, **kwargs):
        means.update((name, self.prior.mean(name)) for name in self.names)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(bk.DiagLaplace, "fit", spy)
    return means


def test_methods_refining_the_map_keep_the_pretrained_weights_as_prior_mean(tmp_path, monkeypatch):
    from bayeskern.app.models import create_backbone

    model = create_backbone("convnet", 5).model  # digits: the five classes 5-9
    weights = model.state_dict()
    torch.save(weights, tmp_path / "w.pt")
    laplace_means = _spy_on_laplace_prior_means(monkeypatch)
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
    calls = []
    search = bk.DiagLaplace.optimize_prior_precision

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return search(self, *args, **kwargs)

    monkeypatch.setattr(bk.DiagLaplace, "optimize_prior_precision", spy)
    assert _run(tmp_path, "--method", "laplace", "--prior-std", "0.5", name="lap") == 0
    assert _run(tmp_path, "--method", "laplace", "--laplace-grid-points", "5", "--num-samples", "3", name="five") == 0
    assert [c["grid"] for c in calls] == [
        pytest.approx([10 ** (k / 2) / 0.5**2 for k in range(17)], rel=1e-5),
        pytest.approx([10.0 ** (2 * k) for k in range(5)], rel=1e-5),
    ]
    # scored by the GLM probit, the closed form of the linearised predictive the method predicts with
    assert all(c["pred_type"] == "glm" and c["link_approx"] == "probit" and "num_samples" not in c for c in calls)


def test_resume_after_interruption_gives_the_same_metrics(tmp_path):
    args = ("--method", "vanilla,vi,mc_dropout,sgld,ivon")
    assert _run(tmp_path, *args, name="whole") == 0
    assert _run(tmp_path, *args, "--stop-after-epoch", "1", name="cut") == 3
    assert _run(tmp_path, *args, "--resume", name="cut") == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["methods"]
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())["methods"]
    for method in ("vanilla", "vi", "mc_dropout", "sgld", "ivon"):
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
        (["--corruptions", "rotate,fog"], "unknown corruption 'fog'"),
        (["--severities", "1,6"], "--severities must lie in 1..5"),
        (["--severities", "0"], "--severities must lie in 1..5"),
        (["--study", "temperature"], "unknown --study 'temperature'"),
        (["--prior-mean", "pretrain"], "--prior-mean: invalid choice"),
        (["--pretrain-epochs", "0"], "--pretrain-epochs must be at least 1"),
        (["--laplace-grid-points", "0"], "--laplace-grid-points must be at least 1"),
        (["--dataset", "diabetes"], "is tabular: use --model mlp"),
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


def test_metrics_json_records_shift_and_ood_per_method(tmp_path, capsys):
    assert _run(tmp_path, "--method", "vanilla,laplace", name="s") == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| method"))
    assert "shift ECE" in header and "shift NLL" in header and "AUROC MI" in header and "AUROC maxp" in header
    payload = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert payload["pretraining"]["source"] == "digits0-4" and payload["pretraining"]["reused"] is False
    assert set(payload["timing"]) >= {"wall_seconds", "cpu_seconds", "pretrain_seconds", "evaluate_seconds"}
    for method in ("vanilla", "laplace"):
        result = payload["methods"][method]
        assert set(result["shift"]) == {"rotate", "noise", "blur"}
        for by_severity in result["shift"].values():
            assert set(by_severity) == {"1", "5"}
            assert all(set(row) == {"error", "ece", "nll"} for row in by_severity.values())
        rows = [row for by_severity in result["shift"].values() for row in by_severity.values()]
        assert result["shift_mean"]["nll"] == pytest.approx(sum(r["nll"] for r in rows) / len(rows))
        assert set(result["ood"]) == {"max_prob", "entropy", "mutual_information"}
        assert all(set(v) == {"auroc", "aupr", "fpr95"} for v in result["ood"].values())
        assert all(0 <= v["auroc"] <= 1 for v in result["ood"].values())
    assert payload["methods"]["vanilla"]["ood"]["mutual_information"]["auroc"] == 0.5  # no weight samples
    assert payload["methods"]["laplace"]["ood"]["mutual_information"]["auroc"] != 0.5
    for picture in ("shift.png", "ood_scores.png", "reliability_all.png"):
        assert (tmp_path / "s" / picture).stat().st_size > 0


def test_pretraining_is_cached_and_reused(tmp_path, capsys):
    assert _run(tmp_path, "--method", "vanilla", name="first") == 0
    assert "pretrained: training convnet on digits0-4" in capsys.readouterr().out
    (cached,) = (tmp_path / "pretrained").glob("*.pt")
    stamp = cached.stat().st_mtime_ns
    assert _run(tmp_path, "--method", "vanilla", name="second") == 0
    assert f"pretrained: reusing {cached}" in capsys.readouterr().out
    assert cached.stat().st_mtime_ns == stamp
    second = json.loads((tmp_path / "second" / "metrics.json").read_text())["pretraining"]
    assert second["reused"] is True and second["weights"] == str(cached)
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())["methods"]["vanilla"]["test"]
    again = json.loads((tmp_path / "second" / "metrics.json").read_text())["methods"]["vanilla"]["test"]
    assert first == pytest.approx(again, rel=1e-6, abs=1e-9)  # the same starting point


def test_the_cached_weights_are_the_starting_point_without_the_head(tmp_path):
    from bayeskern.app.models import create_backbone

    assert _run(tmp_path, "--method", "vanilla", "--epochs", "1", "--stop-after-epoch", "1", name="p") == 3
    (cached,) = (tmp_path / "pretrained").glob("*.pt")
    state = torch.load(cached, weights_only=True)
    assert not any(k.startswith("head.") for k in state)  # the head is re-initialised for classes 5-9
    reference = create_backbone("convnet", 5, str(cached))
    assert reference.new_params == ["head.weight", "head.bias"]


@pytest.mark.parametrize("prior", ["pretrained", "zero"])
def test_prior_mean_option_sets_every_posteriors_prior_mean(tmp_path, monkeypatch, prior):
    laplace_means = _spy_on_laplace_prior_means(monkeypatch)
    assert (
        _run(tmp_path, "--method", "vi,sgld,laplace", "--laplace-params", "features.*,head.*", "--prior-mean", prior)
        == 0
    )
    (cached,) = (tmp_path / "pretrained").glob("*.pt")
    weights = torch.load(cached, weights_only=True)
    vi = _checkpoint_state(tmp_path / "run", "vi")["posterior"]
    vi_means = {k[len("prior.") :].replace("/", "."): v for k, v in vi.items() if k.startswith("prior.")}
    assert set(vi_means) == set(laplace_means) and "features.0.0.weight" in vi_means
    for means in (vi_means, laplace_means):
        for name, mean in means.items():
            if prior == "zero" or name.startswith("head."):  # the new head has mean zero under either
                assert not mean.any(), name
            else:
                assert torch.equal(mean, weights[name]), name
    sgld_state = _checkpoint_state(tmp_path / "run", "sgld")["optimizer"]["state"]
    body = [sgld_state[i].get("prior_mean") for i in range(len(sgld_state) - 2)]  # body's, then head's params
    if prior == "zero":  # a zero mean is not stored
        assert all(m is None or not m.any() for m in body)
    else:
        assert body and all(m.any() for m in body)


def test_prior_study_writes_one_table_for_both_prior_means(tmp_path, capsys):
    assert _run(tmp_path, "--method", "vanilla,laplace", "--study", "prior", name="study") == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == [
        ("vanilla", "pretrained"),
        ("laplace", "pretrained"),
        ("laplace", "zero"),
    ]
    assert (tmp_path / "study" / "study_prior.md").read_text().strip() in out
    for prior in ("pretrained", "zero"):
        payload = json.loads((tmp_path / "study" / f"prior-{prior}" / "metrics.json").read_text())
        assert payload["methods"]["laplace"]["test"]["nll"] > 0
    assert "vanilla" not in json.loads((tmp_path / "study" / "prior-zero" / "metrics.json").read_text())["methods"]


def test_diabetes_regression_through_every_method_with_the_validation_fitted_noise(tmp_path, capsys):
    from bayeskern.app.data import DataOptions, load_dataset

    assert _run(tmp_path, "--dataset", "diabetes", "--model", "mlp", "--method", ",".join(METHODS), name="reg") == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| method"))
    assert "RMSE" in header and "coverage 90%" in header
    payload = json.loads((tmp_path / "reg" / "metrics.json").read_text())
    assert payload["config"]["model"] == "mlp" and payload["pretraining"]["source"] is None
    sigma = payload["noise_std"]["value"] * load_dataset("diabetes", DataOptions()).target_scale
    vanilla = payload["methods"]["vanilla"]
    # sigma is the plain fit's validation RMSE, so its Gaussian validation NLL is log(2 pi e sigma^2) / 2
    assert vanilla["val"]["rmse"] == pytest.approx(sigma, rel=1e-5)
    assert vanilla["val"]["nll"] == pytest.approx(0.5 * math.log(2 * math.pi * math.e * sigma**2), rel=1e-5)
    for method in METHODS:
        result = payload["methods"][method]
        assert set(result["test"]) == {"rmse", "nll", "coverage90"} and 0 <= result["test"]["coverage90"] <= 1
        assert result["test"]["rmse"] < 2 * sigma and not result["shift"] and not result["ood"]
