"""The fused training draws (gaussian_sample_kl, weight_dropout_l2): the Triton and C++ kernels
against the per-tensor composition on the reference backend (values and gradients), the composition
against float64 finite differences, thread-count independence, opcheck and bad input."""

import os
import subprocess
import sys

import pytest
import torch

import bayeskern.ops as ops
from bayeskern.ops import philox
from bayeskern.ops.draw import _gaussian_sample_kl, _weight_dropout_l2

# a tensor spanning several parallel chunks (16384 elements each), offsets that cut SIMD steps, an empty one
SHAPES = [(37, 5), (3,), (40_000,), (64, 3, 3, 3), (1,), (0, 3)]
PRIOR_STDS = [1.0, 0.5, 2.0, 0.1, 3.0, 1.5]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _offsets(shapes, start=6):
    offsets = []
    for shape in shapes:
        offsets.append(start)
        start += -(-torch.Size(shape).numel() // 4) * 4 + 4
    return offsets


def _case(dtype=torch.float32, means="mixed", seed=0, device="cpu", rho_shift=-4.0):
    g = torch.Generator().manual_seed(seed)

    def make(shape, shift=0.0):
        return (torch.randn(shape, generator=g) + shift).to(device=device, dtype=dtype)

    mus = [make(s).requires_grad_() for s in SHAPES]
    rhos = [make(s, rho_shift).requires_grad_() for s in SHAPES]
    given = {"none": [], "all": range(len(SHAPES)), "mixed": [1, 2]}[means]
    prior_means = [make(s) if k in given else None for k, s in enumerate(SHAPES)]
    upstream = [make(s) for s in SHAPES]
    return mus, rhos, prior_means, upstream


def _run(draw, params, upstream, term_grad=0.37):
    """Values of a draw and the gradients of sum_k <w_k, upstream_k> + term_grad * term."""
    samples, term = draw()
    loss = sum((w.float() * u.float()).sum() for w, u in zip(samples, upstream)) + term_grad * term
    grads = torch.autograd.grad(loss, params)
    return [w.detach() for w in samples], term.detach(), grads


def _gaussian(mus, rhos, prior_means, seed=11, stream=3):
    return lambda: ops.gaussian_sample_kl(mus, rhos, prior_means, PRIOR_STDS, seed, _offsets(SHAPES), stream=stream)


def _dropout(mus, prior_means, fill_prior, p=0.3, seed=11, stream=3):
    return lambda: ops.weight_dropout_l2(
        mus, p, prior_means, PRIOR_STDS, seed, _offsets(SHAPES), fill_prior=fill_prior, stream=stream
    )


def _float32(tensors):
    """float32 copies (exact for bf16 values): the composition's float32 maths is the specification
    the kernels follow for every dtype."""
    return [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in tensors]


def _assert_same(got, expected, tol):
    for a, b in zip(got[0], expected[0]):
        torch.testing.assert_close(a.float(), b, **tol)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-2)
    for a, b in zip(got[2], expected[2]):
        torch.testing.assert_close(a.float(), b, **tol)


@pytest.fixture
def cpp():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("means", ["none", "all", "mixed"])
@pytest.mark.parametrize("rho_shift", [-4.0, -8.0], ids=["general", "series"])
def test_gaussian_kernel_matches_composition(kernel_backend, device, dtype, means, rho_shift):
    """rho around -4 mixes lanes on either side of the C++ kernels' series threshold; around -8 whole
    vectors take the series path (small stds)."""
    mus, rhos, prior_means, upstream = _case(dtype, means, device=device, rho_shift=rho_shift)
    with ops.use_backend(kernel_backend):
        got = _run(_gaussian(mus, rhos, prior_means), [*mus, *rhos], upstream)
    mus32, rhos32, means32 = _float32(mus), _float32(rhos), _float32(prior_means)
    with ops.use_backend("reference"):
        expected = _run(_gaussian(mus32, rhos32, means32), [*mus32, *rhos32], upstream)
    assert got[1].dtype == torch.float32 and all(w.dtype == dtype for w in got[0])
    _assert_same(got, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("means", ["none", "all", "mixed"])
@pytest.mark.parametrize("fill_prior", [False, True])
def test_dropout_kernel_matches_composition(kernel_backend, device, dtype, means, fill_prior):
    mus, _, prior_means, upstream = _case(dtype, means, device=device)
    with ops.use_backend(kernel_backend):
        got = _run(_dropout(mus, prior_means, fill_prior), mus, upstream)
    mus32, means32 = _float32(mus), _float32(prior_means)
    with ops.use_backend("reference"):
        expected = _run(_dropout(mus32, means32, fill_prior), mus32, upstream)
    _assert_same(got, expected, TOL[dtype])


def test_composition_is_the_sum_of_the_per_tensor_ops():
    mus, rhos, prior_means, _ = _case()
    samples, kl = _gaussian(mus, rhos, prior_means)()
    offsets = _offsets(SHAPES)
    for k, (mu, rho, _m0, _sp) in enumerate(zip(mus, rhos, prior_means, PRIOR_STDS)):
        torch.testing.assert_close(samples[k], ops.reference_gaussian_sample(mu, rho, 11, offsets[k], stream=3))
    expected = sum(
        ops.reference_gaussian_kl(mu, rho, m0, sp) for mu, rho, m0, sp in zip(mus, rhos, prior_means, PRIOR_STDS)
    )
    torch.testing.assert_close(kl, expected)
    dropped, l2 = _dropout(mus, prior_means, True)()
    for k, (mu, m0) in enumerate(zip(mus, prior_means)):
        fill = torch.zeros_like(mu) if m0 is None else m0
        torch.testing.assert_close(dropped[k], ops.reference_weight_dropout(mu, 0.3, 11, offsets[k], fill, stream=3))
    squared = sum(
        ((mu if m0 is None else mu - m0) ** 2).sum() / (2 * sp**2) for mu, m0, sp in zip(mus, prior_means, PRIOR_STDS)
    )
    torch.testing.assert_close(l2, 0.7 * squared)


@pytest.mark.parametrize("kind", ["gaussian", "dropout"])
def test_gradcheck_float64(kind):
    """float64 runs the composition: its gradients against finite differences."""
    g = torch.Generator().manual_seed(2)
    mus = [
        torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True),
    ]
    rhos = [(torch.randn(m.shape, generator=g, dtype=torch.float64) - 1).requires_grad_() for m in mus]
    prior_means = [torch.randn(3, 4, generator=g, dtype=torch.float64), None]

    def gaussian(*tensors):
        samples, kl = ops.gaussian_sample_kl(tensors[:2], tensors[2:], prior_means, [0.7, 1.3], 5, [0, 12])
        return (*samples, kl)

    def dropout(*tensors):
        samples, l2 = ops.weight_dropout_l2(tensors, 0.4, prior_means, [0.7, 1.3], 5, [0, 12], fill_prior=True)
        return (*samples, l2)

    if kind == "gaussian":
        assert torch.autograd.gradcheck(gaussian, (*mus, *rhos))
    else:
        assert torch.autograd.gradcheck(dropout, tuple(mus))


def test_term_does_not_depend_on_the_thread_count(cpp):
    mus, rhos, prior_means, _ = _case()
    threads = torch.get_num_threads()
    values = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            with torch.no_grad():
                values.append((_gaussian(mus, rhos, prior_means)()[1], _dropout(mus, prior_means, False)()[1]))
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(values[0][0], values[1][0]) and torch.equal(values[0][1], values[1][1])


def test_kernels_pass_opcheck(kernel_backend, device):
    mus = [torch.randn(5, 3, device=device, requires_grad=True), torch.randn(7, device=device, requires_grad=True)]
    rhos = [torch.full(m.shape, -3.0, device=device, requires_grad=True) for m in mus]
    prior_means = [torch.randn(5, 3, device=device), None]
    seed = philox.seed_tensor(4)
    with ops.use_backend(kernel_backend):
        torch.library.opcheck(_gaussian_sample_kl, (mus, rhos, prior_means, [1.0, 0.5], seed, [0, 16], 2))
        torch.library.opcheck(_weight_dropout_l2, (mus, 0.2, True, prior_means, [1.0, 0.5], seed, [0, 16], 2))


@pytest.mark.parametrize("kind", ["gaussian", "dropout"])
def test_cpp_eager_path_equals_the_custom_op(cpp, kind):
    """On the C++ CPU kernels the public functions skip the custom-op layer in eager mode: same
    values and gradients bit for bit, an unused draw included (its gradient counts as zero)."""
    mus, rhos, prior_means, upstream = _case()
    upstream[0] = None
    fused = (prior_means, PRIOR_STDS, philox.seed_tensor(11), _offsets(SHAPES), 3)
    with ops.use_backend("cpp"):
        if kind == "gaussian":
            params = mus + rhos
            eager, custom = _gaussian(mus, rhos, prior_means), lambda: _gaussian_sample_kl(mus, rhos, *fused)
        else:
            params = mus
            eager, custom = _dropout(mus, prior_means, True), lambda: _weight_dropout_l2(mus, 0.3, True, *fused)
        nodes, tensors = [], []
        for draw in (eager, custom):
            samples, term = draw()
            nodes.append(samples[1].grad_fn.name())
            values, term, grads = _run(lambda: (samples[1:], term), params, upstream[1:])  # noqa: B023
            tensors.append([*values, term, *grads])
    assert "Eager" in nodes[0] and "Eager" not in nodes[1]
    assert all(torch.equal(a, b) for a, b in zip(*tensors))


def _cpp_gaussian_backward(grad, mu, rho, samples, seed=5):
    """The C++ kernel's (grad_mu, grad_rho) for one tensor at offset 0, stream 0, zero prior mean, sp = 1."""
    kernel = ops.backend.kernels("cpp")
    grad_mus, grad_rhos = kernel.gaussian_sample_kl_backward(
        [grad], torch.zeros(()), [mu], [rho], samples, [None], [1.0], seed, [0], 0
    )
    return grad_mus[0], grad_rhos[0]


def test_cpp_backward_takes_the_noise_from_the_samples_where_exact_enough(cpp):
    """float32: eps = (w - mu) / s over each SIMD step (64 elements) whose every |w| <= 256 s, Philox
    elsewhere.  Passing mu as the samples (eps = 0) shows which steps used them: their rho-gradient
    from the data term is zero; the other steps match the regenerating kernel bit for bit."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64 * 6, generator=g) * 0.1
    rho = torch.full_like(mu, -3.0)  # s = 0.049: 256 s = 12.4 > |mu|
    rho[128:192] = -20.0  # s = 2e-9: 256 s < |mu|, the step regenerates
    mu[200] = 13.0  # one lane over 256 s: its whole step (192..255) regenerates
    grad = torch.randn(mu.shape, generator=g)
    _, from_mu = _cpp_gaussian_backward(grad, mu, rho, [mu])
    _, regenerated = _cpp_gaussian_backward(grad, mu, rho, [])
    served = torch.ones_like(mu, dtype=torch.bool)
    served[128:256] = False
    assert torch.all(from_mu[served] == 0) and torch.all(regenerated[served] != 0)
    assert torch.equal(from_mu[~served], regenerated[~served])


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_cpp_backward_noise_from_the_samples_is_within_its_bound(cpp, scale):
    """With the real samples, the eps the backward recovers differs from the regenerated one by at
    most 2^-16 + 2^-22 |eps| (the bound in ops/draw.py); |w| / s reaches 200 here."""
    g = torch.Generator().manual_seed(1)
    n = 64 * 64
    mu = torch.randn(n, generator=g) * scale
    std = mu.abs() / torch.empty(n).uniform_(1.0, 200.0, generator=g) + 1e-30
    rho = torch.log(torch.expm1(std.double())).float()
    kernel = ops.backend.kernels("cpp")
    samples, _ = kernel.gaussian_sample_kl([mu], [rho], [None], [1.0], 5, [0], 0)
    grad = torch.ones(n)
    _, from_samples = _cpp_gaussian_backward(grad, mu, rho, samples)
    _, regenerated = _cpp_gaussian_backward(grad, mu, rho, [])
    eps = philox.normal(5, 0, n)
    sig = torch.sigmoid(rho)  # grad_rho = sig * (eps + 0 * KL-part) with grad = 1, grad_kl = 0
    assert (from_samples != regenerated).any()  # the samples served
    bound = sig * (2.0**-16 + 2.0**-22 * eps.abs()) + 1e-6 * regenerated.abs()
    assert torch.all((from_samples - regenerated).abs() <= bound)


def test_cpp_backward_regenerates_the_noise_in_half_precision(cpp):
    """bf16 samples are rounded to 2^-8 of |w|: the backward ignores them and regenerates."""
    mu = (torch.randn(256) * 0.01).bfloat16()
    rho = torch.full_like(mu, -3.0)
    grad = torch.randn(256).bfloat16()
    assert torch.equal(_cpp_gaussian_backward(grad, mu, rho, [mu])[1], _cpp_gaussian_backward(grad, mu, rho, [])[1])


_POOL_CHECK = """
import resource, sys, torch
import bayeskern.ops as ops
kernel = ops.backend.kernels("cpp")
assert "cpp" in ops.available_backends("cpu")
mu = torch.zeros(2**23)  # 32 MiB per output: over glibc's largest mmap threshold, a fresh mapping each time
rho = torch.full_like(mu, -5.0)

def step():
    samples, kl = kernel.gaussian_sample_kl([mu], [rho], [None], [1.0], 1, [0], 0)
    grads = kernel.gaussian_sample_kl_backward(samples, kl, [mu], [rho], samples, [None], [1.0], 1, [0], 0)
    return samples[0].data_ptr(), grads[0][0].data_ptr(), grads[1][0].data_ptr()

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(ops.release_cached_memory())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow  # a subprocess or a long chain
@pytest.mark.parametrize("pool_mb, reused", [("1024", True), ("0", False)])
def test_fused_draw_outputs_reuse_freed_memory(cpp, pool_mb, reused):
    """The fused draws' outputs (here 3 x 32 MiB a step) come from a pool of freed blocks, so a
    second step touches no new pages (glibc maps and faults in 3 x 8192 pages every step); after
    release_cached_memory, or with BAYESKERN_CPU_POOL_MB=0, every step faults its pages in."""
    env = {**os.environ, "BAYESKERN_CPU_POOL_MB": pool_mb}
    run = subprocess.run([sys.executable, "-c", _POOL_CHECK], env=env, capture_output=True, text=True, check=True)
    second_step, freed, after_release = (int(line) for line in run.stdout.split())
    pages = 3 * 2**25 // 4096
    assert (second_step < pages // 10) if reused else (second_step >= pages)
    assert freed == (3 * 2**25 if reused else 0)
    assert after_release >= pages


@pytest.mark.slow  # a subprocess or a long chain
def test_bad_pool_size_raises_naming_the_variable(cpp):
    env = {**os.environ, "BAYESKERN_CPU_POOL_MB": "lots"}
    run = subprocess.run([sys.executable, "-c", _POOL_CHECK], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "BAYESKERN_CPU_POOL_MB must be a whole number of MiB, got 'lots'" in run.stderr


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, r: ops.gaussian_sample_kl([m], [r, r], [None], [1.0], 0, [0]), "rhos has 2 entries"),
        (lambda m, r: ops.gaussian_sample_kl([m], [r], [None], [-1.0], 0, [0]), r"prior_stds\[0\] must be positive"),
        (lambda m, r: ops.gaussian_sample_kl([m], [r], [torch.zeros(2)], [1.0], 0, [0]), r"prior_means\[0\]"),
        (lambda m, r: ops.gaussian_sample_kl([m], [r.t()[:1]], [None], [1.0], 0, [0]), r"rhos\[0\]"),
        (lambda m, r: ops.gaussian_sample_kl([], [], [], [], 0, []), "mus must hold"),
        (lambda m, r: ops.weight_dropout_l2([m], 1.0, [None], [1.0], 0, [0]), "p must be a probability"),
        (lambda m, r: ops.weight_dropout_l2([m], 0.1, [None], [1.0], 0, [-4]), "offsets"),
        (lambda m, r: ops.weight_dropout_l2([m], 0.1, [None, None], [1.0], 0, [0]), "prior_means has 2 entries"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(4, 3), torch.randn(4, 3))


def test_noise_gaussian_is_mean_plus_std_times_the_philox_normal():
    g = torch.Generator().manual_seed(5)
    mean, std = torch.randn(7, 9, generator=g), torch.rand(7, 9, generator=g)
    eps = philox.normal(3, 12, 63, stream=4).view(7, 9)
    torch.testing.assert_close(ops.noise.gaussian(mean, std, 3, 12, stream=4), mean + std * eps)
    with pytest.raises(ValueError, match="std has shape"):
        ops.noise.gaussian(mean, std[:2], 3)
    with pytest.raises(ValueError, match="mean must be a floating-point tensor"):
        ops.noise.gaussian(torch.zeros(3, dtype=torch.int64), std, 3)
