"""weight_dropout: every backend against the reference, keep rate, gradients, memory, bad input."""

import pytest
import torch

import bayeskern.ops as ops
from bayeskern.ops import philox
from bayeskern.ops.dropout import reference_weight_dropout


def _weights(shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_fill", [False, True])
@pytest.mark.parametrize("shape, offset", [((0,), 0), ((1,), 1), ((9, 7), 3), ((2, 3, 101), 2**32 + 5)])
def test_forward_matches_reference(backend, device, dtype, with_fill, shape, offset):
    w = _weights(shape, dtype, device)
    fill = _weights(shape, dtype, device, seed=1) if with_fill else None
    with ops.use_backend(backend):
        out = ops.weight_dropout(w, 0.3, 555, offset, fill)
    expected = reference_weight_dropout(w.float(), 0.3, 555, offset, None if fill is None else fill.float())
    assert out.dtype == dtype and out.shape == w.shape
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out, expected.to(dtype), rtol=tol, atol=tol)


def test_reference_mask_is_uniform_at_least_p():
    w = _weights((50,))
    keep = philox.uniform(9, 4, 50) >= 0.25
    torch.testing.assert_close(reference_weight_dropout(w, 0.25, 9, 4), torch.where(keep, w / 0.75, 0.0))
    fill = _weights((50,), seed=3)
    torch.testing.assert_close(reference_weight_dropout(w, 0.25, 9, 4, fill), torch.where(keep, w, fill))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_keep_rate(backend, device, p):
    n = 100_000
    with ops.use_backend(backend):
        out = ops.weight_dropout(torch.ones(n, device=device), p, 2024, 0)
    kept = (out != 0).double().mean().item()
    assert abs(kept - (1 - p)) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p), device=device))


@pytest.mark.parametrize("with_fill", [False, True])
def test_gradients_match_reference(backend, device, with_fill):
    w = _weights((33, 17), device=device).requires_grad_()
    fill = _weights((33, 17), device=device, seed=5).requires_grad_() if with_fill else None
    upstream = _weights((33, 17), device=device, seed=6)
    inputs = (w, fill) if with_fill else (w,)
    with ops.use_backend(backend):
        grads = torch.autograd.grad(ops.weight_dropout(w, 0.4, 8, 1, fill), inputs, upstream)
    ref_inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    ref = reference_weight_dropout(ref_inputs[0], 0.4, 8, 1, ref_inputs[1] if with_fill else None)
    for got, expected in zip(grads, torch.autograd.grad(ref, ref_inputs, upstream)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_gradcheck_float64():
    w = _weights((4, 5), torch.float64).requires_grad_()
    fill = _weights((4, 5), torch.float64, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ops.weight_dropout(a, 0.3, 1, 0), (w,))
    assert torch.autograd.gradcheck(lambda a, b: ops.weight_dropout(a, 0.3, 1, 0, b), (w, fill))


def test_backward_stores_no_mask(backend, device):
    w = _weights((128, 32), device=device).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with ops.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.weight_dropout(w, 0.2, 0, 0)
    out.sum().backward()
    assert all(t.numel() == 1 for t in saved), [tuple(t.shape) for t in saved]


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True])
def test_p_outside_unit_interval_raises(p):
    with pytest.raises(ValueError, match="p must be"):
        ops.weight_dropout(torch.zeros(3), p, 0)


def test_fill_shape_mismatch_raises():
    with pytest.raises(ValueError, match="fill has shape"):
        ops.weight_dropout(torch.zeros(3), 0.1, 0, fill=torch.zeros(4))


def test_opcheck():
    w = _weights((6, 8)).requires_grad_()
    torch.library.opcheck(torch.ops.bayeskern.weight_dropout.default, (w, 0.25, philox.seed_tensor(3), 4, 0, None))
