"""2-process gloo jobs for the FSDP2 tests of VI and MC-dropout (``tests/test_fsdp_vi.py``).

The jobs run in both ranks through ``fsdp_workers.spawn`` (the harness F2's SGLD/Laplace tests use),
check nothing themselves and return what they computed, gathered to full tensors; the tests compare
it with single-process runs of the same posterior on the same global batches.  The model
(``fsdp_workers.Net``) has uneven shards on two ranks (5 rows -> 3 + 2, 3 -> 2 + 1) and an empty one
(``scale``: one row, rank 1 holds none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fsdp_workers as W
import torch
from torch import nn

import bayeskern as bk
from bayeskern.posteriors import VI, MCDropout

STEPS = 3
LR = 0.05
SAMPLE_INDICES = (0, 5)

# name -> (constructor, options); every posterior family and mode, with tensor prior stds once, and
# VI with FSDP2 keeping the blocks gathered from forward to backward, and VI beside a frozen weight
CASES: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "vi": (VI, dict(init_std=0.05, prior_std=0.5)),
    "vi_tempered": (VI, dict(init_std=0.05, temperature=0.5, prior_mean="zero", prior_std={"*": torch.tensor(0.7)})),
    "dropout_scale": (MCDropout, dict(p=0.2)),
    "dropout_prior": (MCDropout, dict(p=0.3, mode="prior", params=["fc1.weight", "fc2.weight"])),
    "vi_kept_gathered": (VI, dict(init_std=0.05, prior_std=0.5)),
    "vi_frozen": (VI, dict(init_std=0.05, params=["fc2.weight"])),
}
FROZEN = {"vi_frozen": ["fc1.weight"]}  # frozen in the model (as a PEFT base weight): read, never trained
FSDP_OPTIONS = {"vi_kept_gathered": dict(reshard_after_forward=False)}  # fully_shard's options per case


def posterior(case: str, model: nn.Module | None = None) -> Any:
    make, options = CASES[case]
    model = W.model() if model is None else model
    for name in FROZEN.get(case, []):
        model.get_parameter(name).requires_grad_(False)
    return make(model, num_data=W.NUM_DATA, seed=7, **options)


def state(post: nn.Module) -> dict[str, torch.Tensor]:
    """The posterior's state_dict with DTensors gathered (a collective)."""
    return {k: v.detach().clone() for k, v in W.full(post.state_dict()).items()}


def train(post: Any, opt: torch.optim.Optimizer, steps: range, rank: int | None) -> list[float]:
    """``steps`` of ``loss.backward(); opt.step()`` on global batches (rank None) or a rank's part of them."""
    x, y = W.data()
    losses = []
    for step in steps:
        if rank is None:
            xb, yb = W.global_batch(x, step), W.global_batch(y, step)
        else:
            xb, yb = W.local_batch(x, step, rank), W.local_batch(y, step, rank)
        opt.zero_grad()
        loss = post.loss(xb, yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def optimizer(post: nn.Module, kind: str) -> torch.optim.Optimizer:
    """SGD is sensitive to the gradients' scale (Adam would hide a factor); Adam has sharded state."""
    if kind == "sgd":
        return torch.optim.SGD(post.parameters(), lr=LR)
    return torch.optim.Adam(post.parameters(), lr=LR)


def vi_job(rank: int, checkpoint: str) -> dict[str, Any]:
    """Per case: the sharded posterior's samples, its trajectory over STEPS SGD steps with the losses
    and the prediction; then a DCP checkpoint of VI + Adam written after 2 steps and one step more."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out: dict[str, Any] = {}
    for case in CASES:
        post = posterior(case)
        bk.distributed.fully_shard(post, **FSDP_OPTIONS.get(case, {}))
        found: dict[str, Any] = {"samples": [W.full(post.sample(i)) for i in SAMPLE_INDICES]}
        found["moments"] = [W.full(post.mean()), W.full(post.std())]  # gathered: copies
        found["local_bytes"] = sum(bk.distributed.local_tensor(p).numel() for p in post.parameters())
        found["losses"] = train(post, optimizer(post, "sgd"), range(STEPS), rank)
        found["state"] = state(post)
        x, _ = W.data()
        found["predict"] = bk.predict(post, x[:6], num_samples=3).probs
        out[case] = found

    out["one_shard"] = one_shard()

    post = posterior("vi")
    bk.distributed.fully_shard(post)
    opt = optimizer(post, "adam")
    train(post, opt, range(2), rank)
    model_sd, optim_sd = get_state_dict(post, opt)
    dcp.save({"posterior": model_sd, "optimizer": optim_sd}, checkpoint_id=checkpoint)
    train(post, opt, range(2, STEPS), rank)
    out["checkpoint_uninterrupted"] = state(post)
    out["checkpoint_resumed"] = resume(checkpoint, rank)
    out["errors"] = errors(rank)
    return out


def one_shard() -> dict[str, Any]:
    """VI sharded over a mesh of one rank (each rank its own: the second dimension of a 2 x 1 mesh),
    trained on the global batches."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (W.WORLD, 1), mesh_dim_names=("replica", "shard"))["shard"]
    post = posterior("vi")
    bk.distributed.fully_shard(post, mesh=mesh)
    found: dict[str, Any] = {"samples": [W.full(post.sample(i)) for i in SAMPLE_INDICES]}
    found["losses"] = train(post, optimizer(post, "sgd"), range(STEPS), None)
    found["state"] = state(post)
    return found


def resume(checkpoint: str, rank: int | None) -> dict[str, torch.Tensor]:
    """A fresh VI + Adam (sharded when ``rank`` is given) loaded from ``checkpoint``, one step more."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    post = posterior("vi")
    if rank is not None:
        bk.distributed.fully_shard(post)
    opt = optimizer(post, "adam")
    model_sd, optim_sd = get_state_dict(post, opt)
    loaded = {"posterior": model_sd, "optimizer": optim_sd}
    dcp.load(loaded, checkpoint_id=checkpoint)
    set_state_dict(post, opt, model_state_dict=loaded["posterior"], optim_state_dict=loaded["optimizer"])
    train(post, opt, range(2, STEPS), rank)
    return state(post)


def errors(rank: int) -> dict[str, str]:
    """The message of each misuse (or "no error")."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    def message(make: Callable[[], Any]) -> str:
        try:
            make()
        except ValueError as e:
            return str(e)
        return "no error"

    def sharded_twice() -> None:
        post = posterior("vi")
        bk.distributed.fully_shard(post)
        bk.distributed.fully_shard(post)

    def model_sharded_behind() -> None:
        post = posterior("vi")
        bk.distributed.shard_model(post.model)
        post.loss(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))

    def unequal_batches() -> None:
        post = posterior("vi")
        bk.distributed.fully_shard(post)
        n = 3 + rank
        post.loss(torch.randn(n, 4), torch.zeros(n, dtype=torch.long))

    def after_sharding() -> None:
        model = W.model()
        bk.distributed.shard_model(model)
        posterior("vi", model)

    found = {
        "after_sharding": message(after_sharding),
        "sharded_twice": message(sharded_twice),
        "model_sharded_behind": message(model_sharded_behind),
        "unequal_batches": message(unequal_batches),
        "train_samples": message(lambda: bk.distributed.fully_shard(VI(W.model(), num_data=8, train_samples=2))),
        "mesh_2d": message(lambda: bk.distributed.fully_shard(posterior("vi"), mesh=init_device_mesh("cpu", (1, 2)))),
    }
    dist.barrier()
    return found
