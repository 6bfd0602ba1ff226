"""IVON on a ``fully_shard``-ed model (FSDP2, 2 gloo processes) against one process on the global batches.

The ranks share each sample (one seed; element j of a parameter reads the Philox counter of its global
index wherever its shard lives) and FSDP2 averages the gradients, so the sharded trajectory and
posterior stds equal the single-process ones for every implementation; each rank keeps the momentum
and h of its shard only.
"""

from __future__ import annotations

import json
import math
from typing import Any

import fsdp_workers as W
import pytest
import torch

from bayeskern.posteriors import IVON

pytestmark = pytest.mark.slow  # spawns a process group


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return W.spawn(W.ivon_job, tmp_path_factory.mktemp("fsdp_ivon"))


@pytest.mark.parametrize("backend", list(W.BACKENDS))
def test_sharded_trajectory_and_std_equal_single_process(results, backend: str) -> None:
    net = W.model()
    opt = IVON(net.named_parameters(), **W.ivon_options(backend))
    W.ivon_run(net, opt, None)
    stds = dict(zip([n for n, _ in net.named_parameters()], opt.std()))
    for rank in range(W.WORLD):
        for name, value in net.named_parameters():
            torch.testing.assert_close(results[rank][f"params/{backend}"][name], value.detach(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(results[rank][f"std/{backend}"][name], stds[name], rtol=1e-5, atol=1e-7)


def test_each_rank_keeps_the_state_of_its_shard(results) -> None:
    total = 2 * 4 * sum(p.numel() for p in W.model().parameters())  # momentum and h, float32
    per_rank = [r["state_bytes/fused"] for r in results]
    assert sum(per_rank) == total and max(per_rank) < total


def test_cli_ivon_trains_sharded_under_torchrun(tmp_path) -> None:
    """``torchrun --nproc_per_node=2 ... --method ivon --fsdp``: IVON trains the sharded backbone, the
    model and its stds are gathered, rank 0 evaluates; every reported number is finite."""
    argv = ["--model", "convnet", "--pretrained", "none", "--batch-size", "8", "--num-samples", "2"]
    argv += ["--image-size", "8", "--quiet", "--method", "ivon", "--epochs", "1", "--corruptions", "none"]
    done = W.torchrun_finetune([*argv, "--fsdp", "--out", str(tmp_path), "--name", "run"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())["methods"]["ivon"]
    for split in ("val", "test"):
        assert all(math.isfinite(v) for v in result[split].values()), (split, result[split])
