"""The counter-based noise: Philox against published vectors and Triton's own implementation,
the uniform/normal transforms on every backend against the reference, and their statistics."""

import pytest
import torch

from bayeskern.ops import philox
from bayeskern.ops.backend import kernels


def _u32(x):
    return torch.tensor([x], dtype=torch.int64)


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123 known-answer vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_matches_known_answer_vectors(counter, key, expected):
    words = philox.philox4x32(*(_u32(c) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def test_reference_words_match_triton_randint4x():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(out, seed, first, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        w0, w1, w2, w3 = tl.randint4x(seed, first + idx.to(tl.int64))
        tl.store(out + idx * 4, w0.to(tl.int64))
        tl.store(out + idx * 4 + 1, w1.to(tl.int64))
        tl.store(out + idx * 4 + 2, w2.to(tl.int64))
        tl.store(out + idx * 4 + 3, w3.to(tl.int64))

    seed, first_block = 0x123456789AB, 5_000_000_000
    out = torch.zeros(4 * 64, dtype=torch.int64)
    randint4x_kernel[(1,)](out, seed, first_block, BLOCK=64)
    expected = philox.random_words(seed, 4 * first_block, 4 * 64)
    assert torch.equal(out, expected)


def test_offsets_address_one_stream():
    full = philox.normal(11, 0, 101)
    for start in (1, 3, 4, 37):
        assert torch.equal(philox.normal(11, start, 101 - start), full[start:])
    assert torch.equal(philox.uniform(11, 2, 50), philox.uniform(11, 0, 52)[2:])


@pytest.mark.parametrize("numel, offset, stream", [(1, 0, 0), (7, 3, 0), (65, 5, 1), (1000, 2**33 + 2, 2**40 + 3)])
def test_backend_noise_matches_reference(kernel_backend, device, numel, offset, stream):
    ns = kernels(kernel_backend)
    normal = ns.fill_normal_(torch.empty(numel, device=device), 1234, offset, stream)
    uniform = ns.fill_uniform_(torch.empty(numel, device=device), 1234, offset, stream)
    assert torch.equal(uniform.cpu(), philox.uniform(1234, offset, numel, stream))
    torch.testing.assert_close(normal.cpu(), philox.normal(1234, offset, numel, stream), rtol=1e-5, atol=2e-6)


def test_normal_statistics():
    n = 400_000
    eps = philox.normal(2024, 0, n).double()
    se = 1 / n**0.5
    assert abs(eps.mean().item()) < 5 * se
    assert abs(eps.var().item() - 1) < 5 * 2**0.5 * se
    assert abs(((eps - eps.mean()) ** 3).mean().item()) < 5 * 15**0.5 * se  # skewness
    assert abs((eps**4).mean().item() - 3) < 5 * 96**0.5 * se  # kurtosis
    for lag in (1, 2, 3, 4):  # neighbours within and across Philox blocks are uncorrelated
        corr = torch.corrcoef(torch.stack([eps[:-lag], eps[lag:]]))[0, 1].item()
        assert abs(corr) < 5 * se
    tail = (eps.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026998) < 5 * (0.0027 / n) ** 0.5


def test_uniform_statistics():
    n = 400_000
    u = philox.uniform(7, 0, n).double()
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    chi2 = ((counts - n / 20) ** 2 / (n / 20)).sum().item()
    assert chi2 < 50  # 19 degrees of freedom: P(chi2 > 50) < 2e-4


def test_different_seeds_and_streams_differ():
    a = philox.normal(1, 0, 1000)
    assert not torch.equal(a, philox.normal(2, 0, 1000))
    assert not torch.equal(a, philox.normal(1, 0, 1000, stream=1))
    corr = torch.corrcoef(torch.stack([a, philox.normal(2, 0, 1000)]))[0, 1].item()
    assert abs(corr) < 0.15


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(offset=-5), dict(seed=2**63)])
def test_bad_keys_raise(bad):
    args = dict(seed=0, offset=0) | bad
    with pytest.raises(ValueError, match=r"seed|offset"):
        philox.normal(args["seed"], args["offset"], 4)
