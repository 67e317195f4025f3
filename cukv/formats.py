"""Cache formats (SPEC §2.1): format strings, row sizes and FP8/INT4 qparam words.

==========  ===========  ==================  =======================================
fmt         cache dtype  ``R`` (last axis)   qparams
==========  ===========  ==================  =======================================
bf16        bfloat16     ``D`` elements      none
fp8         uint8        ``D + 4``           fp16 scale, fp16 shift at the row front
fp8 (ext.)  uint8        ``D``               int32 word per row: bits 0-15 scale, 16-31 shift
fp8_head    uint8        ``D``               float32 ``[B, N_KVH]`` per (lane, KV head)
int4:gG     uint8        ``D/2 + 4G``        ``G`` words (scale, shift) at the row front
==========  ===========  ==================  =======================================
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FORMATS", "Format", "parse_format", "row_bytes", "head_dim_from_row",
           "pack_qparams", "unpack_qparams", "check_head_dim"]

FORMATS = ("bf16", "fp8", "fp8_head", "int4", "int4:g1", "int4:g2", "int4:g4", "int4:g8")
_KINDS = {"bf16": ("bf16", 0), "fp8": ("fp8", 0), "fp8_head": ("fp8_head", 0), "int4": ("int4", 1)}
for _g in (1, 2, 4, 8):
    _KINDS[f"int4:g{_g}"] = ("int4", _g)


@dataclass(frozen=True)
class Format:
    """A parsed format: ``kind`` in {"bf16", "fp8", "fp8_head", "int4"} and ``groups`` (INT4 only)."""

    kind: str
    groups: int = 0

    @property
    def name(self) -> str:
        return f"int4:g{self.groups}" if self.kind == "int4" else self.kind

    def row_bytes(self, D: int, external_qparams: bool = False) -> int:
        return row_bytes(self.name, D, external_qparams)


def parse_format(fmt: str, op: str = "parse_format", arg: str = "fmt") -> tuple[str, int]:
    """``"int4"`` -> ``("int4", 1)``; ``"fp8"`` -> ``("fp8", 0)``. Case-sensitive, no spaces."""
    if not isinstance(fmt, str):
        raise TypeError(f"{op}: {arg}: expected a format string (one of {', '.join(FORMATS)}), "
                        f"got {type(fmt).__name__}")
    try:
        return _KINDS[fmt]
    except KeyError:
        raise ValueError(f"{op}: {arg}: expected one of {', '.join(FORMATS)}, got {fmt!r}") from None


def as_format(fmt: str, op: str = "parse_format", arg: str = "fmt") -> Format:
    return Format(*parse_format(fmt, op, arg))


def check_head_dim(fmt: str, D: int, op: str = "row_bytes", arg: str = "D") -> None:
    """The row codec takes any ``D % 8 == 0``; ``int4:gG`` also needs ``D % (2G) == 0``."""
    kind, g = parse_format(fmt, op)
    D = int(D)
    if D <= 0 or D % 8:
        raise ValueError(f"{op}: {arg}: expected a head dimension D > 0 with D % 8 == 0, got {D}")
    if kind == "int4" and D % (2 * g):
        raise ValueError(f"{op}: {arg}: expected D % {2 * g} == 0 for {fmt!r}, got D={D}")


def row_bytes(fmt: str, D: int, external_qparams: bool = False) -> int:
    """Last-axis length ``R`` of one cache row: bytes for uint8 formats, elements for bf16."""
    kind, g = parse_format(fmt, "row_bytes")
    check_head_dim(fmt, D)
    if external_qparams and kind != "fp8":
        raise ValueError(f"row_bytes: external_qparams: expected False for {fmt!r} "
                         "(only 'fp8' has external qparams), got True")
    if kind in ("bf16", "fp8_head"):
        return D
    if kind == "fp8":
        return D if external_qparams else D + 4
    return D // 2 + 4 * g


def head_dim_from_row(fmt: str, R: int, external_qparams: bool = False) -> int:
    """Inverse of :func:`row_bytes`: ``D`` for a row of ``R`` bytes (elements for bf16)."""
    kind, g = parse_format(fmt, "head_dim_from_row")
    if kind in ("bf16", "fp8_head") or (kind == "fp8" and external_qparams):
        D = R
    elif kind == "fp8":
        D = R - 4
    else:
        D = 2 * (R - 4 * g)
    return D


def pack_qparams(scale, shift):
    """fp16 ``scale``/``shift`` arrays -> int32 words (bits 0-15 scale, bits 16-31 shift).

    Works for NumPy and CuPy arrays alike (bit operations only).
    """
    s = scale.astype(np.float16).view(np.uint16).astype(np.uint32)
    z = shift.astype(np.float16).view(np.uint16).astype(np.uint32)
    return (s | (z << 16)).view(np.int32)


def unpack_qparams(words):
    """int32 words -> (scale, shift) as float16 arrays."""
    w = words.view(np.uint32)
    s = (w & 0xFFFF).astype(np.uint16).view(np.float16)
    z = (w >> 16).astype(np.uint16).view(np.float16)
    return s, z
