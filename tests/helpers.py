"""Helpers shared by every cukv test file (import them: ``from helpers import ...``).

``tests/`` is on ``sys.path`` under pytest (rootdir-relative ``conftest.py``), so test modules import
this file as ``helpers``. Nothing here imports CuPy at module level: functions that need it take the
array module ``xp`` (the ``xp`` / ``gpu`` fixtures of ``conftest.py``) or look at the array itself.

Contents
--------
Data
    :func:`activations` (bf16 ``N(0,1)`` plus outlier rows, SPEC §11), :func:`strided_copy`
    (non-contiguous view with the same values), :func:`misaligned_copy` (same values at a base address
    that is *not* 16-byte aligned, to reach the scalar kernel paths), :func:`to_host`, :func:`to_device`.
Poison and guard bands (SPEC §11)
    :func:`poison` / :func:`poisoned` (NaN or ``0xA5`` bytes), :func:`guarded` + :func:`check_guard`
    (an output inside a larger poisoned buffer: nothing outside it may change),
    :func:`assert_fully_written` (run an op twice with two different poisons: equal bytes prove every
    byte was written).
Comparison (SPEC §11.1)
    :func:`assert_bytes_equal` (0-budget paths; NaN == NaN whatever its bits), :func:`compare_flips` and
    :func:`assert_flips` (mismatches must each be a *one-step flip* and stay within a budget),
    :func:`flip_budget` (``ceil(rate * n)``), :func:`assert_within_rel` (SPEC §11.2 bounds).
Errors (SPEC §1.4)
    :func:`raises_arg`: ``pytest.raises`` that also checks the message names the op and the argument.
"""
from __future__ import annotations

import math
import re

import ml_dtypes
import numpy as np
import pytest

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
POISON_BYTE = 0xA5
POISON_BYTE_ALT = 0x5A

__all__ = [
    "BF16", "F16", "F32", "POISON_BYTE", "POISON_BYTE_ALT",
    "is_cupy", "module_of", "to_host", "to_device", "activations", "strided_copy", "misaligned_copy",
    "poison", "poisoned", "guarded", "check_guard", "assert_fully_written",
    "flip_budget", "assert_bytes_equal", "compare_flips", "assert_flips", "assert_within_rel",
    "raises_arg",
]


# ----------------------------------------------------------------------------------- modules
def is_cupy(a) -> bool:
    """True for a ``cupy.ndarray`` (never imports CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy"


def module_of(a):
    """``numpy`` or ``cupy``: the module an array lives in."""
    if is_cupy(a):
        import cupy  # noqa: PLC0415

        return cupy
    return np


def to_host(a):
    """A NumPy copy/view of ``a`` (CuPy arrays are copied with ``.get()``; NumPy passes through).

    Tuples and lists are converted element by element; ``None`` stays ``None``.
    """
    if a is None:
        return None
    if isinstance(a, (tuple, list)):
        return type(a)(to_host(v) for v in a)
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def to_device(xp, a):
    """``a`` (a NumPy array) in module ``xp``; for ``xp is numpy`` a copy, so tests may mutate it."""
    if xp is np:
        return np.array(a, copy=True)
    return xp.asarray(a)


# ----------------------------------------------------------------------------------- data
def activations(rng: np.random.Generator, shape, dtype=BF16, *, outliers: bool = True,
                scale: float = 1.0) -> np.ndarray:
    """Host activations ``N(0, scale^2)`` rounded to ``dtype`` (default bf16), never zeros.

    With ``outliers`` (and more than one row) a few rows are scaled by large and small factors
    (x 100, x 1e-3) and one element per such row is a spike, so range-dependent code paths
    (fp8 scale, INT4 groups, rms of small rows) are exercised (SPEC §11).
    """
    shape = tuple(int(s) for s in shape)
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    if outliers and x.ndim >= 1 and x.size:
        rows = x.reshape(-1, shape[-1]) if shape[-1] else x.reshape(-1, 1)
        n = rows.shape[0]
        if n >= 2:
            pick = rng.choice(n, size=max(1, n // 16), replace=False)
            for j, r in enumerate(pick):
                rows[r] *= np.float32(100.0 if j % 2 == 0 else 1e-3)
                rows[r, rng.integers(rows.shape[1])] *= np.float32(8.0)
        x = rows.reshape(shape)
    return x.astype(dtype)


def strided_copy(xp, a, *, how: str = "pad"):
    """A non-contiguous view holding the same values as ``a`` (``a`` is host data).

    ``how="pad"``: rows of a wider buffer (last-axis stride 1, row stride > N), i.e. a slice of a fused
    buffer; ``how="step"``: every other element of the last axis (last-axis stride 2);
    ``how="transpose"``: a transposed copy transposed back (Fortran order, ndim >= 2).
    Sentinel values fill the parts of the buffer that are not in the view.
    """
    a = np.asarray(a)
    if how == "pad":
        buf = np.full(a.shape[:-1] + (a.shape[-1] + 24,), np.nan if a.dtype.kind == "f" or a.dtype == BF16
                      else POISON_BYTE, dtype=a.dtype)
        buf[..., 8:8 + a.shape[-1]] = a
        d = to_device(xp, buf)
        v = d[..., 8:8 + a.shape[-1]]
    elif how == "step":
        buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        buf[..., ::2] = a
        d = to_device(xp, buf)
        v = d[..., ::2]
    elif how == "transpose":
        if a.ndim < 2:
            raise ValueError("strided_copy(how='transpose') needs ndim >= 2")
        d = to_device(xp, np.ascontiguousarray(a.T))
        v = d.T
    else:
        raise ValueError(f"strided_copy: unknown how={how!r}")
    if a.size > 1 and v.flags.c_contiguous:
        raise AssertionError("strided_copy produced a contiguous view")
    return v


def misaligned_copy(xp, a, offset_bytes: int | None = None):
    """C-contiguous copy of ``a`` whose base address is ``offset_bytes`` past a 16-byte boundary.

    Default offset: one element (``a.itemsize``), which defeats 16-byte vector paths while keeping
    element alignment. The view is carved out of a larger uint8 buffer.
    """
    a = np.ascontiguousarray(np.asarray(a))
    off = a.itemsize if offset_bytes is None else int(offset_bytes)
    if off % a.itemsize:
        raise ValueError("misaligned_copy: offset must be a multiple of the item size")
    raw = xp.zeros(a.nbytes + 64, dtype=np.uint8)
    ptr = int(raw.data.ptr) if is_cupy(raw) else raw.__array_interface__["data"][0]
    start = (-ptr) % 16 + off
    view = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    view[...] = to_device(xp, a) if xp is not np else a
    return view


# ----------------------------------------------------------------------------------- poison
def _byte_view(a):
    if not a.flags.c_contiguous:
        raise ValueError("poison: array must be C-contiguous")
    return a.reshape(-1).view(np.uint8)


def poison(a, fill="bytes"):
    """Fill ``a`` in place with a sentinel and return it.

    ``fill="bytes"``: every byte ``0xA5`` (or pass an int byte value); ``fill="nan"``: NaN (float
    dtypes only, bf16 included).
    """
    if fill == "nan":
        if not (a.dtype.kind == "f" or a.dtype == BF16):
            raise ValueError(f"poison: NaN fill needs a float dtype, got {a.dtype}")
        a[...] = np.nan
        return a
    byte = POISON_BYTE if fill == "bytes" else int(fill)
    if a.size:
        _byte_view(a)[...] = byte
    return a


def poisoned(xp, shape, dtype, fill="bytes"):
    """A new C-contiguous array of ``shape``/``dtype`` in ``xp`` filled with :func:`poison`."""
    return poison(xp.empty(tuple(shape), dtype=dtype), fill)


def guarded(xp, shape, dtype, *, guard: int = 64, fill="bytes"):
    """``(buffer, view)``: a C-contiguous ``view`` of ``shape`` inside a poisoned flat ``buffer`` with
    ``guard`` sentinel elements before and after it. After the op, :func:`check_guard` verifies that
    nothing outside ``view`` changed.
    """
    n = int(np.prod(shape, dtype=np.int64))
    buf = poisoned(xp, (n + 2 * guard,), dtype, fill)
    return buf, buf[guard:guard + n].reshape(tuple(shape))


def check_guard(buffer, view, fill="bytes", *, guard: int = 64) -> None:
    """Assert the ``guard`` elements on both sides of ``view`` in ``buffer`` still hold the sentinel."""
    h = to_host(buffer)
    n = int(np.prod(view.shape, dtype=np.int64))
    for name, part in (("before", h[:guard]), ("after", h[guard + n:])):
        want = poison(np.empty(part.shape, part.dtype), fill)
        assert_bytes_equal(part, want, what=f"guard band {name} the output")


def assert_fully_written(run, make_out, *, fills=("bytes", POISON_BYTE_ALT)):
    """Prove an op writes every byte of its output.

    ``make_out(fill)`` returns a fresh output poisoned with ``fill``; ``run(out)`` runs the op into it
    and returns the written array (``out`` itself or a result). The op runs once per fill; since the op
    is deterministic (SPEC §1.5) the results are byte-equal iff no byte kept its sentinel. Returns the
    host copy of the first result.
    """
    results = [to_host(run(make_out(f))) for f in fills]
    for r in results[1:]:
        assert_bytes_equal(r, results[0], what="outputs with different poisons (an unwritten element?)",
                           nan_equal=False)
    return results[0]


# ----------------------------------------------------------------------------------- comparison
def flip_budget(n: int, rate: float) -> int:
    """``ceil(rate * n)`` allowed one-step flips among ``n`` compared values (SPEC §11.1)."""
    return int(math.ceil(rate * int(n) - 1e-12))


def _bits(a) -> np.ndarray:
    a = np.ascontiguousarray(to_host(a))
    if a.dtype.itemsize == 1:
        return a.view(np.uint8)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _nan_mask(a) -> np.ndarray | None:
    if a.dtype.kind == "f" or a.dtype == BF16:
        return np.isnan(a.astype(np.float64))
    return None


def _fmt_index(shape, flat: int) -> str:
    return str(tuple(int(i) for i in np.unravel_index(flat, shape))) if shape else "()"


def assert_bytes_equal(got, want, *, what: str = "output", nan_equal: bool = True) -> None:
    """Byte-exact comparison (0-budget paths of SPEC §11.1).

    Shapes and dtypes must match. With ``nan_equal`` (the SPEC rule) a NaN equals any NaN whatever its
    sign or payload; otherwise bytes must be identical. The message gives the mismatch count and the
    first few indices with both values.
    """
    g = to_host(got)
    w = to_host(want)
    assert g.shape == w.shape, f"{what}: shape {g.shape} != expected {w.shape}"
    assert g.dtype == w.dtype, f"{what}: dtype {g.dtype} != expected {w.dtype}"
    bad = _bits(g) != _bits(w)
    if nan_equal:
        gn, wn = _nan_mask(g), _nan_mask(w)
        if gn is not None:
            bad &= ~(gn & wn)
    nbad = int(bad.sum())
    if nbad:
        idx = np.flatnonzero(bad.ravel())[:5]
        gf, wf = g.ravel(), w.ravel()
        ex = "; ".join(f"{_fmt_index(g.shape, i)}: got {gf[i]!r} ({_bits(gf[i:i+1])[0]:#x}) "
                       f"want {wf[i]!r} ({_bits(wf[i:i+1])[0]:#x})" for i in idx)
        raise AssertionError(f"{what}: {nbad} of {g.size} elements differ; first: {ex}")


def _ordinal_signmag(bits: np.ndarray, sign_bit: int) -> np.ndarray:
    """Ordinal of a sign-magnitude encoding: adjacent values differ by 1; +0 and -0 are both 0."""
    b = bits.astype(np.int64)
    mag = b & ((1 << sign_bit) - 1)
    return np.where((b >> sign_bit) & 1, -mag, mag)


_KINDS = ("e4m3", "int4", "bf16", "f16")


def compare_flips(got, want, kind: str) -> tuple[int, int, np.ndarray]:
    """Compare codes or values and classify mismatches (SPEC §11.1).

    ``kind``:
      * ``"e4m3"``: uint8 e4m3fn codes; a one-step flip is a code adjacent in the e4m3fn value order
        (``+-0`` adjacent to ``+-2^-9``; ``+0`` vs ``-0`` counts as a one-step mismatch). NaN codes
        (0x7F/0xFF) equal each other and never flip to a number.
      * ``"int4"``: uint8 bytes of packed nibbles, compared per nibble; a flip is a nibble off by 1.
        ``n`` counts nibbles.
      * ``"bf16"`` / ``"f16"``: bfloat16 / float16 values (or their uint16 bits); a flip is one ulp in
        the value order (``+0 == -0`` apart; NaN equals NaN; NaN vs number is never a flip).

    Returns ``(n_mismatch, n_bad, mask)``: all mismatches, those that are *not* one-step flips, and the
    boolean mismatch mask (per nibble for int4: shape ``[..., 2*R]``).
    """
    if kind not in _KINDS:
        raise ValueError(f"compare_flips: kind must be one of {_KINDS}, got {kind!r}")
    g = to_host(got)
    w = to_host(want)
    if g.shape != w.shape:
        raise AssertionError(f"shape {g.shape} != expected {w.shape}")
    if kind == "int4":
        gb, wb = _bits(g).astype(np.int64), _bits(w).astype(np.int64)
        gn = np.stack([gb & 0xF, gb >> 4], axis=-1).reshape(gb.shape[:-1] + (-1,))
        wn = np.stack([wb & 0xF, wb >> 4], axis=-1).reshape(wb.shape[:-1] + (-1,))
        mis = gn != wn
        bad = mis & (np.abs(gn - wn) != 1)
        return int(mis.sum()), int(bad.sum()), mis
    if kind == "e4m3":
        gb, wb = _bits(g).astype(np.int64), _bits(w).astype(np.int64)
        gnan, wnan = (gb & 0x7F) == 0x7F, (wb & 0x7F) == 0x7F
        go, wo = _ordinal_signmag(gb, 7), _ordinal_signmag(wb, 7)
    else:
        gb, wb = _bits(g).astype(np.int64), _bits(w).astype(np.int64)
        exp_mask, man_mask = (0x7F80, 0x7F) if kind == "bf16" else (0x7C00, 0x3FF)
        gnan = ((gb & exp_mask) == exp_mask) & ((gb & man_mask) != 0)
        wnan = ((wb & exp_mask) == exp_mask) & ((wb & man_mask) != 0)
        go, wo = _ordinal_signmag(gb, 15), _ordinal_signmag(wb, 15)
    mis = (gb != wb) & ~(gnan & wnan)
    if kind != "e4m3":
        mis &= go != wo            # +0 / -0 compare equal as values
    step1 = (np.abs(go - wo) <= 1) & ~gnan & ~wnan
    bad = mis & ~step1
    return int(mis.sum()), int(bad.sum()), mis


def assert_flips(got, want, kind: str, budget: int, *, what: str = "output") -> int:
    """Assert every mismatch is a one-step flip and there are at most ``budget`` of them.

    ``budget=0`` makes this a value-exact check of the given kind. Returns the mismatch count, so a
    test can report it.
    """
    nmis, nbad, mask = compare_flips(got, want, kind)
    if nbad or nmis > budget:
        g, w = to_host(got), to_host(want)
        idx = np.flatnonzero(mask.ravel())[:5]
        if kind == "int4":
            ex = ", ".join(_fmt_index(mask.shape, i) for i in idx)
            detail = f"first nibbles at {ex}"
        else:
            gf, wf = _bits(g).ravel(), _bits(w).ravel()
            detail = "first: " + "; ".join(f"{_fmt_index(g.shape, i)}: got {gf[i]:#x} want {wf[i]:#x}"
                                            for i in idx)
        raise AssertionError(
            f"{what}: {nmis} {kind} mismatches ({nbad} larger than one step), budget {budget} one-step "
            f"flips; {detail}")
    return nmis


def assert_within_rel(got, exact, rel: float, *, what: str = "output", atol: float = 0.0) -> None:
    """``|got - exact| <= rel * |exact| + atol`` elementwise (``exact`` is a float64 truth).

    NaN in ``exact`` must be NaN in ``got`` and vice versa; infinities must match exactly.
    """
    g = to_host(got).astype(np.float64)
    e = np.asarray(to_host(exact), dtype=np.float64)
    assert g.shape == e.shape, f"{what}: shape {g.shape} != expected {e.shape}"
    gn, en = np.isnan(g), np.isnan(e)
    if (gn != en).any():
        i = np.flatnonzero((gn != en).ravel())[0]
        raise AssertionError(f"{what}: NaN mismatch at {_fmt_index(g.shape, i)}: got {g.ravel()[i]} "
                             f"want {e.ravel()[i]}")
    with np.errstate(invalid="ignore"):
        err = np.abs(g - e)
        inf = np.isinf(e) | np.isinf(g)
        ok = gn | (inf & (g == e)) | (~inf & (err <= rel * np.abs(e) + atol))
    if not ok.all():
        bad = np.flatnonzero(~ok.ravel())
        i = bad[0]
        raise AssertionError(
            f"{what}: {bad.size} of {g.size} elements outside |err| <= {rel:g}*|exact| + {atol:g}; "
            f"first {_fmt_index(g.shape, i)}: got {g.ravel()[i]!r}, exact {e.ravel()[i]!r}")


# ----------------------------------------------------------------------------------- errors
def raises_arg(exc, op: str, arg: str, *more: str):
    """``pytest.raises(exc)`` whose message must start with ``"<op>: <arg>"`` (SPEC §1.4) and contain
    every string in ``more`` (e.g. ``"expected"``, ``"got"``)."""
    pattern = "^" + re.escape(f"{op}: {arg}") + "".join(f"(?s:.*){re.escape(m)}" for m in more)
    return pytest.raises(exc, match=pattern)
