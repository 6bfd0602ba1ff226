"""2-process gloo jobs for the FSDP2 (``fully_shard``) tests of BayesSGLD, SampleBank and DiagLaplace.

Each job runs in both ranks, checks nothing itself and returns what it computed; the tests compare
it with single-process runs of the same model on the same global batches.  The model has shards of
every kind on two ranks: uneven rows (5 -> 3 + 2, 3 -> 2 + 1) and an empty one (``scale`` has one
row: rank 1 holds none of it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from bayeskern.distributed.sharding import local_tensor

WORLD = 2
STEPS = 4
BATCH = 8  # global batch; each rank gets BATCH // WORLD examples of it
NUM_DATA = 64


class Net(nn.Module):
    """``fc2(tanh(fc1(x))) * scale``: two linear layers and a broadcast parameter of one row."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(1, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def model() -> Net:
    torch.manual_seed(0)
    return Net()


def data(n: int = STEPS * BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def global_batch(t: torch.Tensor, step: int) -> torch.Tensor:
    return t[step * BATCH : (step + 1) * BATCH]


def local_batch(t: torch.Tensor, step: int, rank: int, world: int = WORLD) -> torch.Tensor:
    """Rank ``rank``'s part of global batch ``step``."""
    local = BATCH // world
    return global_batch(t, step)[rank * local : (rank + 1) * local]


def shard(net: nn.Module, world: int = WORLD) -> nn.Module:
    """``fully_shard`` each linear layer, then the root (which keeps ``scale``), on a 1-D CPU mesh."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for layer in (net.fc1, net.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every DTensor gathered (a collective), plain tensors as they are."""
    return {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in tensors.items()}


def params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in full(dict(net.named_parameters())).items()}


# -- SGLD ---------------------------------------------------------------------------------------
BACKENDS = {"reference": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def sgld_options(backend: str) -> dict[str, Any]:
    return dict(lr=1e-2, num_data=NUM_DATA, seed=1234, **BACKENDS[backend])


def sgld_run(net: nn.Module, opt: Any, bank: Any, steps: range, rank: int | None, world: int = WORLD) -> None:
    """Steps of cross-entropy SGLD: rank ``rank``'s part of each global batch (None: all of it)."""
    x, y = data()
    for step in steps:
        xs, ys = (
            (global_batch(x, step), global_batch(y, step))
            if rank is None
            else (
                local_batch(x, step, rank, world),
                local_batch(y, step, rank, world),
            )
        )
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        opt.step()
        if bank is not None:
            bank.update()


def sgld_job(rank: int, checkpoint: str) -> dict[str, Any]:
    """Per backend (plain and pSGLD): the parameters after STEPS steps; the bank's samples, mean and
    moments draws; a skipped step when one rank's gradient holds a NaN; a DCP checkpoint after 2 steps
    resumed on 2 ranks; the errors of unsupported orders and mixes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    import bayeskern as bk
    from bayeskern.posteriors import BayesSGLD, SampleBank

    out: dict[str, Any] = {}
    for backend in BACKENDS:
        for preconditioner in (None, "rmsprop"):
            net = shard(model())
            opt = BayesSGLD(net.named_parameters(), preconditioner=preconditioner, **sgld_options(backend))
            sgld_run(net, opt, None, range(STEPS), rank)
            out[f"params/{backend}/{preconditioner}"] = params(net)
            out[f"avg_bytes/{backend}/{preconditioner}"] = sum(
                s["square_avg"].to_local().numel() * 4 for s in opt.state.values() if "square_avg" in s
            )

    for mode in ("samples", "moments"):
        net = shard(model())
        opt = BayesSGLD(net.named_parameters(), **sgld_options("fused"))
        bank = SampleBank(net, mode=mode, max_samples=3, seed=7)
        sgld_run(net, opt, bank, range(STEPS), rank)
        chain = params(net)
        prediction = bk.predict(bank, data()[0][:6], num_samples=4).probs
        out[f"bank/{mode}"] = {
            "predict": prediction,
            "chain_restored": all(torch.equal(v, chain[n]) for n, v in params(net).items()),
            "samples": [full(bank.sample(i)) for i in range(4)],
            "mean": full(bank.mean()),
            "variance": full(bank.variance()),
            "local_bytes": sum(t.numel() * t.element_size() for s in bank._samples for t in s.values()),
        }

    # one rank's NaN: every rank skips the step together
    net = shard(model())
    opt = BayesSGLD(net.named_parameters(), nonfinite="skip", **sgld_options("fused"))
    before = params(net)
    x, y = data()
    xs = local_batch(x, 0, rank).clone()
    if rank == 1:
        xs[0, 0] = float("nan")
    F.cross_entropy(net(xs), local_batch(y, 0, rank)).backward()
    opt.step()
    out["nan_skipped"] = (
        opt.param_groups[0]["skipped_steps"],
        all(torch.equal(before[n], v) for n, v in params(net).items()),
    )

    # checkpoint after 2 steps, continue to STEPS; then resume from it in fresh objects
    net = shard(model())
    opt = BayesSGLD(net.named_parameters(), preconditioner="rmsprop", **sgld_options("fused"))
    bank = SampleBank(net, max_samples=3, seed=7)
    sgld_run(net, opt, bank, range(2), rank)
    dcp.save(
        {"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt), "bank": bank.state_dict()},
        checkpoint_id=checkpoint,
    )
    sgld_run(net, opt, bank, range(2, STEPS), rank)
    out["uninterrupted"] = {"params": params(net), "samples": [full(bank.sample(i)) for i in range(3)]}
    net = shard(model())
    opt = BayesSGLD(net.named_parameters(), preconditioner="rmsprop", **{**sgld_options("fused"), "seed": 99})
    bank = SampleBank(net, max_samples=3, seed=8)
    resume(net, opt, bank, checkpoint)
    sgld_run(net, opt, bank, range(2, STEPS), rank)
    out["resumed"] = {"params": params(net), "samples": [full(bank.sample(i)) for i in range(3)]}

    out["errors"] = errors(rank)
    return out


def message(make: Callable[[], Any]) -> str:
    """The message of the ValueError / RuntimeError ``make()`` raises ("" if it raises none)."""
    try:
        make()
    except (ValueError, RuntimeError) as error:
        return str(error)
    return ""


def resume(net: nn.Module, opt: Any, bank: Any, checkpoint: str) -> None:
    """Load a DCP checkpoint of ``sgld_job`` into (fresh) ``net``, ``opt`` and ``bank``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(state, checkpoint_id=checkpoint)
    net.load_state_dict(state["model"])
    set_optimizer_state_dict(net, opt, state["optim"])
    bank.load_checkpoint(checkpoint)


def errors(rank: int) -> dict[str, str]:
    """The messages of unsupported setups (each must raise; "" if it did not)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DeviceMesh

    from bayeskern.posteriors import BayesSGLD, SampleBank

    found = {}
    half = model()
    fully_shard(half.fc1, mesh=DeviceMesh("cpu", list(range(WORLD))))  # fc2 and scale stay plain
    found["sgld_mixed_plain"] = message(lambda: BayesSGLD(half.named_parameters(), **sgld_options("fused")))
    two = model()
    fully_shard(two.fc1, mesh=DeviceMesh("cpu", list(range(WORLD))))
    fully_shard(two, mesh=DeviceMesh("cpu", list(reversed(range(WORLD)))))
    found["sgld_two_meshes"] = message(lambda: BayesSGLD(two.named_parameters(), **sgld_options("fused")))
    found["bank_two_meshes"] = message(lambda: SampleBank(two, seed=1))

    def bank_before_shard() -> None:
        net = model()
        bank = SampleBank(net, seed=1)
        shard(net)
        bank.update()

    found["bank_before_shard"] = message(bank_before_shard)
    found["bank_rank_zero_only"] = message(lambda: SampleBank(shard(model()), seed=1, rank_zero_only=True))
    return found


# -- Laplace ------------------------------------------------------------------------------------
LAPLACE_BATCHES = 4  # per rank, of 3 examples


def laplace_loader(rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s batches (None: every rank's, the union)."""
    x, y = data()
    ranks = range(WORLD) if rank is None else [rank]
    return [
        (x[i : i + 3], y[i : i + 3])
        for r in ranks
        for i in range(3 * LAPLACE_BATCHES * r, 3 * LAPLACE_BATCHES * (r + 1), 3)
    ]


def laplace_prior() -> dict[str, torch.Tensor]:
    """A prior mean away from the weights (the evidence then peaks at a finite prior precision)."""
    return {n: 0.9 * p.detach() for n, p in model().named_parameters()}


class Shared(nn.Module):
    """A weight used twice: the curvature driver needs the torch.func fallback for it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def laplace_job(rank: int) -> dict[str, Any]:
    """F, evidence, tuned prior precision, samples and predictions of a DiagLaplace fitted on the sharded
    model (created after sharding, and created before it); the errors of unsupported setups."""
    import bayeskern as bk
    from bayeskern.posteriors import DiagLaplace

    out: dict[str, Any] = {}
    for order in ("after", "before"):
        net = model()
        if order == "before":
            la = DiagLaplace(net, seed=3, prior_mean=laplace_prior())
            shard(net)
        else:
            la = DiagLaplace(shard(net), seed=3, prior_mean=laplace_prior())
        la.fit(laplace_loader(rank), progress=False)
        fisher = la.fisher
        out[f"{order}/layout"] = all(
            f.placements == p.placements and f.device_mesh == p.device_mesh
            for (n, p), f in zip(net.named_parameters(), fisher.values())
        )
        out[f"{order}/fisher"] = full(fisher)
        out[f"{order}/grads_untouched"] = all(p.grad is None for p in net.parameters())
        out[f"{order}/num_data"] = la.num_data
        out[f"{order}/log_likelihood"] = la.log_likelihood
        out[f"{order}/evidence"] = la.log_marginal_likelihood(0.5)
        out[f"{order}/samples"] = [full(la.sample(i)) for i in range(3)]
        out[f"{order}/prior_precision"] = la.optimize_prior_precision()
        x, _ = data()
        before = params(net)
        out[f"{order}/predict"] = bk.predict(la, x[:6], num_samples=4).probs
        out[f"{order}/weights_restored"] = all(torch.equal(v, before[n]) for n, v in params(net).items())
        restored = DiagLaplace(net, seed=0, prior_mean=laplace_prior())
        restored.load_state_dict(la.state_dict())
        out[f"{order}/restored"] = (full(restored.sample(1)), bk.predict(restored, x[:6], num_samples=4).probs)

    def fit_then_shard() -> None:
        net = model()
        la = DiagLaplace(net, seed=3).fit(laplace_loader(rank), progress=False)
        shard(net)
        la.sample(0)

    def fallback() -> None:
        torch.manual_seed(0)
        net = Shared()
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import init_device_mesh

        fully_shard(net, mesh=init_device_mesh("cpu", (WORLD,)))
        DiagLaplace(net, seed=3).fit(laplace_loader(rank), progress=False)

    out["errors"] = {
        "fit_then_shard": message(fit_then_shard),
        "fallback": message(fallback),
        "no_reduce": message(lambda: DiagLaplace(shard(model()), seed=3).fit(laplace_loader(rank), reduce=False)),
    }
    return out


# -- IVON ---------------------------------------------------------------------------------------
def ivon_options(backend: str) -> dict[str, Any]:
    return dict(lr=0.05, num_data=NUM_DATA, train_samples=2, hess_init=10.0, seed=1234, **BACKENDS[backend])


def ivon_run(net: nn.Module, opt: Any, rank: int | None, world: int = WORLD) -> None:
    """STEPS IVON steps of two samples each on rank ``rank``'s part of each global batch (None: all)."""
    x, y = data()
    for step in range(STEPS):
        xs, ys = (global_batch(x, step), global_batch(y, step)) if rank is None else (
            local_batch(x, step, rank, world), local_batch(y, step, rank, world)
        )  # fmt: skip
        for _ in range(opt.train_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                F.cross_entropy(net(xs), ys).backward()
        opt.step()


def ivon_job(rank: int) -> dict[str, Any]:
    """Per backend: the parameters and posterior stds after STEPS steps on the sharded model, and the
    bytes of this rank's momentum and h."""
    from bayeskern.posteriors import IVON

    out: dict[str, Any] = {}
    for backend in BACKENDS:
        net = shard(model())
        opt = IVON(net.named_parameters(), **ivon_options(backend))
        ivon_run(net, opt, rank)
        out[f"params/{backend}"] = params(net)
        names = [n for n, _ in net.named_parameters()]
        out[f"std/{backend}"] = full(dict(zip(names, opt.std())))
        states = [opt.state[p] for p in net.parameters()]
        out[f"state_bytes/{backend}"] = sum(
            local_tensor(s[k]).numel() * local_tensor(s[k]).element_size() for s in states for k in ("momentum", "hess")
        )
    return out


# -- the harness --------------------------------------------------------------------------------
def _worker(rank: int, job: Callable[..., Any], init: str, out: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.save(job(rank, *args), f"{out}/{rank}.pt")
        dist.barrier()  # tearing gloo down while the peer is mid-collective aborts it
    finally:
        dist.destroy_process_group()


def spawn(job: Callable[..., Any], tmp_path: Path, *args: Any) -> list[Any]:
    """Run ``job(rank, *args)`` in WORLD gloo processes; its return values, by rank."""
    mp.spawn(_worker, args=(job, f"file://{tmp_path}/rendezvous", str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(WORLD)]


def torchrun_finetune(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``bayeskern.finetune argv`` on WORLD gloo ranks under torchrun, the CLI as users run it on CPU
    (no Triton interpreter, one thread per rank)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "bayeskern.finetune", *argv]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
