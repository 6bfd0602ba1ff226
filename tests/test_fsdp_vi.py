"""VI and MC-dropout sharded with FSDP2 (``bayeskern.distributed.fully_shard``, 2 gloo processes)
against one process.

One spawned job (``fsdp_vi_workers.vi_job``) computes everything; the oracles are single-process
runs of the same posterior on the same global batches.  The model has uneven shards (5 rows ->
3 + 2, 3 -> 2 + 1) and an empty one, and every posterior family and mode runs on it: the sharded
samples are bitwise the single-process ones (the noise of element j does not depend on where it
lives), 3 SGD steps follow the single-process trajectory, ``predict`` gives its predictions, a DCP
checkpoint written by 2 ranks resumes on 2 ranks and in one process, and misuse raises one clear
error.  ``bayeskern-finetune --fsdp`` trains every method sharded under torchrun (one 2-process run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsdp_vi_workers as V
import fsdp_workers as W
import pytest
import torch

import bayeskern as bk

pytestmark = pytest.mark.slow  # spawns a process group


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    tmp = tmp_path_factory.mktemp("fsdp_vi")
    return W.spawn(V.vi_job, tmp, str(tmp / "checkpoint")), tmp / "checkpoint"


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    """Per case, the single-process posterior's samples, trajectory and prediction."""
    out = {}
    for case in V.CASES:
        post = V.posterior(case)
        found: dict[str, Any] = {"samples": [post.sample(i) for i in V.SAMPLE_INDICES]}
        found["moments"] = [{k: v.clone() for k, v in m.items()} for m in (post.mean(), post.std())]  # views of mu
        found["losses"] = V.train(post, V.optimizer(post, "sgd"), range(V.STEPS), None)
        found["state"] = V.state(post)
        x, _ = W.data()
        found["predict"] = bk.predict(post, x[:6], num_samples=3).probs
        found["numel"] = sum(p.numel() for p in post.parameters())
        out[case] = found
    return out


@pytest.mark.parametrize("case", list(V.CASES))
def test_sharded_samples_are_bitwise_the_single_process_ones(job, single, case):
    for rank in range(W.WORLD):
        for got, expected in zip(job[0][rank][case]["samples"], single[case]["samples"]):
            assert got.keys() == expected.keys()
            for name in expected:
                assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("case", list(V.CASES))
def test_sharded_mean_and_std_are_the_single_process_ones(job, single, case):
    for rank in range(W.WORLD):
        for got, expected in zip(job[0][rank][case]["moments"], single[case]["moments"]):
            assert got.keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(
                    got[name], expected[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}"
                )


@pytest.mark.parametrize("case", list(V.CASES))
def test_sharded_training_follows_the_single_process_trajectory(job, single, case):
    """3 SGD steps on the same global batches (SGD: a wrong gradient scale would show, Adam would hide
    it); the mean of the ranks' losses is the single-process loss."""
    for rank in range(W.WORLD):
        got = job[0][rank][case]["state"]
        assert got.keys() == single[case]["state"].keys()
        for key, expected in single[case]["state"].items():
            torch.testing.assert_close(got[key], expected, rtol=1e-5, atol=1e-7, msg=key)
    ranks_mean = [sum(losses) / W.WORLD for losses in zip(*(job[0][r][case]["losses"] for r in range(W.WORLD)))]
    torch.testing.assert_close(ranks_mean, single[case]["losses"], rtol=1e-6, atol=0)


def test_one_shard_equals_the_single_process_run(job, single):
    """FSDP2 over a mesh of one rank: the same samples (bitwise) and trajectory as no sharding."""
    for rank in range(W.WORLD):
        got = job[0][rank]["one_shard"]
        for samples, expected in zip(got["samples"], single["vi"]["samples"]):
            assert all(torch.equal(samples[name], expected[name]) for name in expected)
        for key, expected in single["vi"]["state"].items():
            torch.testing.assert_close(got["state"][key], expected, rtol=1e-5, atol=1e-7, msg=key)
        torch.testing.assert_close(got["losses"], single["vi"]["losses"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", list(V.CASES))
def test_sharded_predict_matches_the_single_process_one(job, single, case):
    for rank in range(W.WORLD):
        torch.testing.assert_close(job[0][rank][case]["predict"], single[case]["predict"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(V.CASES))
def test_each_rank_holds_its_shard_of_the_posterior(job, single, case):
    """The ranks' trainable elements add up to the posterior's (nothing replicated): rank r holds the
    rows ``torch.chunk`` gives it."""
    local = [job[0][rank][case]["local_bytes"] for rank in range(W.WORLD)]
    assert sum(local) == single[case]["numel"]
    assert local[1] < local[0] < single[case]["numel"]


def test_checkpoint_from_two_ranks_resumes_on_two_ranks_and_in_one_process(job):
    """VI + Adam saved with torch.distributed.checkpoint after 2 steps of 3, loaded on 2 ranks (in the
    job) and in this process (unsharded): the third step matches the uninterrupted run."""
    results, checkpoint = job
    for rank in range(W.WORLD):
        uninterrupted, resumed = results[rank]["checkpoint_uninterrupted"], results[rank]["checkpoint_resumed"]
        for key, expected in uninterrupted.items():
            torch.testing.assert_close(resumed[key], expected, rtol=1e-6, atol=1e-7, msg=key)
    one_process = V.resume(str(checkpoint), None)
    for key, expected in results[0]["checkpoint_uninterrupted"].items():
        torch.testing.assert_close(one_process[key], expected, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        ("after_sharding", "create the posterior on the unsharded model"),
        ("sharded_twice", "sharded already"),
        ("model_sharded_behind", "sharded after the posterior was created"),
        ("unequal_batches", "minibatches differ in size"),
        ("train_samples", "train_samples must be 1"),
        ("mesh_2d", "mesh must be 1-D"),
    ],
)
def test_misuse_raises_one_clear_error(job, misuse, message):
    for rank in range(W.WORLD):
        assert message in job[0][rank]["errors"][misuse]


# every method, one epoch each, no pretraining stage and no shifted test sets: the run stays short;
# 25 examples per rank in batches of 8 give SGLD 4 steps, 2 of them kept
CLI = ["--model", "convnet", "--pretrained", "none", "--batch-size", "8", "--num-samples", "2", "--image-size", "8"]
CLI += ["--quiet", "--method", "all", "--epochs", "1", "--dropout-epochs", "1", "--sgld-epochs", "1"]
CLI += ["--sgld-thin", "1", "--corruptions", "none"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resume"], "--fsdp cannot --resume"),
        (["--vi-train-samples", "2"], "--fsdp needs --vi-train-samples 1"),
        ([], "--fsdp needs torchrun"),  # one process: no process group to shard over
    ],
)
def test_cli_fsdp_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    from bayeskern.app.cli import main

    code = main([*CLI, "--fsdp", "--out", str(tmp_path), "--name", "run", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_cli_fsdp_trains_every_method_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node=2 ... --fsdp``: every method trains sharded (the plain fit, SGLD and
    Laplace on the sharded backbone, VI and MC-dropout as sharded posteriors), is gathered, and rank 0
    evaluates it and logs each epoch once; every reported number is finite."""
    import json
    import math

    from bayeskern.app.config import ALL_METHODS

    done = W.torchrun_finetune([*CLI, "--fsdp", "--out", str(tmp_path), "--name", "run"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    methods = json.loads((tmp_path / "run" / "metrics.json").read_text())["methods"]
    assert set(methods) == set(ALL_METHODS)
    for name, result in methods.items():
        for split in ("val", "test"):
            assert all(math.isfinite(v) for v in result[split].values()), (name, split, result[split])
        assert result["test"]["error"] < 0.8, name  # better than chance (5 classes)
    logged = [json.loads(line)["method"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [logged.count(m) for m in ("vanilla", "vi", "mc_dropout", "sgld")] == [1, 1, 1, 1]  # rank 0 only
