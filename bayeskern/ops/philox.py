"""Counter-based noise: the executable specification every backend reproduces.

Philox 4x32-10 (Salmon et al., 2011) maps a 128-bit counter and a 64-bit key to four 32-bit
words.  bayeskern keys it as follows; the Triton kernels (``kernels/philox.py``) and the C++/CUDA
kernels (``csrc/philox.h``) implement exactly this layout:

* key ``(k0, k1) = (seed & 0xffffffff, seed >> 32)``;
* element ``j`` of a tensor placed at ``offset`` has global index ``g = offset + j``; it reads
  word ``g % 4`` of the Philox block with counter ``(q & 0xffffffff, q >> 32, stream & 0xffffffff,
  stream >> 32)``, ``q = g // 4``.  ``stream`` separates independent draws with the same seed and
  offsets (the SGLD step number); it is 0 for ``gaussian_sample`` and ``weight_dropout``.

Transforms of one 32-bit word ``w``:

* uniform ``u = (w >> 8) * 2**-24`` in [0, 1), exact in float32;
* normal: the words of a block pair up, ``(w0, w1)`` and ``(w2, w3)``.  With
  ``u1 = ((w0 >> 8) + 1) * 2**-24`` in (0, 1] and ``u2 = (w1 >> 8) * 2**-24``, Box-Muller gives
  ``n0 = r cos(2 pi u2)``, ``n1 = r sin(2 pi u2)``, ``r = sqrt(-2 log u1)`` (likewise n2, n3).
  The reference evaluates this in float64 and rounds once to float32; the kernels use float32
  polynomials with exact argument reduction (|error| < 1e-6).

These functions are plain PyTorch on int64 tensors (no uint32 arithmetic needed) and run on any
device; they are slow and meant as the reference and the fallback.
"""

from __future__ import annotations

import math

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
WEYL_INCREMENT = 0x9E3779B97F4A7C15
"""2^64 / golden ratio: ``(seed + k * WEYL_INCREMENT) mod 2^63`` spreads consecutive ``k`` (training calls,
ranks) over all 64 (and the low 32) bits of the seeds derived from one base seed."""
_MASK32 = 0xFFFFFFFF
_TWO_POW_M24 = 2.0**-24


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a uint32 constant and uint32 values in int64."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox 4x32 with 10 rounds on int64 tensors holding uint32 values."""
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def check_key(seed: int, offset: int, stream: int = 0) -> None:
    """Raise ValueError unless seed, offset and stream are integers in [0, 2**63)."""
    for name, value in (("seed", seed), ("offset", offset), ("stream", stream)):
        if not 0 <= value < 2**63:
            raise ValueError(f"{name} must be an integer in [0, 2**63), got {value}")


def seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """The seed as a 0-d int64 CPU tensor, the form the custom ops take (no recompiles per value)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex:
            raise ValueError(f"seed must be an integer or a one-element integer tensor, got {seed!r}")
        return seed.reshape(()).to(device="cpu", dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer or a one-element integer tensor, got {seed!r}")
    check_key(seed, 0)
    return torch.tensor(seed, dtype=torch.int64)


def _blocks(
    seed: int, offset: int, numel: int, stream: int, device: torch.device | str | None
) -> tuple[torch.Tensor, ...]:
    """The Philox words of every block touched by elements [offset, offset + numel)."""
    check_key(seed, offset, stream)
    first = offset // 4
    last = (offset + numel - 1) // 4
    q = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(q)
    return philox4x32(
        q & _MASK32,
        q >> 32,
        zeros + (stream & _MASK32),
        zeros + (stream >> 32),
        seed & _MASK32,
        (seed >> 32) & _MASK32,
    )


def _select(per_block: torch.Tensor, offset: int, numel: int) -> torch.Tensor:
    """From (blocks, 4) values laid out by global index, take elements [offset, offset+numel)."""
    start = offset % 4
    return per_block.reshape(-1)[start : start + numel]


def random_words(
    seed: int, offset: int, numel: int, stream: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The raw 32-bit word of each element (int64 tensor of length ``numel``)."""
    if numel == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    words = torch.stack(_blocks(seed, offset, numel, stream, device), dim=1)
    return _select(words, offset, numel)


def uniform(
    seed: int, offset: int, numel: int, stream: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniform noise in [0, 1), float32, exactly as every backend computes it."""
    words = random_words(seed, offset, numel, stream, device)
    return (words >> 8).to(torch.float32) * _TWO_POW_M24


def normal(
    seed: int, offset: int, numel: int, stream: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard normal noise, float32 (float64 Box-Muller rounded once)."""
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    w0, w1, w2, w3 = _blocks(seed, offset, numel, stream, device)

    def box_muller(w_radius: torch.Tensor, w_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u1 = ((w_radius >> 8) + 1).to(torch.float64) * _TWO_POW_M24
        angle = (w_angle >> 8).to(torch.float64) * (_TWO_POW_M24 * 2.0 * math.pi)
        radius = torch.sqrt(-2.0 * torch.log(u1))
        return radius * torch.cos(angle), radius * torch.sin(angle)

    n0, n1 = box_muller(w0, w1)
    n2, n3 = box_muller(w2, w3)
    per_block = torch.stack((n0, n1, n2, n3), dim=1).to(torch.float32)
    return _select(per_block, offset, numel)


def tensor_span(numel: int) -> int:
    """Elements of the counter space a tensor of ``numel`` elements takes: whole Philox blocks of 4,
    so that one block never straddles two tensors."""
    return -(-numel // 4) * 4


def named_offsets(shapes: dict[str, torch.Size]) -> dict[str, int]:
    """``tensor_offsets`` keyed by name: where each named tensor starts, in the mapping's order."""
    return dict(zip(shapes, tensor_offsets(list(shapes.values()))))


def tensor_offsets(shapes: list[torch.Size] | tuple[torch.Size, ...]) -> list[int]:
    """Where each of several tensors starts in the counter space: cumulative ``tensor_span``."""
    offsets, start = [], 0
    for shape in shapes:
        offsets.append(start)
        start += tensor_span(math.prod(shape))
    return offsets
