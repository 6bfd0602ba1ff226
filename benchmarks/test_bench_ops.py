"""Kernel-level benchmarks of the noise ops against the eager PyTorch composition.

gaussian_sample: eager ``mu + softplus(rho) * randn_like(mu)`` vs each backend, forward and
forward+backward; weight_dropout: eager ``w * bernoulli_(1-p) / (1-p)`` vs each backend; a plain
``clone()`` of the same tensor in each group gives the achievable bandwidth.  The Triton backend is
timed only on CUDA (the CPU interpreter is a correctness tool).  Retained bytes between forward
and backward (what autograd keeps alive, inputs excluded) are recorded as ``saved_bytes``.
``add into a new vs an existing tensor``: ``torch.add(a, b)`` against ``torch.add(a, b, out=c)``, the
cost of faulting in a fresh output's pages (glibc hands large freed blocks back to the kernel).
"""

import pytest
import torch
import torch.nn.functional as F
from bench_utils import SIZES, record, size_label, synchronize

import bayeskern.ops as ops

P = 0.1


def _backends(device):
    names = [n for n in ops.available_backends(device) if n != "reference"]
    return [n for n in names if not (n == "triton" and device.type == "cpu")]


def _eager_sample(mu, rho, seed):
    return mu + F.softplus(rho) * torch.randn_like(mu)


def _eager_dropout(w, seed):
    return w * torch.empty_like(w).bernoulli_(1 - P) / (1 - P)


def _saved_bytes(fn, inputs):
    """Bytes autograd keeps for backward beyond the inputs themselves."""
    input_ptrs = {t.data_ptr() for t in inputs}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    total = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in input_ptrs)
    del out
    return total


def _tensors(numel, device, requires_grad=False):
    mu = torch.randn(numel, device=device, requires_grad=requires_grad)
    rho = torch.full((numel,), -3.0, device=device, requires_grad=requires_grad)
    return mu, rho


def _run(benchmark, device, fn):
    def call():
        out = fn()
        synchronize(device)
        return out

    benchmark(call)


@pytest.mark.parametrize("numel", SIZES, ids=size_label)
@pytest.mark.parametrize("impl", ["eager", "clone", "reference", "cpp", "triton"])
def test_gaussian_sample_forward(benchmark, bench_device, numel, impl):
    if impl in ("cpp", "triton") and impl not in _backends(bench_device):
        pytest.skip(f"{impl} not timed on {bench_device}")
    if impl == "reference" and numel > 2**22:
        pytest.skip("the reference is a slow spec; timed at small sizes only")
    mu, rho = _tensors(numel, bench_device)
    group = f"gaussian_sample fwd {size_label(numel)} fp32 {bench_device.type}"
    if impl == "eager":
        fn = lambda: _eager_sample(mu, rho, 0)  # noqa: E731
    elif impl == "clone":
        fn = mu.clone
    else:

        def fn():
            with ops.use_backend(impl):
                return ops.gaussian_sample(mu, rho, 1, 0)

    bytes_moved = (8 if impl == "clone" else 12) * numel
    record(benchmark, group, impl, baseline=impl == "eager", bytes=bytes_moved, numel=numel)
    _run(benchmark, bench_device, fn)


@pytest.mark.parametrize("numel", SIZES, ids=size_label)
@pytest.mark.parametrize("impl", ["eager", "cpp", "triton"])
def test_gaussian_sample_forward_backward(benchmark, bench_device, numel, impl):
    if impl != "eager" and impl not in _backends(bench_device):
        pytest.skip(f"{impl} not timed on {bench_device}")
    mu, rho = _tensors(numel, bench_device, requires_grad=True)
    grad = torch.ones(numel, device=bench_device)

    def forward():
        if impl == "eager":
            return _eager_sample(mu, rho, 0)
        with ops.use_backend(impl):
            return ops.gaussian_sample(mu, rho, 1, 0)

    def step():
        return torch.autograd.grad(forward(), (mu, rho), grad)

    info = dict(numel=numel, saved_bytes=_saved_bytes(forward, (mu, rho)))
    if bench_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench_device)
        base = torch.cuda.memory_allocated(bench_device)
        step()
        info["peak_extra_bytes"] = torch.cuda.max_memory_allocated(bench_device) - base
    record(
        benchmark,
        f"gaussian_sample fwd+bwd {size_label(numel)} fp32 {bench_device.type}",
        impl,
        baseline=impl == "eager",
        **info,
    )
    _run(benchmark, bench_device, step)


@pytest.mark.parametrize("numel", SIZES, ids=size_label)
@pytest.mark.parametrize("impl", ["eager", "clone", "cpp", "triton"])
def test_weight_dropout_forward(benchmark, bench_device, numel, impl):
    if impl in ("cpp", "triton") and impl not in _backends(bench_device):
        pytest.skip(f"{impl} not timed on {bench_device}")
    w = torch.randn(numel, device=bench_device)
    if impl == "eager":
        fn = lambda: _eager_dropout(w, 0)  # noqa: E731
    elif impl == "clone":
        fn = w.clone
    else:

        def fn():
            with ops.use_backend(impl):
                return ops.weight_dropout(w, P, 1, 0)

    record(
        benchmark,
        f"weight_dropout fwd {size_label(numel)} fp32 {bench_device.type}",
        impl,
        baseline=impl == "eager",
        bytes=8 * numel,
        numel=numel,
    )
    _run(benchmark, bench_device, fn)


@pytest.mark.parametrize("numel", SIZES, ids=size_label)
@pytest.mark.parametrize("impl", ["torch.randn", "cpp", "triton"])
def test_normal_generator(benchmark, bench_device, numel, impl):
    if impl != "torch.randn" and impl not in _backends(bench_device):
        pytest.skip(f"{impl} not timed on {bench_device}")
    out = torch.empty(numel, device=bench_device)
    if impl == "torch.randn":
        fn = lambda: out.normal_()  # noqa: E731
    else:
        from bayeskern.ops.backend import kernels

        fn = lambda: kernels(impl).fill_normal_(out, 1, 0, 0)  # noqa: E731
    record(
        benchmark,
        f"normal noise {size_label(numel)} fp32 {bench_device.type}",
        impl,
        baseline=impl == "torch.randn",
        bytes=4 * numel,
        numel=numel,
    )
    _run(benchmark, bench_device, fn)


@pytest.mark.parametrize("numel", SIZES, ids=size_label)
@pytest.mark.parametrize("impl", ["existing", "new"])
def test_add_into_new_or_existing_tensor(benchmark, bench_device, numel, impl):
    a, b, out = (torch.randn(numel, device=bench_device) for _ in range(3))
    fn = (lambda: torch.add(a, b, out=out)) if impl == "existing" else (lambda: torch.add(a, b))
    record(
        benchmark,
        f"add into a new vs an existing tensor {size_label(numel)} fp32 {bench_device.type}",
        impl,
        baseline=impl == "existing",
        numel=numel,
    )
    _run(benchmark, bench_device, fn)
