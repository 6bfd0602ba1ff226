"""BayesSGLD steps and DiagLaplace fits under FSDP2 (``fully_shard``) against DDP, 2 gloo processes on CPU.

    python benchmarks/fsdp_sgld_laplace.py [OUT.json]      (default: benchmarks/results/cpu-fsdp-sgld-laplace.json)

An MLP of ``LAYERS`` blocks of width ``WIDTH``, each block one FSDP2 unit (then the root); per round
(interleaved, ``ROUNDS`` of them after one untimed warm-up round) ``STEPS`` pSGLD steps on each of the
DDP and the FSDP2 copy, and one DiagLaplace fit over ``FIT_BATCHES`` batches on each.  Reported, in the
pytest-benchmark layout ``report.py`` renders: the wall time per training step (forward, backward,
``opt.step()``), per ``opt.step()`` alone and per fit, each round, with the interleaved ratios, and
the per-rank bytes of BayesSGLD's state (prior mean + square average) and of the Laplace Fisher.
Timings on a shared machine are noisy: read the ratio.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD, LAYERS, WIDTH, BATCH = 2, 4, 512, 64
ROUNDS, STEPS, FIT_BATCHES = 7, 5, 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS)]
    return nn.Sequential(*blocks, nn.Linear(WIDTH, 10))


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    local = [
        getattr(t, "_local_tensor", t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    ]
    return sum(t.numel() * t.element_size() for t in local)


def _job(rank: int, init: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bayeskern.posteriors import BayesSGLD, DiagLaplace

    mesh = init_device_mesh("cpu", (WORLD,))
    ddp_model = _model()
    ddp = DDP(ddp_model)
    sharded = _model()
    for block in list(sharded)[:-1]:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    options = dict(lr=1e-3, num_data=10_000, seed=1, preconditioner="rmsprop")
    opts = {
        "ddp": BayesSGLD(ddp.named_parameters(), **options),
        "fsdp": BayesSGLD(sharded.named_parameters(), **options),
    }
    nets = {"ddp": ddp, "fsdp": sharded}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    loader = [(x, y)] * FIT_BATCHES
    fit_models = {"ddp": ddp_model, "fsdp": sharded}
    steps: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    updates: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    fits: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    fisher_bytes = {}
    for round in range(ROUNDS + 1):  # round 0 warms up, untimed
        for kind in ("ddp", "fsdp"):
            total = update = 0.0
            for _ in range(STEPS):
                dist.barrier()
                start = time.perf_counter()
                opts[kind].zero_grad()
                F.cross_entropy(nets[kind](x), y).backward()
                middle = time.perf_counter()
                opts[kind].step()
                dist.barrier()
                total, update = total + time.perf_counter() - start, update + time.perf_counter() - middle
            if round:
                steps[kind].append(total / STEPS)
                updates[kind].append(update / STEPS)
        for kind in ("ddp", "fsdp"):
            dist.barrier()
            start = time.perf_counter()
            la = DiagLaplace(fit_models[kind], seed=1).fit(loader, progress=False)
            dist.barrier()
            if round:
                fits[kind].append(time.perf_counter() - start)
            fisher_bytes[kind] = sum(getattr(f, "_local_tensor", f).numel() * 4 for f in la.fisher.values())
    result = {
        "sgld_train_step": steps,
        "sgld_optimizer_step": updates,
        "laplace_fit": fits,
        "sgld_state_bytes": {k: _state_bytes(o) for k, o in opts.items()},
        "fisher_bytes": fisher_bytes,
    }
    torch.save(result, f"{out}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main(path: str) -> None:
    from fsdp_bench import _entry  # the pytest-benchmark entry layout report.py reads (a sibling script)

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_job, args=(f"file://{tmp}/rendezvous", tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(f"{tmp}/{r}.pt") for r in range(WORLD)]
    size = {"width": WIDTH, "layers": LAYERS, "batch_per_rank": BATCH, "world": WORLD}
    benchmarks = []
    for rank, found in enumerate(ranks):
        for what in ("sgld_train_step", "sgld_optimizer_step", "laplace_fit"):
            group, ddp, fsdp = f"fsdp {what.replace('_', ' ')} rank {rank}", found[what]["ddp"], found[what]["fsdp"]
            ratio = statistics.fmean(f / d for f, d in zip(fsdp, ddp))
            benchmarks.append(_entry(group, "ddp", ddp, True, **size))
            benchmarks.append(_entry(group, "fsdp2", fsdp, False, interleaved_ratio=ratio, **size))
    state = {
        "what": "per-rank bytes of BayesSGLD's state (pSGLD: prior mean + square average) and of DiagLaplace's F",
        "parameters": sum(p.numel() for p in _model().parameters()),
        **{
            f"{key}_rank{rank}": found[key]
            for rank, found in enumerate(ranks)
            for key in ("sgld_state_bytes", "fisher_bytes")
        },
    }
    result = {
        "machine_info": {
            "processor": platform.processor() or platform.machine(),
            "threads": 1,
            "torch": torch.__version__,
            "python_version": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "benchmarks": benchmarks,
        "fsdp_sgld_laplace_state": state,
    }
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {b["name"]: b["extra_info"].get("interleaved_ratio") for b in benchmarks if not b["extra_info"]["baseline"]}
        )
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent / "results" / "cpu-fsdp-sgld-laplace.json"))
