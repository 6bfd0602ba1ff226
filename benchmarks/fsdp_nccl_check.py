"""FSDP2 over NCCL on 2 GPUs: BayesSGLD + SampleBank and DiagLaplace on a ``fully_shard``-ed model
against one process on the same global data (``device_check.sh`` runs it when 2+ GPUs are present).

    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_nccl_check.py

Every rank builds the unsharded reference itself (no collectives), then the sharded run; rank 0
prints one JSON line of the largest relative errors and exits non-zero when one exceeds the
tolerance (rtol 1e-5, as the CPU tests under gloo).  Without CUDA it runs the same check over gloo on
the CPU (a dry run of the script).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bayeskern as bk
from bayeskern.posteriors import BayesSGLD, DiagLaplace, SampleBank

RTOL = 1e-5
STEPS, BATCH, WIDTH = 4, 16, 64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, 3 * WIDTH + 1)  # rows that do not split evenly
        self.fc2 = nn.Linear(3 * WIDTH + 1, 5)
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(1, 5))  # one row: rank 1 holds none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def model(device: torch.device) -> Net:
    torch.manual_seed(0)
    return Net().to(device)


def rel_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    full = {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in got.items()}
    return max(
        float((full[n].float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-12))
        for n, e in expected.items()
    )


def sgld(net: nn.Module, x: torch.Tensor, y: torch.Tensor, part: slice) -> SampleBank:
    opt = BayesSGLD(net.named_parameters(), lr=1e-2, num_data=1024, seed=1234)
    bank = SampleBank(net, max_samples=STEPS, seed=7)
    for step in range(STEPS):
        xs, ys = x[step * BATCH : (step + 1) * BATCH][part], y[step * BATCH : (step + 1) * BATCH][part]
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        opt.step()
        bank.update()
    return bank


def main() -> int:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # gloo on CPU: the same check, for a dry run
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, WIDTH, generator=g).to(device)
    y = torch.randint(0, 5, (STEPS * BATCH,), generator=g).to(device)
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    errors = {}

    reference = model(device)
    bank = sgld(reference, x, y, slice(None))
    sharded = bk.distributed.fully_shard(model(device))
    sharded_bank = sgld(sharded, x, y, local)
    errors["sgld_params"] = rel_error(dict(sharded.named_parameters()), dict(reference.named_parameters()))
    errors["bank_sample"] = rel_error(sharded_bank.sample(1), bank.sample(1))

    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
    mine = [b for i, b in enumerate(loader) if i % world == rank]
    la = DiagLaplace(model(device), seed=3).fit(loader, progress=False, reduce=False)  # every rank: all data
    sharded_la = DiagLaplace(bk.distributed.fully_shard(model(device)), seed=3).fit(mine, progress=False)
    errors["laplace_fisher"] = rel_error(sharded_la.fisher, la.fisher)
    errors["laplace_sample"] = rel_error(sharded_la.sample(2), la.sample(2))
    probs = bk.predict(la, x[:8], num_samples=4).probs
    errors["laplace_predict"] = rel_error({"p": bk.predict(sharded_la, x[:8], num_samples=4).probs}, {"p": probs})

    ok = all(e <= RTOL for e in errors.values())
    if rank == 0:
        print(json.dumps({"backend": dist.get_backend(), "world": world, "ok": ok, "max_rel_error": errors}))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
