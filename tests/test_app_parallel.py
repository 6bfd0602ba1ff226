"""``bayeskern.app.parallel.Parallel``: the one object through which the methods train in one process,
under DDP or under FSDP2.  Modes ``none`` and ``ddp`` train the objects the methods built; ``fsdp``
shards them and hands back unsharded copies holding the trained values."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils.data import TensorDataset

from bayeskern.app.errors import UsageError
from bayeskern.app.parallel import Parallel
from bayeskern.app.shared import Backbone
from bayeskern.distributed import is_sharded


def _backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), classifier=["2.weight", "2.bias"])


def _step(model: nn.Module) -> None:
    """One SGD step on a fixed batch: the trained values differ from the initial ones."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).square().sum().backward()
    optimizer.step()


@pytest.fixture
def group(tmp_path):
    """``make(backend, world)`` initialises this process as rank 0 of a default group."""

    def make(backend: str, world: int = 1) -> None:
        if backend == "fake":
            dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        else:
            dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=world)

    yield make
    if dist.is_initialized():
        dist.destroy_process_group()


def test_one_process_trains_what_the_method_built():
    parallel = Parallel.of(fsdp=False)
    assert parallel.mode == "none" and not parallel.sharded and parallel.world_size == 1
    backbone = _backbone()
    model = backbone.model
    with parallel.sharded_backbone(backbone):
        assert parallel.wrap(model) is model and parallel.shard(model) is model
        _step(model)
    assert backbone.model is model
    assert parallel.unsharded(model, lambda: pytest.fail("nothing to rebuild")) is model
    state = {"model": model}
    assert parallel.checkpointed(state) is state
    data = TensorDataset(torch.arange(5))
    assert parallel.equal_shares(data) is data


def test_fsdp_needs_a_process_group():
    with pytest.raises(UsageError, match="--fsdp needs torchrun"):
        Parallel.of(fsdp=True)
    with pytest.raises(UsageError, match="--fsdp needs torchrun"), Parallel.launched(torch.device("cpu"), True):
        pass


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="Invalid parallel mode"):
        Parallel("horovod")  # type: ignore[arg-type]


def test_launched_joins_no_group_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with Parallel.launched(torch.device("cpu"), False) as parallel:
        assert parallel.mode == "none" and not dist.is_initialized()


def test_ddp_wraps_and_fsdp_keeps_equal_shares(group):
    group("fake", world=2)
    ddp = Parallel.of(fsdp=False)
    assert ddp.mode == "ddp" and ddp.world_size == 2
    model = _backbone().model
    assert isinstance(ddp.wrap(model), DistributedDataParallel)
    data = TensorDataset(torch.arange(5))
    assert ddp.equal_shares(data) is data
    fsdp = Parallel.of(fsdp=True)
    assert fsdp.mode == "fsdp" and fsdp.wrap(model) is model
    assert len(fsdp.equal_shares(data)) == 4  # floor(5 / 2) examples per rank
    assert fsdp.checkpointed({"model": model}) == {}


def test_launched_leaves_a_group_it_did_not_join(group, monkeypatch):
    group("gloo")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with Parallel.launched(torch.device("cpu"), False) as parallel:
        assert parallel.mode == "ddp"
    assert dist.is_initialized()


def test_fsdp_trains_the_sharded_backbone_and_gives_back_an_unsharded_copy(group):
    group("gloo")
    parallel = Parallel.of(fsdp=True)
    backbone = _backbone()
    sharded = backbone.model
    with parallel.sharded_backbone(backbone):
        assert backbone.model is sharded
        assert all(is_sharded(p) for p in sharded.parameters())
        _step(sharded)
    trained = {name: p.full_tensor() for name, p in sharded.named_parameters()}
    assert backbone.model is not sharded
    assert not any(is_sharded(p) for p in backbone.model.parameters())
    for name, p in backbone.model.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0)
    assert not torch.equal(trained["2.bias"], _backbone().model[2].bias)  # it did train

    fresh = parallel.unsharded(sharded, lambda: _backbone().model)
    assert not any(is_sharded(p) for p in fresh.parameters())
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0)
