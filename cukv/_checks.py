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


# ------------------------------------------------------------------------------------ KV caches
class CacheGeom:
    """What :func:`check_cache` learned about a K/V cache pair (SPEC §2.1, §3).

    Attributes: ``fmt`` (format string), ``kind``, ``groups``, ``D``, ``R``, ``n_kv_heads``,
    ``paged``, ``B`` (lanes: ``cache.shape[0]``, or ``block_tables.shape[0]`` when paged),
    ``capacity`` (``MAX_T``, or ``max_pages * page_size``), ``page_size``, ``n_pages`` (``P``, paged),
    ``rows`` (``cache.shape[1]``), ``external`` (fp8 words in ``qparam_k``/``qparam_v``).
    """

    __slots__ = ("fmt", "kind", "groups", "D", "R", "n_kv_heads", "paged", "B", "capacity",
                 "page_size", "n_pages", "rows", "external")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def __repr__(self):
        return "CacheGeom(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def cache_format(op: str, cache, fmt, arg: str = "cache_k") -> str:
    """The format of a cache: ``fmt`` if given, else ``"bf16"`` for a bfloat16 cache.

    uint8 caches need ``fmt`` because row sizes are ambiguous (SPEC §2.1).
    """
    from .formats import parse_format  # noqa: PLC0415

    if fmt is not None:
        kind, _ = parse_format(fmt, op)
        want = BF16 if kind == "bf16" else U8
        check_dtype(op, arg, cache, want)
        return fmt
    if cache.dtype == BF16:
        return "bf16"
    if cache.dtype == U8:
        raise ValueError(f"{op}: fmt: expected a format string for a uint8 cache (row sizes are "
                         f"ambiguous, e.g. 'fp8' with D=64 and 'int4' with D=128 both give 68 bytes), "
                         f"got None for {arg} {describe(cache)}")
    fail(op, arg, "bfloat16 or uint8", describe(cache), TypeError)


def check_cache(op: str, cache_k, cache_v, fmt, D: int, *, block_tables=None, page_size: int = 64,
                qparam_k=None, qparam_v=None, written: bool = True,
                scales_required: bool = True) -> CacheGeom:
    """Validate a K/V cache pair (host-side checks only) and return its :class:`CacheGeom`.

    ``cache_v`` may be None (K only). ``qparam_k``/``qparam_v``: int32 ``cache.shape[:3]`` for external
    ``fp8``; float32 ``[B, N_KVH]`` for ``fp8_head`` (required there); None otherwise. ``written``:
    caches (and qparams) must be C-contiguous. ``scales_required=False``: ``fp8_head`` caches may come
    without scales (ops that only address the cache, e.g. Q-only ``quantize_qkv_per_head``).
    """
    from .formats import parse_format, row_bytes  # noqa: PLC0415

    fmt = cache_format(op, cache_k, fmt)
    kind, g = parse_format(fmt, op)
    if cache_v is not None:
        check_dtype(op, "cache_v", cache_v, cache_k.dtype)
    external = kind == "fp8" and qparam_k is not None
    R = row_bytes(fmt, D, external) if D > 0 and D % 8 == 0 else None
    if R is None:
        fail(op, "D", "a head dimension with D % 8 == 0", str(D))
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
        fail(op, "page_size", "an integer >= 1", repr(page_size))
    page_size = int(page_size)
    paged = block_tables is not None
    unit = "elements" if kind == "bf16" else "bytes"
    if paged:
        shape = (1, None, None, R)
        what = f"[1, P*{page_size}, N_KVH, {R}] ({R} {unit} per row for fmt {fmt!r} and D={D})"
    else:
        shape = (None, None, None, R)
        what = f"[B, MAX_T, N_KVH, {R}] ({R} {unit} per row for fmt {fmt!r} and D={D})"
    dt = BF16 if kind == "bf16" else U8
    check_array(op, "cache_k", cache_k, dt, shape, what)
    if cache_v is not None and tuple(cache_v.shape) != tuple(cache_k.shape):
        fail(op, "cache_v", f"the shape of cache_k {describe(cache_k)}", describe(cache_v))
    if written:
        check_c_contiguous(op, "cache_k", cache_k)
        if cache_v is not None:
            check_c_contiguous(op, "cache_v", cache_v)
    rows, n_kv = int(cache_k.shape[1]), int(cache_k.shape[2])
    n_pages = 0
    if paged:
        if rows % page_size:
            fail(op, "cache_k", f"shape[1] a multiple of page_size={page_size}", describe(cache_k))
        n_pages = rows // page_size
        check_dtype(op, "block_tables", block_tables, I32)
        if block_tables.ndim != 2:
            fail(op, "block_tables", "int32 [B, max_pages]", describe(block_tables))
        B = int(block_tables.shape[0])
        capacity = int(block_tables.shape[1]) * page_size
    else:
        B, capacity = int(cache_k.shape[0]), rows
    for name, qp in (("qparam_k", qparam_k), ("qparam_v", qparam_v)):
        if kind == "fp8" and qp is not None:
            check_array(op, name, qp, I32, tuple(cache_k.shape[:3]),
                        f"int32 {list(cache_k.shape[:3])} (external fp8 qparams, cache.shape[:3])")
        elif kind == "fp8_head":
            if qp is None:
                if (name == "qparam_v" and cache_v is None) or not scales_required:
                    continue
                fail(op, name, f"float32 [B={B}, N_KVH={n_kv}] scales for fmt 'fp8_head'", "None")
            check_array(op, name, qp, F32, (B, n_kv), f"float32 [B={B}, N_KVH={n_kv}]")
        elif qp is not None:
            fail(op, name, f"None for fmt {fmt!r}", describe(qp))
        if qp is not None and written:
            check_c_contiguous(op, name, qp)
    if kind == "fp8" and (qparam_k is None) != (qparam_v is None) and cache_v is not None:
        fail(op, "qparam_v", "external qparams for both caches or for neither",
             "None" if qparam_v is None else describe(qparam_v))
    return CacheGeom(fmt=fmt, kind=kind, groups=g, D=int(D), R=R, n_kv_heads=n_kv, paged=paged, B=B,
                     capacity=capacity, page_size=page_size, n_pages=n_pages, rows=rows,
                     external=external)


def check_block_table_entries(op: str, block_tables, touched, n_pages: int,
                              arg: str = "block_tables") -> None:
    """Every block-table entry with ``touched`` True lies in ``[0, n_pages)`` (``validate=True`` only).

    ``touched``: bool ``[B, max_pages]`` of the same module, the entries the op reads. One reduction
    and one host copy of a flag (CuPy synchronises). Reports the first offending ``[b, page]``.
    """
    if block_tables.size == 0:
        return
    bad = touched & ((block_tables < 0) | (block_tables >= n_pages))
    if not bool(bad.any()):
        return
    bad_h = bad.get() if _backend.is_cupy(bad) else np.asarray(bad)
    bt_h = block_tables.get() if _backend.is_cupy(block_tables) else np.asarray(block_tables)
    i = np.unravel_index(first_bad_index(bad_h.ravel()), bad_h.shape)
    fail(op, f"{arg}[{int(i[0])}, {int(i[1])}]",
         f"a page id in [0, {n_pages}) (the entry is used by the call)", str(int(bt_h[i])))


def valid_tokens_arg(op: str, v):
    """``valid_tokens`` (SPEC §5.1): ``None``, a Python/NumPy int, or a 1-element int32/int64 array of
    the call's module (graph-capturable); returned as is (ints as ``int``). Bools are rejected."""
    if v is None:
        return None
    want = "an int or a 1-element int32/int64 array"
    if isinstance(v, (bool, np.bool_)):
        fail(op, "valid_tokens", want, "bool", TypeError)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if not hasattr(v, "dtype"):
        fail(op, "valid_tokens", want, type(v).__name__, TypeError)
    check_dtype(op, "valid_tokens", v, (I32, np.int64))
    if v.size != 1:
        fail(op, "valid_tokens", want, describe(v))
    return v


def aligned(a, n: int) -> bool:
    """True if the array's base address is a multiple of ``n`` bytes (vector paths are chosen on the
    host from this, SPEC §1.5)."""
    return int(a.data.ptr) % n == 0


def block_table_touched(xp, block_tables, lens, page_size: int):
    """bool ``[B, max_pages]``: the block-table entries lane ``b`` reads for ``lens[b]`` rows."""
    j = xp.arange(block_tables.shape[1], dtype=np.int64)[None, :]
    return j * int(page_size) < lens.astype(np.int64)[:, None]


def check_finite(op: str, arg: str, a) -> None:
    """``check_finite=True``: every element of float array ``a`` is finite (SPEC §1.4, §11.4).

    One reduction and one host copy of a flag (CuPy synchronises); on failure reports the first
    non-finite element's index and value.
    """
    if a is None or a.size == 0:
        return
    xp = np if isinstance(a, np.ndarray) else _backend.cupy()
    bad = ~xp.isfinite(a.astype(np.float32))
    if not bool(bad.any()):
        return
    bad_h = bad.get() if xp is not np else bad
    i = np.unravel_index(first_bad_index(bad_h.ravel()), a.shape)
    v = a[i]
    v = float(v.get() if xp is not np else v)
    fail(op, f"{arg}[{', '.join(str(int(j)) for j in i)}]", "a finite value (check_finite=True)", repr(v))
