"""sq_grad_accumulate and the per-example curvature driver against torch.func per-example gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from bayeskern.curvature import squared_gradients
from bayeskern.ops import use_backend
from bayeskern.ops.fisher import sq_grad_accumulate


def sum_ce(output, target):
    return F.cross_entropy(output, target, reduction="sum")


def oracle_fisher(model, x, y, loss_fn=sum_ce):
    """sum_n (d loss(x_n, y_n) / d theta)^2 from torch.func, in float64."""
    model = model.double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = x.double() if x.dtype.is_floating_point else x

    def loss(p, xb, yb):
        return loss_fn(functional_call(model, {**p, **buffers}, (xb[None],)), yb[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    model.float()
    return {n: g.square().sum(0).float() for n, g in grads.items()}


def assert_fisher_close(got, expected, rtol=1e-4):
    assert got.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=rtol * scale, msg=name)


def per_example_tiles(g, a):
    return sum((g[b].double().T @ a[b].double()).square() for b in range(g.shape[0])).cpu()


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("positions", [1, 5, 12])  # rank-one GEMM, position pairs, per-example tiles
def test_sq_grad_accumulate_equals_squared_per_example_tiles(backend, device, positions):
    torch.manual_seed(0)
    g, a = torch.randn(5, positions, 19, device=device), torch.randn(5, positions, 21, device=device)
    fisher = torch.ones(19, 21, device=device)
    with use_backend(backend):
        sq_grad_accumulate(fisher, g, a)
    torch.testing.assert_close(fisher.double().cpu(), 1 + per_example_tiles(g, a), rtol=1e-5, atol=1e-5)


def test_sq_grad_accumulate_reads_strided_inputs(backend, device):
    torch.manual_seed(1)
    g = torch.randn(3, 20, 6, device=device).transpose(1, 2)  # (B, T=6, out=20), position stride 1
    a = torch.randn(3, 17, 6, device=device).transpose(1, 2)
    fisher = torch.zeros(20, 17, device=device)
    with use_backend(backend):
        sq_grad_accumulate(fisher, g, a)
    torch.testing.assert_close(fisher.double().cpu(), per_example_tiles(g, a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", [1, 5])
def test_sq_grad_accumulate_bf16_inputs_accumulate_in_fp32(backend, device, positions):
    torch.manual_seed(2)
    g = torch.randn(64, positions, 16, device=device).bfloat16()
    a = torch.randn(64, positions, 16, device=device).bfloat16()
    fisher = torch.zeros(16, 16, device=device)
    with use_backend(backend):
        sq_grad_accumulate(fisher, g, a)
    assert fisher.dtype == torch.float32
    # exact products of bf16 values summed in fp32: a bf16 accumulator would be off by ~1e-2
    torch.testing.assert_close(fisher.double().cpu(), per_example_tiles(g, a), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "positions, chunk, loop_min_tile",
    [(3, 2 * 6 * 9, 2**30), (12, 2 * 4 * 5, 2**30), (12, 2**22, 1)],
    ids=["pairs-chunked", "tiles-chunked", "tiles-loop"],
)
def test_sq_grad_accumulate_reference_paths(monkeypatch, positions, chunk, loop_min_tile):
    from bayeskern.ops import fisher as fisher_op

    torch.manual_seed(3)
    g, a = torch.randn(7, positions, 4), torch.randn(7, positions, 5)
    monkeypatch.setattr(fisher_op, "CHUNK_ELEMENTS", chunk)  # two examples per chunk where chunked
    monkeypatch.setattr(fisher_op, "LOOP_MIN_TILE", loop_min_tile)
    fisher = fisher_op.reference_sq_grad_accumulate(torch.zeros(4, 5), g, a)
    torch.testing.assert_close(fisher.double(), per_example_tiles(g, a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fisher, g, a, match",
    [
        (torch.zeros(3, 4, dtype=torch.float16), torch.zeros(2, 3), torch.zeros(2, 4), "fisher must be a float32"),
        (torch.zeros(4, 3).t(), torch.zeros(2, 3), torch.zeros(2, 4), "contiguous"),
        (torch.zeros(3, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), "g must be a floating"),
        (torch.zeros(3, 4), torch.zeros(2, 3), torch.zeros(3, 4), "agree in batch"),
        (torch.zeros(3, 4), torch.zeros(2, 5, 3), torch.zeros(2, 6, 4), "agree in batch"),
        (torch.zeros(4, 4), torch.zeros(2, 3), torch.zeros(2, 4), r"expected \(3, 4\)"),
    ],
)
def test_sq_grad_accumulate_rejects_bad_arguments(fisher, g, a, match):
    with pytest.raises(ValueError, match=match):
        sq_grad_accumulate(fisher, g, a)


# ---------------------------------------------------------------- models


def mlp():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))


def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, groups=2, padding="valid"),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding="same", dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(54, 3),
    )
    with torch.no_grad():  # BatchNorm with non-trivial running statistics and affine parameters
        bn = model[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return model


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, multi-head attention (fused qkv), LayerNorm, MLP, each
    branch scaled by a LayerScale vector (one out of place, one in place)."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gamma1, self.gamma2 = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = (q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5).softmax(-1) @ v
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d)) * self.gamma1
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)))).mul_(self.gamma2)


class TinyViT(nn.Module):
    def __init__(self, dim=8, patch=4, classes=3, extra=None):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim))
        self.block = Block(dim)
        self.extra = extra
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.block(x)
        if self.extra is not None:
            x = x + self.extra(x, x, x, need_weights=False)[0]
        return self.head(self.norm(x)[:, 0])


def vit(extra=None):
    torch.manual_seed(0)
    model = TinyViT(extra=extra)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_()
    return model


def image_batches(n=6, classes=3, size=8, batch=4):
    torch.manual_seed(1)
    x, y = torch.randn(n, 3, size, size), torch.randint(0, classes, (n,))
    return x, y, [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def fit(model, batches, backend, device):
    """squared_gradients of a copy of ``model`` on ``device``, the Fisher brought back to the CPU."""
    model = copy.deepcopy(model).to(device)
    with use_backend(backend):
        result = squared_gradients(model, [(x.to(device), y.to(device)) for x, y in batches], sum_ce)
    result.fisher = {name: f.cpu() for name, f in result.fisher.items()}
    return result


def test_fisher_equals_per_example_grads_mlp(backend, device):
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(11, 6), torch.randint(0, 4, (11,))
    result = fit(model, [(x[:6], y[:6]), (x[6:], y[6:])], backend, device)
    assert result.plan.fallback == [] and result.num_examples == 11
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))
    torch.testing.assert_close(torch.tensor(result.loss), sum_ce(model(x), y), rtol=1e-5, atol=1e-5)


def test_fisher_equals_per_example_grads_cnn(backend, device):
    model = cnn().eval()
    x, y, batches = image_batches()
    result = fit(model, batches, backend, device)
    assert result.plan.fallback == []
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))


def test_fisher_equals_per_example_grads_vit_block(backend, device):
    model = vit()
    x, y, batches = image_batches()
    result = fit(model, batches, backend, device)
    assert result.plan.broadcast == {"cls_token": 3, "pos_embed": 3, "block.gamma1": 3, "block.gamma2": 3}
    assert result.plan.fallback == []
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))


def test_fisher_equals_per_example_grads_rms_and_group_norm(backend, device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(2), nn.RMSNorm(36), nn.Flatten(), nn.Linear(144, 3)
    )
    with torch.no_grad():
        for layer in (model[1], model[3]):
            for p in layer.parameters():
                p.normal_()
    x, y, batches = image_batches(size=8)
    result = fit(model, batches, backend, device)
    assert result.plan.fallback == []
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))


def test_fisher_equals_per_example_grads_convnext_style_layer_scale(backend, device):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
            self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.gamma1, self.gamma2 = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            x = self.conv(x).mul(self.gamma1.reshape(1, -1, 1, 1))
            x = x + self.depthwise(x) * self.gamma2[None, :, None, None]
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Scaled()
    x, y, batches = image_batches()
    result = fit(model, batches, backend, device)
    assert result.plan.viewed == ["gamma1", "gamma2"] and result.plan.fallback == []
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))


def test_fisher_embedding_rows_sum_repeated_tokens_before_squaring():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4, padding_idx=0)
            self.out = nn.Linear(4, 3)

        def forward(self, index):
            return self.out(self.embed(index).mean(1))

    torch.manual_seed(0)
    model = Bag()
    index, y = torch.tensor([[1, 1, 2, 0], [3, 0, 3, 3], [4, 2, 1, 1]]), torch.tensor([0, 2, 1])
    result = squared_gradients(model, [(index, y)], sum_ce)
    assert result.plan.rule == ["embed.weight", "out.weight", "out.bias"]
    assert_fisher_close(result.fisher, oracle_fisher(model, index, y))


def test_fisher_falls_back_to_torch_func_for_other_modules():
    model = vit(extra=nn.MultiheadAttention(8, 2, batch_first=True))
    x, y, batches = image_batches()
    result = squared_gradients(model, batches, sum_ce)
    assert sorted(result.plan.fallback) == sorted(n for n, _ in model.named_parameters() if n.startswith("extra."))
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))


def test_fisher_falls_back_for_weights_used_twice():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 5)

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    torch.manual_seed(0)
    model = Tied()
    x, y = torch.randn(7, 5), torch.randint(0, 5, (7,))
    result = squared_gradients(model, [(x, y)], sum_ce)
    assert result.plan.fallback == ["layer.weight", "layer.bias"]
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))


def test_fisher_falls_back_when_a_leading_one_parameter_is_not_batch_broadcast():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Parameter(torch.randn(1, 3))  # reduced over, so expanding it changes the result
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            return self.layer(x) * self.gate.sum()

    torch.manual_seed(0)
    model = Gate()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    result = squared_gradients(model, [(x, y)], sum_ce, names=["gate"])
    assert result.plan.fallback == ["gate"]
    assert_fisher_close(result.fisher, {"gate": oracle_fisher(model, x, y)["gate"]})


def test_fisher_sends_parameters_used_out_of_sight_to_the_fallback_and_zeroes_unused_ones():
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.tensor([1.5, 0.5]))
            self.dead = nn.Parameter(torch.ones(3))

        def forward(self, x):  # an aten op call bypasses torch-function modes
            return torch.ops.aten.mul.Tensor(self.layer(x), self.scale)

    torch.manual_seed(0)
    model = Hidden()
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    result = squared_gradients(model, [(x, y)], sum_ce)
    assert result.plan.fallback == ["scale"] and result.plan.unused == ["dead"]
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))


def test_fisher_is_not_fooled_by_a_sequence_first_layer_whose_length_equals_the_batch():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):  # (B, T, 3) -> (T, B, 3): the first axis of the inner input is not the batch
            return self.head(torch.tanh(self.inner(x.transpose(0, 1))).mean(0))

    torch.manual_seed(0)
    model = SequenceFirst()
    x, y = torch.randn(4, 4, 3), torch.randint(0, 2, (4,))  # T == B == 4
    result = squared_gradients(model, [(x, y)], sum_ce)
    assert result.plan.fallback == ["inner.weight", "inner.bias"]
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))


def test_fisher_mean_reduced_loss_is_rescaled_to_the_sum_convention():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(9, 6), torch.randint(0, 4, (9,))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    summed = squared_gradients(model, batches, sum_ce)
    mean = squared_gradients(model, batches, F.cross_entropy, reduction="mean")
    assert_fisher_close(mean.fisher, summed.fisher, rtol=1e-5)
    assert mean.loss == pytest.approx(summed.loss, rel=1e-5)


def test_fisher_under_bf16_autocast_accumulates_in_fp32():
    model = vit()
    x, y, batches = image_batches()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = squared_gradients(model, batches, sum_ce)
    expected = oracle_fisher(model, x, y)
    for name, value in result.fisher.items():
        assert value.dtype == torch.float32
        relative = (value - expected[name]).norm() / expected[name].norm()
        assert relative < 0.05, name  # bf16 activations, fp32 accumulation


def test_fisher_only_for_chosen_names_leaves_model_untouched():
    model = cnn().train()
    x, y, batches = image_batches()
    result = squared_gradients(model, batches, sum_ce, names=["7.weight", "1.bias"])
    assert list(result.fisher) == ["7.weight", "1.bias"]
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    expected = oracle_fisher(model.eval(), x, y)
    assert_fisher_close(result.fisher, {n: expected[n] for n in ("7.weight", "1.bias")})


def test_fisher_mc_targets_come_from_sample_targets():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    flipped = (y + 1) % 4
    result = squared_gradients(model, [(x, y)], sum_ce, sample_targets=lambda out: flipped)
    assert_fisher_close(result.fisher, oracle_fisher(model, x, flipped))
    assert result.loss == pytest.approx(float(sum_ce(model(x), y).detach()), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"reduction": "none"}, "reduction"), ({"names": ["nope"]}, "not parameters"), ({"names": []}, "no parameter")],
)
def test_squared_gradients_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        squared_gradients(mlp(), [(torch.randn(2, 6), torch.tensor([0, 1]))], sum_ce, **kwargs)


def test_squared_gradients_rejects_empty_batches():
    with pytest.raises(ValueError, match="empty"):
        squared_gradients(mlp(), [], sum_ce)


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [
        ((3, 3), (1, 1), 1, (1, 1)),
        ((3, 2), (2, 1), (2, 0), (1, 2)),
        ((3, 3), (1, 1), "same", (2, 2)),
        ((2, 2), (2, 2), "valid", (1, 1)),
    ],
)
def test_conv_patches_equal_unfold(kernel, stride, padding, dilation):
    from bayeskern.curvature.rules import _pads, patches

    x = torch.randn(2, 3, 7, 6)
    pads = _pads(padding, kernel, dilation)
    expected = F.unfold(F.pad(x, pads), kernel, dilation, 0, stride).transpose(1, 2)
    torch.testing.assert_close(patches(x, kernel, stride, padding, dilation), expected, rtol=0, atol=0)


def test_a_plan_checked_at_one_batch_size_says_so_and_stays_exact():
    class NoPairs(nn.Module):  # cannot run the driver's 2-example re-probe of the plan
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 3)

        def forward(self, x):
            if x.shape[0] == 2:
                raise RuntimeError("no batches of two")
            return self.layer(x)

    torch.manual_seed(0)
    model = NoPairs()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match="checked at batch size 6 only .*no batches of two"):
        result = squared_gradients(model, [(x, y)], sum_ce)
    assert_fisher_close(result.fisher, oracle_fisher(model, x, y))
