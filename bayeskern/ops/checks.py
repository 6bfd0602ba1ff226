"""Argument validation shared by the ops: clear ValueErrors naming the argument."""

from __future__ import annotations

from torch import Tensor


def check_same_layout(reference: Tensor, other: Tensor, ref_name: str, other_name: str) -> None:
    """Raise ValueError unless ``other`` matches ``reference`` in shape, dtype and device."""
    if not isinstance(other, Tensor):
        raise ValueError(f"{other_name} must be a tensor, got {type(other).__name__}")
    if other.shape != reference.shape:
        raise ValueError(f"{other_name} has shape {tuple(other.shape)} but {ref_name} has {tuple(reference.shape)}")
    if other.dtype != reference.dtype:
        raise ValueError(f"{other_name} has dtype {other.dtype} but {ref_name} has {reference.dtype}")
    if other.device != reference.device:
        raise ValueError(f"{other_name} is on {other.device} but {ref_name} is on {reference.device}")


def check_floating(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor")


def check_index(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {value!r}")
