"""The tensor table of the multi-tensor Triton kernels (one launch for every tensor of a list).

The launcher packs one int64 record per tensor: kernel-specific fields (addresses, ...) followed by
three shared ones, the Philox offset, the first Philox block ``q_first`` and the first program.  A
program covers QBLOCK Philox blocks of one tensor, a (QBLOCK, 4) tile of consecutive elements
(element j of a tensor placed at ``offset`` belongs to block (offset + j) // 4), and finds its record
by binary search over the first programs.
"""

import torch
import triton
import triton.language as tl

SHARED_FIELDS = 3  # offset, q_first, first program: the last fields of every record


@triton.jit
def field(records_ptr, index, k, RECORD: tl.constexpr):
    return tl.load(records_ptr + index * RECORD + k)


@triton.jit
def pointer(records_ptr, index, k, RECORD: tl.constexpr, DTYPE: tl.constexpr):
    """Field k of record ``index`` as a pointer to DTYPE."""
    return field(records_ptr, index, k, RECORD).to(tl.pointer_type(DTYPE))


@triton.jit
def find_tile(records_ptr, count, RECORD: tl.constexpr, QBLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """This program's record index, its Philox blocks q (QBLOCK,) and its tile's element indices
    j (QBLOCK, 4) relative to the tensor (valid where 0 <= j < n)."""
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0  # the last record whose first program is <= pid
    hi = lo + count - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        right = field(records_ptr, mid, RECORD - 1, RECORD) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    offset = field(records_ptr, lo, RECORD - 3, RECORD)
    first_program = field(records_ptr, lo, RECORD - 1, RECORD)
    q = field(records_ptr, lo, RECORD - 2, RECORD) + (pid - first_program) * QBLOCK + tl.arange(0, QBLOCK).to(tl.int64)
    j = (q * 4 - offset)[:, None] + tl.arange(0, 4)[None, :]
    return lo, q, j


def pack(
    fields: list[list[int]], sizes: list[int], offsets: list[int], qblock: int, device
) -> tuple[torch.Tensor, int, int]:
    """The table (records of non-empty tensors only), the number of programs and the binary search's
    step count.  ``fields[i]`` are tensor i's own fields, ``sizes[i]`` its numel."""
    records, programs = [], 0
    for own, n, offset in zip(fields, sizes, offsets):
        if n == 0:
            continue
        q_first = offset // 4
        records.append([*own, offset, q_first, programs])
        programs += triton.cdiv((offset + n - 1) // 4 - q_first + 1, qblock)
    table = torch.tensor(records, dtype=torch.int64).to(device) if records else None
    return table, programs, max(1, (len(records) - 1).bit_length())
