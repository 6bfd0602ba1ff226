"""``bayeskern.distributed.sharding``: where a rank's DTensor shard lives in the flattened global tensor.

Layouts of any rank are built in one process with torch's fake process group (collectives are
no-ops), and checked against the oracle: the local shard equals the global tensor's flattened
elements ``[start, start + numel)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

import bayeskern as bk
from bayeskern.distributed.fsdp import default_blocks
from bayeskern.distributed.sharding import (
    common_mesh,
    element_offset,
    global_sum,
    is_sharded,
    local_range,
    local_tensor,
    shard_copy,
)


@pytest.fixture
def fake_group():
    """``make(rank, world)`` initialises a fake default group and returns a 1-D CPU mesh."""

    def make(rank: int, world: int):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        return init_device_mesh("cpu", (world,))

    yield make
    if dist.is_initialized():
        dist.destroy_process_group()


def _dtensor(global_tensor, mesh, placements, local):
    return DTensor.from_local(
        local, mesh, placements, shape=global_tensor.shape, stride=global_tensor.stride(), run_check=False
    )


def test_plain_tensor_is_its_own_shard():
    t = torch.randn(3, 4)
    assert local_tensor(t) is t
    assert element_offset(t) == 0
    assert local_range(t) == (0, 12)
    assert not is_sharded(t)


@pytest.mark.parametrize("shape", [(5, 3), (7,), (2, 3, 4), (1, 6)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard0_offsets_match_the_flattened_global_tensor(fake_group, shape, world):
    """FSDP2's layout: torch.chunk on dim 0 (chunk ceil(rows / world); the last ranks may get fewer or none)."""
    g = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    covered = []
    for rank in range(world):
        mesh = fake_group(rank, world)
        chunks = torch.chunk(g, world, dim=0)
        local = chunks[rank] if rank < len(chunks) else g[:0]
        d = _dtensor(g, mesh, [Shard(0)], local)
        assert is_sharded(d)
        assert torch.equal(local_tensor(d), local)
        start, numel = local_range(d)
        assert element_offset(d) == start
        assert numel == local.numel()
        assert torch.equal(g.reshape(-1)[start : start + numel], local.reshape(-1))
        covered.extend(range(start, start + numel))
    assert covered == list(range(g.numel()))  # the shards tile the tensor in rank order


def test_zero_row_shard_starts_at_the_end(fake_group):
    g = torch.zeros(3, 2)
    mesh = fake_group(3, 4)  # chunks of 1 row: ranks 0-2 hold one each, rank 3 none
    assert local_range(_dtensor(g, mesh, [Shard(0)], g[:0])) == (6, 0)


def test_replicate_is_the_whole_tensor(fake_group):
    g = torch.randn(4, 3)
    mesh = fake_group(1, 2)
    assert local_range(_dtensor(g, mesh, [Replicate()], g)) == (0, 12)


def test_non_contiguous_layouts_raise(fake_group):
    g = torch.arange(12.0).reshape(3, 4)
    mesh = fake_group(1, 2)
    with pytest.raises(ValueError, match="not a contiguous range"):
        element_offset(_dtensor(g, mesh, [Shard(1)], g[:, 2:]))
    with pytest.raises(ValueError, match="Partial"):
        element_offset(_dtensor(g, mesh, [Partial()], g))


def test_shard1_of_single_row_is_contiguous(fake_group):
    g = torch.arange(6.0).reshape(1, 6)
    mesh = fake_group(1, 2)
    assert local_range(_dtensor(g, mesh, [Shard(1)], g[:, 3:])) == (3, 3)


# cuts at every residue mod 4 (Philox yields 4 words per counter), across SIMD steps and blocks
CUTS = [(0, 1), (1, 2), (3, 70), (65, 130), (1001, 3999), (2500, 5000), (4999, 5000), (13, 4096), (7, 7)]


def test_every_backend_draws_a_shard_like_the_whole(backend):
    """The noise of elements [a, b) drawn as a shard at offset ``o + a`` is the slice of the whole
    tensor's draw at offset ``o``, for any ``a`` (not only multiples of 4): the property that makes
    sharded draws equal single-process draws.  Bitwise on the fused kernels (C++, Triton); the
    reference backend's torch CPU ops round a tensor's vectorised body and scalar tail differently
    (1 ulp).  Gradients agree to rounding: the C++ CPU backward reads eps from the drawn weights in
    SIMD steps counted from the shard's start (``ops.draw``'s docstring)."""
    import bayeskern.ops as ops
    from bayeskern.ops import noise

    g = torch.Generator().manual_seed(0)
    mu, m0, grad = (torch.randn(5000, generator=g) for _ in range(3))
    rho = torch.randn(5000, generator=g) - 4
    o, seed, stream = 6, 7, 2

    def draws(a, b):
        mu_, rho_ = mu[a:b].clone().requires_grad_(), rho[a:b].clone().requires_grad_()
        (w,), _ = ops.gaussian_sample_kl([mu_], [rho_], [m0[a:b]], [1.0], seed, [o + a], stream=stream)
        (d,), _ = ops.weight_dropout_l2([mu_], 0.3, [m0[a:b]], [1.0], seed, [o + a], fill_prior=True, stream=stream)
        grads = torch.autograd.grad((w * grad[a:b]).sum() + (d * grad[a:b]).sum(), [mu_, rho_])
        values = [
            w.detach(),
            d.detach(),
            ops.gaussian_sample(mu[a:b], rho[a:b], seed, o + a, stream=stream),
            ops.weight_dropout(mu[a:b], 0.3, seed, o + a, stream=stream),
            noise.normal((b - a,), seed, o + a, stream=stream),
        ]
        return values, list(grads)

    with ops.use_backend(backend):
        whole_values, whole_grads = draws(0, 5000)
        for a, b in CUTS:
            values, grads = draws(a, b)
            for got, expected in zip(values, whole_values):
                if backend == "reference":
                    torch.testing.assert_close(got, expected[a:b], rtol=1.2e-7, atol=0)
                else:
                    assert torch.equal(got, expected[a:b]), (a, b)
            for got, expected in zip(grads, whole_grads):
                torch.testing.assert_close(got, expected[a:b], rtol=1e-5, atol=1e-6)


def test_common_mesh_rejects_mixed_and_2d_meshes(fake_group):
    from torch.distributed.device_mesh import DeviceMesh

    g = torch.zeros(4, 2)
    mesh = fake_group(0, 4)
    other = DeviceMesh("cpu", [0, 1])  # a sub-mesh over ranks 0 and 1
    a, b = _dtensor(g, mesh, [Shard(0)], g[:1]), _dtensor(g, other, [Shard(0)], g[:2])
    assert common_mesh([a, torch.zeros(3), a]) is mesh
    assert common_mesh([torch.zeros(3)]) is None
    with pytest.raises(ValueError, match="2 different device meshes"):
        common_mesh([a, b])
    square = init_device_mesh("cpu", (2, 2))
    with pytest.raises(ValueError, match="2-D device mesh"):
        common_mesh([_dtensor(g, square, [Shard(0), Replicate()], g[:2])])


def test_default_blocks_are_module_list_entries_else_children_with_parameters():
    from torch import nn

    layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    net = nn.Module()
    net.embed, net.layers, net.act = nn.Linear(2, 2), layers, nn.ReLU()
    assert default_blocks(net) == list(layers)
    mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert default_blocks(mlp) == [mlp[0], mlp[2]]


def test_global_sum_without_a_mesh_is_the_local_term():
    x = torch.tensor(3.0, requires_grad=True)
    total = global_sum(x * 2, None)
    total.backward()
    assert float(total.detach()) == 6.0 and float(x.grad) == 2.0


def test_shard_copy_keeps_this_ranks_rows_in_its_own_storage(fake_group):
    g = torch.arange(15.0).reshape(5, 3)
    mesh = fake_group(1, 2)  # rows 3-4 of 5
    like = _dtensor(g, mesh, [Shard(0)], torch.zeros(2, 3))
    copy = shard_copy(g, like)
    assert torch.equal(local_tensor(copy), g[3:])
    assert local_tensor(copy).untyped_storage().data_ptr() != g.untyped_storage().data_ptr()
    assert copy.placements == like.placements and copy.shape == g.shape
    plain = shard_copy(g, torch.zeros(5, 3))
    assert torch.equal(plain, g) and plain.data_ptr() != g.data_ptr()


def test_fully_shard_asks_an_object_that_shards_itself():
    """``fully_shard`` dispatches on the ``ShardsItself`` protocol, not on a posterior class: any object
    with ``shard`` gets the call with the mesh, blocks and FSDP2 options (no process group needed)."""
    from bayeskern.distributed import ShardsItself, fully_shard

    class Custom(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[dict] = []

        def shard(self, *, mesh=None, blocks=None, **fsdp_options) -> None:
            self.calls.append({"mesh": mesh, "blocks": blocks, **fsdp_options})

    custom = Custom()
    assert isinstance(custom, ShardsItself)
    assert fully_shard(custom, mesh="m", reshard_after_forward=False) is custom
    assert custom.calls == [{"mesh": "m", "blocks": None, "reshard_after_forward": False}]
    assert isinstance(bk.VI(torch.nn.Linear(2, 2), num_data=4, seed=0), ShardsItself)
    assert not isinstance(torch.nn.Linear(2, 2), ShardsItself)
