"""Triton kernel of ``sq_grad_accumulate`` for inputs with a position axis (T > 1).

``fisher[o, i] += sum_b (sum_t g[b, t, o] a[b, t, i])^2``.  A program owns one (BLOCK_O, BLOCK_I)
tile of ``fisher`` and a contiguous range of examples; for each example it accumulates the tile of
``G_b = g_b^T a_b`` over BLOCK_T positions at a time with ``tl.dot`` (float32 accumulator) and adds
its square to a register accumulator, so nothing of size ``B x out x in`` is ever written.  The
examples are split over ``SPLITS`` programs per tile (enough programs to fill the GPU); each writes
its partial sum to its own slice of a ``(SPLITS, out, in)`` buffer, which the launcher reduces in
a fixed order (deterministic, no atomics).  Inputs are read through their strides (an unfolded
convolution input needs no copy).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def sq_grad_tile_kernel(
    part_ptr,
    g_ptr,
    a_ptr,
    B,
    T,
    O,
    I,
    examples_per_split,
    sg_b,
    sg_t,
    sg_o,
    sa_b,
    sa_t,
    sa_i,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    split = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < O
    mask_i = offs_i < I
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    first = split.to(tl.int64) * examples_per_split  # int64 offsets: the loop index inherits it
    last = tl.minimum(first + examples_per_split, B)
    for b in range(first, last):
        g_base = g_ptr + b * sg_b
        a_base = a_ptr + b * sa_b
        tile = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            mask_t = t < T
            g = tl.load(
                g_base + offs_o[:, None] * sg_o + t[None, :] * sg_t, mask=mask_o[:, None] & mask_t[None, :], other=0.0
            )
            a = tl.load(
                a_base + t[:, None] * sa_t + offs_i[None, :] * sa_i, mask=mask_t[:, None] & mask_i[None, :], other=0.0
            )
            if DOT_F32:
                g = g.to(tl.float32)
                a = a.to(tl.float32)
            tile = tl.dot(g, a, tile, input_precision=PRECISION)
        total += tile * tile
    out = part_ptr + split.to(tl.int64) * O * I + offs_o[:, None] * I + offs_i[None, :]
    tl.store(out, total, mask=mask_o[:, None] & mask_i[None, :])


def _blocks(device: torch.device) -> tuple[int, int, int]:
    # the interpreter pays per element of every block, a GPU wants tensor-core-sized tiles
    return (64, 64, 32) if device.type == "cuda" else (16, 16, 16)


def _splits(tiles: int, batch: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(batch, triton.cdiv(programs, tiles)))


def sq_grad_accumulate(fisher: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``fisher (out, in) float32 += sum_b (g_b^T a_b)^2`` for ``g (B, T, out)``, ``a (B, T, in)``."""
    batch, positions, n_out = g.shape
    n_in = a.shape[2]
    if batch == 0 or fisher.numel() == 0:
        return fisher
    block_o, block_i, block_t = _blocks(g.device)
    tiles = triton.cdiv(n_out, block_o) * triton.cdiv(n_in, block_i)
    splits = _splits(tiles, batch, g.device)
    per_split = triton.cdiv(batch, splits)
    splits = triton.cdiv(batch, per_split)
    partial = torch.empty((splits, n_out, n_in), device=g.device, dtype=torch.float32)
    interpreted = g.device.type != "cuda"
    low_precision = g.dtype in (torch.float16, torch.bfloat16) and a.dtype == g.dtype
    dot_f32 = interpreted or not low_precision  # the interpreter has no bf16 dot; mixed dtypes go via fp32
    precision = "tf32" if (not interpreted and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(n_in, block_i), splits)
    sq_grad_tile_kernel[grid](
        partial,
        g,
        a,
        batch,
        positions,
        n_out,
        n_in,
        per_split,
        *g.stride(),
        *a.stride(),
        BLOCK_O=block_o,
        BLOCK_I=block_i,
        BLOCK_T=block_t,
        DOT_F32=dot_f32,
        PRECISION=precision,
    )
    return fisher.add_(partial.sum(0) if splits > 1 else partial[0])
