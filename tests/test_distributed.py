"""Data parallel: 2 CPU processes (gloo) against one process on the same global batches.

Each test spawns two workers that run a DDP job and save what they computed; the assertions run here,
against single-process oracles (no process group) on the whole data or on one shard.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bayeskern.posteriors.weight_posterior as weight_posterior
from bayeskern import distributed
from bayeskern.app.config import ALL_METHODS
from bayeskern.posteriors import IVON, VI, BayesSGLD, DiagLaplace, KronLaplace, MCDropout, SampleBank

pytestmark = pytest.mark.slow  # spawns process groups

WORLD = 2
STEPS = 4
BATCH = 8  # global batch; each rank gets BATCH // WORLD examples of it


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(n: int = STEPS * BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _shard(t: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s half of global batch ``step``."""
    local = BATCH // WORLD
    return t[step * BATCH + rank * local : step * BATCH + (rank + 1) * local]


def _worker(rank: int, job: Callable, init: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.save(job(rank), f"{out}/{rank}.pt")
        dist.barrier()  # tearing gloo down while the peer is mid-collective aborts it
    finally:
        dist.destroy_process_group()


def _spawn(job: Callable, tmp_path: Path) -> list[dict]:
    """Run ``job(rank)`` in WORLD gloo processes; its return values, by rank."""
    mp.spawn(_worker, args=(job, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]


# -- SGLD --------------------------------------------------------------------------------------
def _sgld_job(rank: int) -> dict:
    x, y = _data()
    model = _model()
    ddp = DDP(model)
    opt = BayesSGLD(ddp.parameters(), lr=1e-2, num_data=64, prior_mean="pretrained", seed=1234)
    bank = SampleBank(model, burnin=0, thin=1, max_samples=STEPS, rank_zero_only=True)
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(ddp(_shard(x, step, rank)), _shard(y, step, rank)).backward()
        opt.step()
        bank.update()
    torch.manual_seed(100 + rank)  # ranks' generators differ: a default seed must still agree
    default_seed = BayesSGLD(model.parameters(), lr=1e-2, num_data=64).param_groups[0]["seed"]
    return {"params": model.state_dict(), "kept": len(bank), "default_seed": default_seed}


def test_sgld_replicas_identical_and_match_single_process(tmp_path: Path) -> None:
    results = _spawn(_sgld_job, tmp_path)
    for name, value in results[0]["params"].items():
        assert torch.equal(value, results[1]["params"][name]), f"replicas drifted apart in {name}"
    assert [r["kept"] for r in results] == [STEPS, 0]
    assert results[0]["default_seed"] == results[1]["default_seed"]

    x, y = _data()  # one process fed the whole global batch: its gradient is the ranks' average
    model = _model()
    opt = BayesSGLD(model.parameters(), lr=1e-2, num_data=64, prior_mean="pretrained", seed=1234)
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x[step * BATCH : (step + 1) * BATCH]), y[step * BATCH : (step + 1) * BATCH]).backward()
        opt.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(results[0]["params"][name], value, rtol=1e-5, atol=1e-6)


# -- IVON --------------------------------------------------------------------------------------
def _ivon_run(model: nn.Module, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]], seed: int | None) -> IVON:
    """IVON over ``model`` for STEPS steps of two samples each on ``batches(step)``."""
    opt = IVON(model.parameters(), lr=0.05, num_data=64, train_samples=2, seed=seed)
    for step in range(STEPS):
        x, y = batches(step)
        for _ in range(opt.train_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def _ivon_job(rank: int) -> dict:
    x, y = _data()
    model = _model()
    ddp = DDP(model)
    opt = _ivon_run(ddp, lambda step: (_shard(x, step, rank), _shard(y, step, rank)), seed=None)
    return {"params": model.state_dict(), "std": opt.std(), "seed": opt.seed}


def test_ivon_under_ddp_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """The ranks share the sample (one seed, broadcast when drawn), so DDP's averaged gradient times
    eps is the global batch's Hessian estimate: the run is the single-process run on the global batch."""
    results = _spawn(_ivon_job, tmp_path)
    assert results[0]["seed"] == results[1]["seed"]
    for name, value in results[0]["params"].items():
        assert torch.equal(value, results[1]["params"][name]), f"replicas drifted apart in {name}"
    x, y = _data()
    model = _model()
    opt = _ivon_run(
        model, lambda s: (x[s * BATCH : (s + 1) * BATCH], y[s * BATCH : (s + 1) * BATCH]), results[0]["seed"]
    )
    for name, value in model.state_dict().items():
        torch.testing.assert_close(results[0]["params"][name], value, rtol=1e-5, atol=1e-6)
    for got, want in zip(results[0]["std"], opt.std()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# -- Laplace -----------------------------------------------------------------------------------
def _loader(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + 3], y[i : i + 3]) for i in range(0, len(x), 3)]


def _laplace_job(rank: int) -> dict:
    x, y = _data(22)
    model = _model()
    shard = _loader(x[rank::WORLD], y[rank::WORLD])  # complementary shards of unequal batch counts
    full = DiagLaplace(model, seed=7).fit(shard, progress=False)
    local = DiagLaplace(model, seed=7).fit(shard, progress=False, reduce=False)
    mc = DiagLaplace(model, fisher_type="mc", seed=7).fit(shard, progress=False)
    return {
        "fisher": full.fisher,
        "log_likelihood": full.log_likelihood,
        "num_data": full.num_data,
        "local": local.fisher,
        "mc": mc.fisher,
        "sample": full.sample(3),
    }


def test_laplace_fisher_all_reduced_equals_single_process(tmp_path: Path) -> None:
    results = _spawn(_laplace_job, tmp_path)
    x, y = _data(22)
    model = _model()
    oracle = DiagLaplace(model, seed=7).fit(_loader(x, y), progress=False)
    for r, result in enumerate(results):
        assert result["num_data"] == 22
        assert result["log_likelihood"] == pytest.approx(oracle.log_likelihood, rel=1e-6)
        shard = DiagLaplace(model, seed=7).fit(_loader(x[r::WORLD], y[r::WORLD]), progress=False)
        for name, value in oracle.fisher.items():
            torch.testing.assert_close(result["fisher"][name], value, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(result["local"][name], shard.fisher[name], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(result["sample"][name], oracle.sample(3)[name], rtol=1e-5, atol=1e-6)
    for name, value in results[0]["mc"].items():  # every rank holds the same reduced MC Fisher
        assert torch.equal(value, results[1]["mc"][name])


def _kron_job(rank: int) -> dict:
    x, y = _data(22)
    la = KronLaplace(_model(), seed=7).fit(_loader(x[rank::WORLD], y[rank::WORLD]), progress=False)
    return {
        "factors": la.factors,
        "fisher": la.fisher,
        "evidence": la.log_marginal_likelihood(),
        "sample": la.sample(3),
    }


def test_kron_laplace_factors_all_reduced_equal_single_process(tmp_path: Path) -> None:
    """G and N A (and the diagonal blocks) are sums over examples: two ranks fitting complementary shards
    hold the single-process K-FAC posterior, whatever their batch counts."""
    results = _spawn(_kron_job, tmp_path)
    x, y = _data(22)
    oracle = KronLaplace(_model(), seed=7).fit(_loader(x, y), progress=False)
    assert oracle.kron_names  # the model has Kronecker blocks
    for result in results:
        for name, (g, a) in oracle.factors.items():
            torch.testing.assert_close(result["factors"][name][0], g, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(result["factors"][name][1], a, rtol=1e-5, atol=1e-7)
        for name, f in oracle.fisher.items():
            torch.testing.assert_close(result["fisher"][name], f, rtol=1e-5, atol=1e-7)
        assert result["evidence"] == pytest.approx(oracle.log_marginal_likelihood(), rel=1e-6)
        for name, value in oracle.sample(3).items():  # eigenvectors of factors summed in another order
            torch.testing.assert_close(result["sample"][name], value, rtol=1e-4, atol=2e-5)


# -- VI and MC-dropout -------------------------------------------------------------------------
POSTERIORS = {
    "vi": lambda: VI(_model(), num_data=64, seed=11, train_samples=2),
    "mc_dropout": lambda: MCDropout(_model(), p=0.2, num_data=64, seed=11, train_samples=2),
}


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _local_grads(post: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of a copy of ``post`` on (x, y), without DDP (the copy's rng advances, not ``post``'s)."""
    local = copy.deepcopy(post)
    loss = local.loss(x, y)
    loss.backward()
    return float(loss.detach()), _grads(local)


def _weight_posterior_job(rank: int) -> dict:
    x, y = _data()
    out = {}
    for kind, make in POSTERIORS.items():
        post = make()
        ddp = DDP(post)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        first, synced = {}, []
        for step in range(STEPS):
            xs, ys = _shard(x, step, rank), _shard(y, step, rank)
            loss, local = _local_grads(post, xs, ys)
            averaged = {n: g.clone() for n, g in local.items()}
            for g in averaged.values():
                dist.all_reduce(g)
                g /= WORLD
            opt.zero_grad()
            ddp(xs, ys).backward()  # forward(inputs, targets) = loss through DDP's hooks
            synced.append((_grads(post), averaged))
            if step == 0:
                first = {"loss": loss, "local": local}
            opt.step()
        same_data_loss, _ = _local_grads(post, x[:BATCH], y[:BATCH])
        out[kind] = {**first, "synced": synced, "state": post.state_dict(), "same_data_loss": same_data_loss}
    return out


@pytest.fixture(scope="module")
def weight_posterior_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One spawn serves both parametrisations of the weight-posterior test."""
    return _spawn(_weight_posterior_job, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("kind", list(POSTERIORS))
def test_weight_posteriors_under_ddp(
    kind: str, weight_posterior_runs: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    results = [r[kind] for r in weight_posterior_runs]
    for result in results:  # at every step DDP averaged the ranks' gradients of forward(inputs, targets)
        for ddp_grads, averaged in result["synced"]:
            assert ddp_grads.keys() == averaged.keys()
            for name, grad in averaged.items():
                torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-5, atol=1e-7)
    for name, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][name]), f"replicas drifted apart in {name}"

    x, y = _data()
    post = POSTERIORS[kind]()  # rank 0 draws exactly what one process draws
    loss, grads = _local_grads(post, _shard(x, 0, 0), _shard(y, 0, 0))
    assert results[0]["loss"] == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(results[0]["local"][name], grad, rtol=1e-5, atol=1e-7)

    # rank 1 draws from streams s + 2**32: distinct from rank 0's on the same data, as documented
    assert results[0]["same_data_loss"] != results[1]["same_data_loss"]
    trained = POSTERIORS[kind]()
    trained.load_state_dict(results[1]["state"])
    monkeypatch.setattr(weight_posterior, "rank_stream", lambda s: s + (1 << distributed.ranks.RANK_STREAM_SHIFT))
    assert results[1]["same_data_loss"] == pytest.approx(_local_grads(trained, x[:BATCH], y[:BATCH])[0], rel=1e-6)


# -- bayeskern-finetune under torchrun ---------------------------------------------------------
def _torchrun_finetune(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    """``bayeskern-finetune`` on 2 gloo ranks, tiny settings plus ``options``; outputs in tmp_path/run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CLI as users run it on CPU
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1"]
    tiny = ["--epochs", "2", "--pretrain-epochs", "1", "--batch-size", "32", "--num-samples", "2", "--image-size", "8"]
    outputs = ["--quiet", "--out", str(tmp_path), "--name", "run"]
    command = [sys.executable, *launcher, "--master_port", str(port), "-m", "bayeskern.finetune", *tiny, *options]
    done = subprocess.run([*command, *outputs], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_finetune_under_torchrun(tmp_path: Path) -> None:
    """Every method trains on 2 gloo ranks; rank 0 alone logs, prints and writes the outputs."""
    options = ["--sgld-epochs", "2", "--dropout-epochs", "2", "--sgld-thin", "1", "--laplace-params", "last_layer"]
    done = _torchrun_finetune(tmp_path, *options)
    methods = json.loads((tmp_path / "run" / "metrics.json").read_text())["methods"]
    assert set(methods) == set(ALL_METHODS)
    logged = [json.loads(line)["method"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    trained = [m for m in ALL_METHODS if m != "laplace"]  # Laplace trains no epochs
    assert sorted(logged) == sorted(trained * 2)  # 2 epochs each, logged once (not once per rank)
    assert done.stdout.count("| vanilla |") == 1


def test_ivon_finetunes_under_torchrun(tmp_path: Path) -> None:
    done = _torchrun_finetune(tmp_path, "--method", "ivon")
    assert set(json.loads((tmp_path / "run" / "metrics.json").read_text())["methods"]) == {"ivon"}
    assert done.stdout.count("| ivon |") == 1
