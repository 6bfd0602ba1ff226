"""BayesSGLD and SampleBank on a ``fully_shard``-ed model (FSDP2, 2 gloo processes) against one process.

One spawned job (``fsdp_workers.sgld_job``) computes everything; the oracles are single-process runs
of the same model on the same global batches: the sharded trajectory equals the single-process one
for every backend (the noise of element j does not depend on where it lives), the bank's samples are
the single-process bank's, a DCP checkpoint written by 2 ranks resumes on 2 ranks and in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsdp_workers as W
import pytest
import torch
import torch.nn.functional as F

from bayeskern import predict
from bayeskern.posteriors import BayesSGLD, SampleBank

pytestmark = pytest.mark.slow  # spawns a process group


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    tmp = tmp_path_factory.mktemp("fsdp_sgld")
    return W.spawn(W.sgld_job, tmp, str(tmp / "checkpoint")), tmp / "checkpoint"


def _single_process(preconditioner: str | None = None, backend: str = "fused", mode: str | None = None) -> Any:
    net = W.model()
    opt = BayesSGLD(net.named_parameters(), preconditioner=preconditioner, **W.sgld_options(backend))
    bank = SampleBank(net, mode=mode, max_samples=3, seed=7) if mode else None
    W.sgld_run(net, opt, bank, range(W.STEPS), None)
    return net, bank


@pytest.mark.parametrize("preconditioner", [None, "rmsprop"])
@pytest.mark.parametrize("backend", list(W.BACKENDS))
def test_sharded_trajectory_equals_single_process(job, backend: str, preconditioner: str | None) -> None:
    results, _ = job
    net, _ = _single_process(preconditioner, backend)
    for rank in range(W.WORLD):
        sharded = results[rank][f"params/{backend}/{preconditioner}"]
        for name, value in net.named_parameters():
            torch.testing.assert_close(sharded[name], value.detach(), rtol=1e-5, atol=1e-7, msg=name)


def test_optimizer_state_per_rank_is_its_shard(job) -> None:
    results, _ = job
    total = sum(p.numel() for p in W.model().parameters()) * 4
    per_rank = [r["avg_bytes/fused/rmsprop"] for r in results]
    assert sum(per_rank) == total  # the square averages are split, not replicated
    assert max(per_rank) < total


@pytest.mark.parametrize("mode", ["samples", "moments"])
def test_sharded_bank_samples_and_predictions_equal_single_process(job, mode: str) -> None:
    results, _ = job
    _, bank = _single_process(mode=mode)
    for rank in range(W.WORLD):
        got = results[rank][f"bank/{mode}"]
        for i, sample in enumerate(got["samples"]):
            for name, value in bank.sample(i).items():
                torch.testing.assert_close(sample[name], value, rtol=1e-5, atol=1e-6, msg=f"{name}[{i}]")
        for key in ("mean", "variance"):
            expected = getattr(bank, key)()
            for name, value in got[key].items():
                torch.testing.assert_close(value, expected[name].to(value.dtype), rtol=1e-4, atol=1e-7)
    expected = predict(bank, W.data()[0][:6], num_samples=4).probs
    for rank in range(W.WORLD):
        torch.testing.assert_close(results[rank][f"bank/{mode}"]["predict"], expected, rtol=1e-5, atol=1e-6)
        assert results[rank][f"bank/{mode}"]["chain_restored"]
    if mode == "samples":  # each rank stores its shard only
        per_rank = [r["bank/samples"]["local_bytes"] for r in results]
        assert sum(per_rank) == 3 * sum(p.numel() * 4 for p in W.model().parameters())


def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(job) -> None:
    results, _ = job
    assert [r["nan_skipped"] for r in results] == [(1, True), (1, True)]


def test_checkpoint_saved_on_two_ranks_resumes_bitwise_on_two(job) -> None:
    results, _ = job
    for rank in range(W.WORLD):
        resumed, uninterrupted = results[rank]["resumed"], results[rank]["uninterrupted"]
        for name, value in uninterrupted["params"].items():
            assert torch.equal(resumed["params"][name], value), name
        for got, expected in zip(resumed["samples"], uninterrupted["samples"]):
            assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_checkpoint_saved_on_two_ranks_loads_in_one_process(job) -> None:
    """Loaded into an unsharded model, optimizer and bank in this process (no process group) and run on
    the same global batches as the two ranks (each half's mean loss halved, as FSDP2 averages), the
    chain continues bit for bit as the uninterrupted 2-rank run did."""
    results, checkpoint = job
    net = W.model()
    opt = BayesSGLD(net.named_parameters(), preconditioner="rmsprop", **{**W.sgld_options("fused"), "seed": 5})
    bank = SampleBank(net, max_samples=3, seed=8)
    W.resume(net, opt, bank, checkpoint)
    assert opt.param_groups[0]["step"] == 2 and opt.param_groups[0]["seed"] == 1234 and bank.num_updates == 2
    x, y = W.data()
    for step in range(2, W.STEPS):
        opt.zero_grad()
        for rank in range(W.WORLD):
            loss = F.cross_entropy(net(W.local_batch(x, step, rank)), W.local_batch(y, step, rank))
            (loss / W.WORLD).backward()
        opt.step()
        bank.update()
    uninterrupted = results[0]["uninterrupted"]
    for name, value in net.named_parameters():
        assert torch.equal(value.detach(), uninterrupted["params"][name]), name
    for i, expected in enumerate(uninterrupted["samples"]):
        for name, value in bank.sample(i).items():
            assert torch.equal(value, expected[name]), f"{name}[{i}]"


def test_unsupported_setups_raise_clear_errors(job) -> None:
    results, _ = job
    for rank in range(W.WORLD):
        found = results[rank]["errors"]
        assert "mix DTensor" in found["sgld_mixed_plain"]
        assert "one device mesh" in found["sgld_two_meshes"]
        assert "one mesh" in found["bank_two_meshes"]
        assert "after sharding the model" in found["bank_before_shard"]
        assert "rank_zero_only" in found["bank_rank_zero_only"]
