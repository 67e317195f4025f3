"""Argument validation shared by every op (SPEC §1.4).

Every check is ``if ...: raise``: ``TypeError`` for a wrong dtype or array type, ``ValueError`` for a
wrong shape, layout, value or range. Messages read
``"<op>: <arg>: expected <what>, got <what>"``. Nothing here reads device memory, except
:func:`check_index_contents`, which the ops call only under ``validate=True``.
"""
from __future__ import annotations

import numpy as np
import ml_dtypes

from . import _backend

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
I32 = np.dtype(np.int32)
U8 = np.dtype(np.uint8)
BOOL = np.dtype(np.bool_)

_DT_NAMES = {BF16: "bfloat16", F16: "float16", F32: "float32", I32: "int32", U8: "uint8",
             BOOL: "bool", np.dtype(np.int64): "int64", np.dtype(np.float64): "float64"}


def dtname(dt) -> str:
    dt = np.dtype(dt)
    return _DT_NAMES.get(dt, str(dt))


def describe(a) -> str:
    """``'uint8 [2, 4096, 8, 68]'``."""
    return f"{dtname(a.dtype)} [{', '.join(str(int(s)) for s in a.shape)}]"


def fail(op: str, arg: str, expected: str, got: str, exc=ValueError):
    raise exc(f"{op}: {arg}: expected {expected}, got {got}")


def check_dtype(op: str, arg: str, a, dtypes) -> None:
    """``a.dtype`` must be one of ``dtypes`` (``TypeError``)."""
    dtypes = [np.dtype(d) for d in (dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,))]
    if a.dtype not in dtypes:
        fail(op, arg, " or ".join(dtname(d) for d in dtypes), describe(a), TypeError)


def check_array(op: str, arg: str, a, dtypes, shape, what: str | None = None) -> None:
    """Check dtype and shape. ``shape`` is a tuple of ints, or ``None`` for any size on that axis.

    ``what`` is the human form of the expected shape, e.g. ``"[B_T, N_KVH, D]"``.
    """
    check_dtype(op, arg, a, dtypes)
    ok = a.ndim == len(shape) and all(s is None or int(s) == int(x) for s, x in zip(shape, a.shape))
    if not ok:
        dts = dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,)
        exp = what if what is not None else "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        fail(op, arg, f"{'/'.join(dtname(d) for d in dts)} {exp}", describe(a))


def check_c_contiguous(op: str, arg: str, a) -> None:
    """Written arrays (caches, qparams, amax, out) must be C-contiguous (SPEC §1.5)."""
    if not a.flags.c_contiguous:
        fail(op, arg, "a C-contiguous array (it is written in place)",
             f"strides {tuple(int(s) for s in a.strides)} for {describe(a)}")


def check_same_backend(op: str, arg: str, a, like) -> None:
    """Used for arrays a caller passes after dispatch (e.g. ``out``)."""
    if _backend.is_cupy(a) != _backend.is_cupy(like):
        fail(op, arg, "an array of the same module as the inputs", type(a).__module__, TypeError)


def byte_bounds(a) -> tuple[int, int]:
    """Half-open ``[lo, hi)`` address range an array's elements span (any strides)."""
    if _backend.is_cupy(a):
        base = int(a.data.ptr)
    else:
        base = int(a.__array_interface__["data"][0])
    if a.size == 0:
        return base, base
    lo = hi = base
    for n, s in zip(a.shape, a.strides):
        ext = (int(n) - 1) * int(s)
        if ext < 0:
            lo += ext
        else:
            hi += ext
    return lo, hi + a.itemsize


def check_no_overlap(op: str, written: dict, others: dict) -> None:
    """No written array may overlap any other argument (memory-range test, SPEC §1.4)."""
    items = [(n, a) for n, a in {**written, **others}.items() if a is not None and a.size > 0]
    bounds = {n: byte_bounds(a) for n, a in items}
    for wn, w in written.items():
        if w is None or w.size == 0:
            continue
        wlo, whi = bounds[wn]
        for n, _ in items:
            if n == wn:
                continue
            lo, hi = bounds[n]
            if wlo < hi and lo < whi:
                fail(op, wn, f"memory that overlaps no other argument (it is written)",
                     f"an array overlapping {n}")


def positive(op: str, arg: str, v, *, strict=True) -> None:
    if not (v > 0 if strict else v >= 0):
        fail(op, arg, "> 0" if strict else ">= 0", repr(v))


def first_bad_index(mask) -> int:
    """Index of the first True of a flat boolean host array, or -1."""
    idx = np.flatnonzero(np.asarray(mask))
    return int(idx[0]) if idx.size else -1


def check_index_contents(op: str, arg: str, a, lo: int, hi: int, *, allow: tuple = (),
                         what: str | None = None) -> None:
    """Every element of integer array ``a`` (numpy or cupy) lies in ``[lo, hi)`` or in ``allow``.

    On CuPy this is one small reduction plus one copy of a boolean flag to the host (it
    synchronises), so ops call it only under ``validate=True``.
    """
    if a.size == 0:
        return
    xp = np if isinstance(a, np.ndarray) else _backend.cupy()
    bad = (a < lo) | (a >= hi)
    for v in allow:
        bad &= a != v
    if not bool(bad.any()):
        return
    bad_h = bad.get() if xp is not np else bad
    a_h = a.get() if xp is not np else a
    i = np.unravel_index(first_bad_index(bad_h.ravel()), a.shape)
    allowed = "".join(f" or {v}" for v in allow)
    rng = what or f"in [{lo}, {hi}){allowed}"
    idx = ", ".join(str(int(j)) for j in i)
    fail(op, f"{arg}[{idx}]", rng, str(int(a_h[i])))
