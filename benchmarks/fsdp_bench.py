"""VI sharded with FSDP2 on 2 CPU (gloo) processes: per-rank state memory and step time against DDP.

    python benchmarks/fsdp_bench.py [--out benchmarks/results/cpu-fsdp.json] [--dim 256] [--blocks 8]

Memory: the bytes each rank holds of the posterior's parameters (mu, rho) and of Adam's state after
one step, against the same posterior unsharded in one process; the goal is at most 1.1 x (the
unsharded bytes / world + one block's share).  Time: a training step (``loss.backward()`` and
``Adam.step()``) of the posterior sharded with ``bayeskern.distributed.fully_shard`` against the
same posterior under ``DistributedDataParallel``, same per-rank batch, and the same pair for the
deterministic network (FSDP2's own cost on this machine), timed interleaved (rounds alternate) in the
same processes.  Writes a pytest-benchmark-shaped JSON that ``benchmarks/report.py`` renders
(groups ``fsdp step ...``; the memory figures are under ``fsdp_memory``).

Peak memory of a step: the bytes live at the peak of one training step (``zero_grad``, loss,
``backward``, ``Adam.step``, after warm-up steps), per rank, for each run above and for the
posterior unsharded in one process: the persistent state (posterior and model tensors, Adam's state:
local shards) plus the peak of what the step allocates, seen by ``memory.AllocationTracker``.  That
tracker alone cannot follow a sharded step: it reads the storage of every op's inputs, which a
DTensor (a wrapper without storage) refuses, and FSDP2 frees and re-allocates its unsharded
parameter buffers by resizing their storage (``storage.resize_``), which no dispatch mode sees.
``ShardTracker`` extends it with both: DTensor inputs and outputs count by their local shard's
storage, and FSDP2's storage resizes (``alloc_storage`` / ``free_storage``) are added to the live
bytes.  Not seen: allocations inside a DTensor op other than its output, and C++-internal buffers
(DDP's gradient buckets, gloo's).  Recorded as ``peak_bytes`` of every step entry and under
``fsdp_memory["step_peak"]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from memory import AllocationTracker  # beside this script
from torch import nn
from torch.utils._pytree import tree_leaves

WORLD = 2


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Net(nn.Module):
    """``blocks`` residual MLP blocks (an ``nn.ModuleList``: FSDP2 wraps each) and a linear head."""

    def __init__(self, dim: int, blocks: int, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(blocks))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _posterior(args: argparse.Namespace) -> Any:
    import bayeskern as bk

    torch.manual_seed(0)
    return bk.VI(Net(args.dim, args.blocks), num_data=10_000, seed=0)


def _batch(args: argparse.Namespace, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(args.batch, args.dim, generator=g), torch.randint(0, 10, (args.batch,), generator=g)


def _state_bytes(post: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes this process holds of the posterior's parameters and the optimizer's tensor state."""
    from bayeskern.distributed import local_tensor

    def nbytes(t: torch.Tensor) -> int:
        local = local_tensor(t)
        return local.numel() * local.element_size()

    params = sum(nbytes(p) for p in post.parameters())
    state = sum(nbytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim())
    return params + state


class ShardTracker(AllocationTracker):
    """``AllocationTracker`` that also follows a sharded step (module docstring): DTensors count by
    their local shard's storage, and ``fsdp_storage()`` adds FSDP2's storage resizes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from bayeskern.distributed import local_tensor

        out = func(*args, **(kwargs or {}))
        leaves = [local_tensor(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in leaves if t.device.type != "meta"}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(local_tensor(leaf), inputs)
        return out

    def _resized(self, change: int) -> None:
        self.live += change
        self.peak = max(self.peak, self.live)

    @contextlib.contextmanager
    def fsdp_storage(self) -> Iterator[None]:
        """Count FSDP2's ``alloc_storage`` / ``free_storage`` (storage resizes of its unsharded
        parameter buffers) while the context is open."""
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

        def counted(resize: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
            def call(tensor: torch.Tensor) -> None:
                before = tensor.untyped_storage().nbytes()
                resize(tensor)
                self._resized(tensor.untyped_storage().nbytes() - before)

            return call

        alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage
        _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = counted(alloc)
        _fsdp_param.free_storage = counted(free)
        try:
            yield
        finally:
            _fsdp_param.alloc_storage = _fsdp_param_group.alloc_storage = alloc
            _fsdp_param.free_storage = free


def _persistent_bytes(module: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the storages (local shards) of ``module``'s parameters and buffers and of the
    optimizer's tensor state, each storage once."""
    from bayeskern.distributed import local_tensor

    tensors = [*module.parameters(), *module.buffers()]
    tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    storages = {}
    for t in tensors:
        storage = local_tensor(t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _step_peak(module: nn.Module, call: Any, opt: torch.optim.Optimizer, batch: Any) -> dict[str, int]:
    """Persistent bytes plus the peak of what one more step allocates (``ShardTracker``): over the
    forward (``"forward"``: the draw, the gathered blocks, the activations), forward and backward
    (``"backward"``), and the whole step with ``opt.step()`` (``"step"``)."""
    import gc

    gc.collect()
    persistent = _persistent_bytes(module, opt)
    with ShardTracker() as tracker, tracker.fsdp_storage():
        opt.zero_grad()
        loss = call(*batch)
        forward = tracker.peak
        loss.backward()
        backward = tracker.peak
        opt.step()
    peaks = {"forward": forward, "backward": backward, "step": tracker.peak}
    return {"persistent": persistent, **{part: persistent + peak for part, peak in peaks.items()}}


def _plain_loss(model: nn.Module) -> Any:
    return lambda x, y: torch.nn.functional.cross_entropy(model(x), y)


def _step(call: Any, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    opt.zero_grad()
    call(*batch).backward()
    opt.step()


def _rank_job(rank: int, args: argparse.Namespace, init: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        import bayeskern as bk

        sharded = _posterior(args)
        bk.distributed.fully_shard(sharded)
        sharded_opt = torch.optim.Adam(sharded.parameters(), lr=1e-3)
        replicated = _posterior(args)
        ddp = DDP(replicated)
        ddp_opt = torch.optim.Adam(replicated.parameters(), lr=1e-3)
        torch.manual_seed(0)
        plain_sharded = bk.distributed.fully_shard(Net(args.dim, args.blocks))
        plain_ddp = DDP(Net(args.dim, args.blocks))
        batch = _batch(args, rank)
        runs = {
            "ddp": (ddp, ddp_opt),
            "fsdp2": (sharded.loss, sharded_opt),
            "ddp, deterministic": (_plain_loss(plain_ddp), torch.optim.Adam(plain_ddp.parameters(), lr=1e-3)),
            "fsdp2, deterministic": (
                _plain_loss(plain_sharded),
                torch.optim.Adam(plain_sharded.parameters(), lr=1e-3),
            ),
        }
        modules = {"ddp": ddp, "fsdp2": sharded, "ddp, deterministic": plain_ddp, "fsdp2, deterministic": plain_sharded}
        for _ in range(args.warmup):
            for call, opt in runs.values():
                _step(call, opt, batch)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (call, opt) in runs.items():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.steps):
                    _step(call, opt, batch)
                times[name].append((time.perf_counter() - start) / args.steps)
        peaks = {name: _step_peak(modules[name], call, opt, batch) for name, (call, opt) in runs.items()}
        found = {"times": times, "peaks": peaks, "sharded_bytes": _state_bytes(sharded, sharded_opt)}
        torch.save(found, f"{out}/{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _entry(group: str, impl: str, data: list[float], baseline: bool, **info: Any) -> dict[str, Any]:
    stats = {
        "min": min(data),
        "max": max(data),
        "mean": statistics.fmean(data),
        "median": statistics.median(data),
        "stddev": statistics.stdev(data) if len(data) > 1 else 0.0,
        "rounds": len(data),
        "data": data,
    }
    extra = {"group": group, "impl": impl, "baseline": baseline, **info}
    return {"group": group, "name": f"{group}[{impl}]", "extra_info": extra, "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu-fsdp.json")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="examples per rank")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    args = parser.parse_args()

    torch.set_num_threads(1)
    post = _posterior(args)
    opt = torch.optim.Adam(post.parameters(), lr=1e-3)
    _step(post.loss, opt, _batch(args, 0))
    unsharded = _state_bytes(post, opt)
    block = _state_bytes(post, opt) * sum(p.numel() for p in post.model.blocks[0].parameters())
    block //= sum(p.numel() for p in post.model.parameters())
    goal = unsharded / WORLD + block
    unsharded_peak = _step_peak(post, post.loss, opt, _batch(args, 0))
    block_weights = sum(p.numel() * p.element_size() for p in Net(args.dim, 1).blocks[0].parameters())

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_job, args=(args, f"file://{tmp}/rendezvous", tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(f"{tmp}/{r}.pt") for r in range(WORLD)]

    size = {"dim": args.dim, "blocks": args.blocks, "batch_per_rank": args.batch, "world": WORLD}
    benchmarks = []
    for rank, found in enumerate(ranks):
        for kind in ("", ", deterministic"):
            group, ddp, fsdp = (
                f"fsdp step{kind} rank {rank}",
                found["times"][f"ddp{kind}"],
                found["times"][f"fsdp2{kind}"],
            )
            ratio = statistics.fmean(f / d for f, d in zip(fsdp, ddp))
            peaks = {impl: found["peaks"][f"{impl}{kind}"]["step"] for impl in ("ddp", "fsdp2")}
            benchmarks.append(_entry(group, "ddp", ddp, True, peak_bytes=peaks["ddp"], **size))
            benchmarks.append(
                _entry(group, "fsdp2", fsdp, False, interleaved_ratio=ratio, peak_bytes=peaks["fsdp2"], **size)
            )
    sharded_peaks = [found["peaks"]["fsdp2"] for found in ranks]
    step_peak: dict[str, Any] = {"block_weights_bytes": block_weights}
    for part in ("step", "backward", "forward"):
        step_peak[f"{part}_unsharded_bytes"] = unsharded_peak[part]
        step_peak[f"{part}_per_rank_bytes"] = [peak[part] for peak in sharded_peaks]
        step_peak[f"{part}_per_rank_over_unsharded"] = [peak[part] / unsharded_peak[part] for peak in sharded_peaks]
        step_peak[f"{part}_per_rank_above_persistent_over_block"] = [
            (peak[part] - peak["persistent"]) / block_weights for peak in sharded_peaks
        ]
    memory = {
        "unsharded_bytes": unsharded,
        "block_bytes": block,
        "goal_bytes": goal,
        "per_rank_bytes": [found["sharded_bytes"] for found in ranks],
        "per_rank_over_goal": [found["sharded_bytes"] / goal for found in ranks],
        "per_rank_over_unsharded": [found["sharded_bytes"] / unsharded for found in ranks],
        "step_peak": step_peak,
    }
    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": 1,
        "torch": torch.__version__,
        "python_version": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    result = {
        "machine_info": machine,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "benchmarks": benchmarks,
        "fsdp_memory": memory,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"memory": memory, "ratios": [b["extra_info"].get("interleaved_ratio") for b in benchmarks]}))


if __name__ == "__main__":
    main()
