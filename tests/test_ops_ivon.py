"""IVON's fused ops (bayeskern.ops.ivon): every backend and the foreach implementation against the
single-tensor reference, the schemas, and the argument checks."""

import math

import pytest
import torch

from bayeskern.ops import ivon, philox, use_backend

SHAPES = [(33, 9), (5,), (0,), (130,), (7,)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SEED, STREAM = 0x123456789AB, 2**33 + 5


def _offsets(shapes, start=0):
    """Disjoint Philox ranges, the first tensor at ``start`` (3: blocks straddle the tensors' starts)."""
    offsets, at = [], start
    for shape in shapes:
        offsets.append(at)
        at += philox.tensor_span(math.prod(shape))
    return offsets


def _tensors(shapes, dtype, device, seed, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=gen) for s in shapes]
    return [(t.abs() + 0.1 if positive else t).to(device, dtype) for t in out]


def _sums(shapes, device, seed, dtype=torch.float32):
    """Gradient sums for parameters of ``dtype``: float32, float64 for float64."""
    return _tensors(shapes, torch.float64 if dtype == torch.float64 else torch.float32, device, seed)


def _run(op_name, implementation, backend, make):
    """The op's results on freshly made inputs (``make()`` -> (args, kwargs, outputs))."""
    args, kwargs, outputs = make()
    with use_backend(backend):
        getattr(ivon, op_name)(*args, **kwargs, implementation=implementation)
    return [t.float().clone() for ts in outputs for t in ts]


def _compare(op_name, make, implementation, backend, tol):
    got = _run(op_name, implementation, backend, make)
    want = _run(op_name, "reference", "reference", make)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


IMPLS = [("fused", None), ("foreach", "reference")]


def _draw_case(dtype, device, start):
    def make():
        params, hesses = _tensors(SHAPES, dtype, device, 1), _tensors(SHAPES, dtype, device, 2, positive=True)
        means = [torch.full_like(p, 7.0) for p in params]
        kwargs = dict(ess=100.0, delta=1e-3, seed=SEED, stream=STREAM, offsets=_offsets(SHAPES, start))
        return (params, means, hesses), kwargs, (params, means)

    return make


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 3])
def test_draw_matches_the_reference_and_keeps_the_mean_exactly(kernel_backend, device, dtype, start):
    make = _draw_case(dtype, device, start)
    _compare("ivon_draw_", make, "fused", kernel_backend, TOL[dtype])
    args, kwargs, _ = make()
    before = [p.clone() for p in args[0]]
    with use_backend(kernel_backend):
        ivon.ivon_draw_(*args, **kwargs)
    for mean, p in zip(args[1], before):
        assert torch.equal(mean, p)  # the mean comes back bit for bit


def test_draw_is_mean_plus_sigma_times_the_philox_normal(backend, device):
    (params, means, hesses), kwargs, _ = _draw_case(torch.float32, device, 3)()
    want = [
        p + (h + 1e-3).mul(100.0).rsqrt() * philox.normal(SEED, o, p.numel(), STREAM, device=device).view(p.shape)
        for p, h, o in zip(params, hesses, kwargs["offsets"])
    ]
    with use_backend(backend):
        ivon.ivon_draw_(params, means, hesses, **kwargs)
    for got, w in zip(params, want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_collect_matches_the_reference(kernel_backend, device, dtype, accumulate):
    def make():
        grads, sums, eps_sums = _tensors(SHAPES, dtype, device, 3), _sums(SHAPES, device, 4), _sums(SHAPES, device, 5)
        kwargs = dict(accumulate=accumulate, seed=SEED, stream=STREAM, offsets=_offsets(SHAPES, 3))
        return (grads, sums, eps_sums), kwargs, (sums, eps_sums)

    _compare("ivon_collect_", make, "fused", kernel_backend, 1e-5)


def _update_case(dtype, device, prior, clip_radius, scale, beta2):
    def make():
        params, momenta = _tensors(SHAPES, dtype, device, 6), _tensors(SHAPES, dtype, device, 7)
        hesses = _tensors(SHAPES, dtype, device, 8, positive=True)
        sums, eps_sums = _sums(SHAPES, device, 9, dtype), _sums(SHAPES, device, 10, dtype)
        means = _tensors(SHAPES, dtype, device, 11) if prior else None
        kwargs = dict(lr=0.05, ess=100.0, delta=1e-3, beta1=0.9, beta2=beta2, step=3, clip_radius=clip_radius)
        return (params, momenta, hesses, sums, eps_sums, means), dict(kwargs, scale=scale), (params, momenta, hesses)

    return make


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("prior", "clip_radius", "scale", "beta2"),
    [(False, math.inf, 1.0, 0.99999), (True, 0.01, 0.5, 0.9), (True, math.inf, 1.0, 0.99999)],
)
def test_update_matches_the_reference(kernel_backend, device, dtype, prior, clip_radius, scale, beta2):
    make = _update_case(dtype, device, prior, clip_radius, scale, beta2)
    _compare("ivon_update_", make, "fused", kernel_backend, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_foreach_matches_the_reference(device, dtype):
    tol = {torch.float64: 1e-12}.get(dtype, TOL.get(dtype))
    _compare("ivon_draw_", _draw_case(dtype, device, 3), "foreach", "reference", tol)
    _compare("ivon_update_", _update_case(dtype, device, True, 0.01, 0.5, 0.9), "foreach", "reference", tol)

    def make():
        grads = _tensors(SHAPES, dtype, device, 3)
        sums = [torch.ones_like(g, dtype=ivon.sum_dtype(g)) for g in grads]
        kwargs = dict(accumulate=True, seed=SEED, stream=STREAM, offsets=_offsets(SHAPES, 3))
        return (grads, sums, [s.clone() for s in sums]), kwargs, (sums,)

    _compare("ivon_collect_", make, "foreach", "reference", tol)


def test_float64_runs_the_reference_in_float64(device):
    make = _update_case(torch.float64, device, True, 0.01, 0.5, 0.9)
    got = _run("ivon_update_", "fused", "cpp" if device.type == "cpu" else "triton", make)
    want = _run("ivon_update_", "reference", "reference", make)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_custom_ops_pass_opcheck(backend, device):
    params, means, hesses = _tensors([(9,), (2, 3)], torch.float32, device, 0), None, None
    means = [torch.zeros_like(p) for p in params]
    hesses = [p.abs() + 1 for p in params]
    sums = [torch.zeros_like(p) for p in params]
    checks = ("test_schema", "test_faketensor")
    with use_backend(backend):
        torch.library.opcheck(
            ivon._ivon_draw_, (params, means, hesses, 10.0, 0.1, torch.tensor(5), 2, [0, 12]), test_utils=checks
        )
        torch.library.opcheck(
            ivon._ivon_collect_, (params, sums, [s.clone() for s in sums], True, torch.tensor(5), 2, [0, 12]),
            test_utils=checks,
        )  # fmt: skip
        momenta = [s.clone() for s in sums]
        update = (params, momenta, hesses, sums, sums, means, 0.1, 10.0, 0.1, 0.9, 0.99, 0.1, 1.0, 1.0)
        torch.library.opcheck(ivon._ivon_update_, update, test_utils=checks)


def test_ops_check_their_arguments():
    p = [torch.zeros(4), torch.zeros(3)]
    with pytest.raises(ValueError, match="means has 1 entries"):
        ivon.ivon_draw_(p, [torch.zeros(4)], p, ess=1.0, delta=1.0, seed=0, stream=0, offsets=[0, 4])
    with pytest.raises(ValueError, match=r"hesses\[1\] has shape"):
        ivon.ivon_draw_(p, p, [torch.zeros(4), torch.zeros(2)], ess=1.0, delta=1.0, seed=0, stream=0, offsets=[0, 4])
    with pytest.raises(ValueError, match=r"grad_sums\[0\] must be torch.float32"):
        half = [t.half() for t in p]
        ivon.ivon_collect_(half, half, p, accumulate=False, seed=0, stream=0, offsets=[0, 4])
    with pytest.raises(ValueError, match="step must be"):
        ivon.ivon_update_(p, p, p, p, p, lr=1.0, ess=1.0, delta=1.0, beta1=0.9, beta2=0.9, step=0)
    for name, value in (("ess", 0.0), ("delta", -1.0)):
        with pytest.raises(ValueError, match=name):
            ivon.ivon_draw_(p, p, p, **{"ess": 1.0, "delta": 1.0, name: value}, seed=0, stream=0, offsets=[0, 4])
    update = dict(lr=1.0, ess=1.0, delta=1.0, beta1=0.9, beta2=0.9, step=1)
    for name, value in (("lr", -1.0), ("ess", float("nan")), ("scale", 0.0), ("beta2", 1.0), ("clip_radius", 0.0)):
        with pytest.raises(ValueError, match=name):
            ivon.ivon_update_(p, p, p, p, p, **{**update, name: value})
    with pytest.raises(ValueError, match="implementation must be"):
        ivon.ivon_update_(p, p, p, p, p, lr=1.0, ess=1.0, delta=1.0, beta1=0.9, beta2=0.9, step=1, implementation="x")
