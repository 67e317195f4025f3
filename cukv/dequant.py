"""Padded cache dequantize: ``cukv.dequantize_cache`` (SPEC §6) and the physical-layout variant behind
FBGEMM's ``dequantize_fp8_cache`` / ``dequantize_int4_cache`` (SPEC §10.2).

Kernel: ``cuda_src/dequant.cu`` (one pass, every output element written, 16-byte stores).
Reference: :mod:`cukv.ref.dequant`.
"""
from __future__ import annotations

import numpy as np

from . import _backend, _checks, _compile
from .codec import fmt_targs
from .formats import head_dim_from_row, parse_format
from .ref import dequant as ref

__all__ = ["dequantize_cache"]

_FMTS = ("bf16", "fp8", "fp8_head", "int4:g1", "int4:g2", "int4:g4", "int4:g8")
_DEQUANT = _compile.Family("dequant.cu", [
    _compile.expression("dequantize_cache_rows", *fmt_targs(f)) for f in _FMTS])
_THREADS = 256
ITERS = 4          # rows per thread, 1..4 (runtime; the bench sweeps it)
_MAX_ITERS = 4     # DQ_MAX_ITERS in dequant.cu
_MAX_GRID_Y = 65535
_MAX_D = 8192      # D/8 threads per row in one block dimension


def _geometry(op, cache_k, cache_v, fmt, qparam_k, qparam_v, block_tables, page_size):
    """Host checks shared by the dequantize ops; returns ``(geom, fmt)``."""
    fmt = _checks.cache_format(op, cache_k, fmt)
    kind, G = parse_format(fmt, op)
    if cache_v is None:
        _checks.fail(op, "cache_v", "a cache of the shape of cache_k", "None", TypeError)
    if cache_k.ndim != 4:
        _checks.fail(op, "cache_k", "a 4-d cache [B, MAX_T, N_KVH, R] or [1, P*S, N_KVH, R]",
                     _checks.describe(cache_k))
    external = kind == "fp8" and qparam_k is not None
    if kind == "fp8" and qparam_k is not None:
        _checks.check_dtype(op, "qparam_k", qparam_k, _checks.I32)
    D = head_dim_from_row(fmt, int(cache_k.shape[-1]), external)
    if D <= 0 or D % 8 or (kind == "int4" and D % (2 * G)) or D > _MAX_D:
        _checks.fail(op, "cache_k", f"a last axis R that is a {fmt!r} row of D <= {_MAX_D} elements "
                     f"with D % {2 * G if kind == 'int4' else 8} == 0", _checks.describe(cache_k))
    geom = _checks.check_cache(op, cache_k, cache_v, fmt, D, block_tables=block_tables,
                               page_size=page_size, qparam_k=qparam_k, qparam_v=qparam_v,
                               written=False)
    return geom, fmt


def _launch(geom, fmt, ck, cv, wk, wv, sk, sv, seqlens, bt, ok, ov, *, B, max_len, T, phys):
    """Launch ``dequantize_cache_rows`` over contiguous device arrays (see dequant.cu)."""
    xp = _backend.cupy()
    D, nkv = geom.D, geom.n_kv_heads
    if B == 0 or max_len == 0 or nkv == 0:
        return
    ck, cv = xp.ascontiguousarray(ck), xp.ascontiguousarray(cv)
    wk = xp.ascontiguousarray(wk) if wk is not None else None
    wv = xp.ascontiguousarray(wv) if wv is not None else None
    sk = xp.ascontiguousarray(sk) if sk is not None else None
    sv = xp.ascontiguousarray(sv) if sv is not None else None
    seqlens = xp.ascontiguousarray(seqlens)
    bt = xp.ascontiguousarray(bt) if bt is not None else None
    R_bytes = geom.R * ck.itemsize
    cal = 16 if geom.kind == "bf16" else 4
    vec = all(int(a.data.ptr) % cal == 0 for a in (ck, cv)) and \
        all(int(a.data.ptr) % 16 == 0 for a in (ok, ov))
    nch = D // 8
    rows = max(1, _THREADS // nch)
    n_rows = max_len * nkv
    iters = max(1, min(_MAX_ITERS, int(ITERS)))
    grid = (-(-n_rows // (rows * iters)), min(B, _MAX_GRID_Y), 2)
    S = geom.page_size
    shift = S.bit_length() - 1 if S & (S - 1) == 0 else -1
    k = _DEQUANT.kernel("dequantize_cache_rows", *fmt_targs(fmt))
    i32 = _compile.i32
    _compile.launch(k, grid, (nch, rows), (
        ck, cv, wk, wv, sk, sv, seqlens, bt, ok, ov, i32(B), i32(nkv), i32(D), _compile.i64(R_bytes),
        i32(geom.rows if not geom.paged else 0), i32(max_len), i32(T), i32(S), i32(shift),
        i32(bt.shape[1] if bt is not None else 0), i32(geom.n_pages), i32(geom.paged), i32(phys),
        i32(iters), i32(vec)))


@_backend.op("dequantize_cache", arrays=("cache_k", "cache_v", "seqlens", "qparam_k", "qparam_v",
                                         "block_tables", "out"))
def dequantize_cache(cache_k, cache_v, seqlens, fmt, *, qparam_k=None, qparam_v=None,
                     block_tables=None, page_size=64, max_len=None, out=None, validate=True):
    """Dequantize a K/V cache pair into zero-padded bfloat16 buffers.

    Parameters
    ----------
    cache_k, cache_v : uint8 ``[B, MAX_T, N_KVH, R]`` or paged ``[1, P*S, N_KVH, R]``
        Caches of format ``fmt`` (read only; any strides). ``bfloat16`` caches with ``fmt="bf16"`` are
        accepted too (an extension: a gather with zero padding).
    seqlens : int32 ``[B]``
        Rows per lane. A contiguous cache has ``cache.shape[0] == B``; a paged one takes ``B`` from
        ``block_tables``.
    fmt : str
        ``"fp8"`` (inline, or external with int32 ``qparam_k``/``qparam_v`` of ``cache.shape[:3]``),
        ``"fp8_head"`` (float32 scales ``[B, N_KVH]`` in ``qparam_k``/``qparam_v``), ``"int4:gG"``.
    block_tables : int32 ``[B, max_pages]``, optional
        Paged caches (SPEC §3); ``page_size`` rows per page.
    max_len : int, optional
        Rows of the output per lane; default ``capacity`` (``MAX_T`` or ``max_pages * page_size``).
    out : tuple of two bfloat16 ``[B, max_len, N_KVH, D]``, optional
        C-contiguous buffers to reuse; every element is overwritten.
    validate : bool
        Check ``seqlens`` in ``[0, min(capacity, max_len)]`` and every block-table entry of a page
        holding data in ``[0, P)`` (one synchronisation). With ``False`` lengths are clamped and a row
        behind an out-of-range page id reads as zeros; nothing is read out of bounds.

    Returns
    -------
    (k, v) : bfloat16 ``[B, max_len, N_KVH, D]``
        Row ``t < seqlens[b]`` is the dequantized logical row ``(b, t, h)``; **every other row is
        exactly +0.0** (no uninitialised memory anywhere).

    Raises
    ------
    TypeError
        Wrong dtype or array module, float8 ``ml_dtypes`` arrays.
    ValueError
        Shapes, ``fmt``, ``page_size``, ``max_len``, overlapping ``out``; with ``validate``, a length or
        a used page id out of range.

    Notes
    -----
    Values are those of :func:`cukv.dequantize` on each row (SPEC §2.3-§2.5), bit-exact with
    :func:`cukv.ref.dequant.dequantize_cache`. **cukv differs** from FBGEMM, which zero-fills only up
    to a multiple of 128 rows or to the page end and leaves the rest uninitialised.
    """
    op = "dequantize_cache"
    geom, fmt = _geometry(op, cache_k, cache_v, fmt, qparam_k, qparam_v, block_tables, page_size)
    B, nkv, D = geom.B, geom.n_kv_heads, geom.D
    _checks.check_array(op, "seqlens", seqlens, _checks.I32, (B,), f"int32 [B={B}]")
    if max_len is None:
        max_len = geom.capacity
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 0:
        _checks.fail(op, "max_len", "an integer >= 0 or None", repr(max_len))
    max_len = int(max_len)
    if max_len * nkv >= 2 ** 31:
        _checks.fail(op, "max_len", f"max_len * N_KVH < 2**31 (N_KVH={nkv})", str(max_len))
    T = min(geom.capacity, max_len)
    shape = (B, max_len, nkv, D)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            _checks.fail(op, "out", "a tuple (k_out, v_out)", type(out).__name__, TypeError)
        for j, o in enumerate(out):
            _checks.check_array(op, f"out[{j}]", o, _checks.BF16, shape,
                                f"bfloat16 [B={B}, max_len={max_len}, N_KVH={nkv}, D={D}]")
            _checks.check_c_contiguous(op, f"out[{j}]", o)
        _checks.check_no_overlap(op, {"out[0]": out[0], "out[1]": out[1]}, {
            "cache_k": cache_k, "cache_v": cache_v, "seqlens": seqlens, "qparam_k": qparam_k,
            "qparam_v": qparam_v, "block_tables": block_tables})
    be = _backend.current()
    xp = be.xp
    if validate:
        _checks.check_index_contents(op, "seqlens", seqlens, 0, T + 1,
                                     what=f"a length in [0, {T}] (capacity {geom.capacity}, "
                                          f"max_len {max_len})")
        if geom.paged:
            _checks.check_block_table_entries(op, block_tables,
                                              _checks.block_table_touched(xp, block_tables, seqlens, geom.page_size),
                                              geom.n_pages)
    if not be.gpu:
        return ref.dequantize_cache(cache_k, cache_v, seqlens, fmt, qparam_k=qparam_k,
                                    qparam_v=qparam_v, block_tables=block_tables,
                                    page_size=geom.page_size, max_len=max_len, out=out)
    ok, ov = out if out is not None else (xp.empty(shape, _checks.BF16), xp.empty(shape, _checks.BF16))
    words = geom.kind == "fp8" and qparam_k is not None
    _launch(geom, fmt, cache_k, cache_v, qparam_k if words else None, qparam_v if words else None,
            qparam_k if geom.kind == "fp8_head" else None, qparam_v if geom.kind == "fp8_head" else None,
            seqlens, block_tables, ok, ov, B=B, max_len=max_len, T=T, phys=0)
    return ok, ov


@_backend.op("dequantize_cache_physical", arrays=("cache_k", "cache_v", "seqlens", "qparam_k",
                                                  "qparam_v", "block_tables"))
def dequantize_cache_physical(cache_k, cache_v, seqlens, fmt, *, qparam_k=None, qparam_v=None,
                              block_tables=None, page_size=64, validate=True, op="dequantize_cache"):
    """FBGEMM's dequantize output layout (SPEC §10.2): the cache shape with the last axis set to ``D``.

    Contiguous: ``[B_KV, MAX_T, N_KVH, D]``, ``len(seqlens) <= B_KV``, lanes past ``len(seqlens)`` all
    zero. Paged: the physical ``[1, P*S, N_KVH, D]``; a row holds data iff some ``(b, t < seqlens[b])``
    maps to it (lanes ``b < len(seqlens) <= block_tables.shape[0]``), every other row is zero.
    Used by :mod:`cukv.fbgemm`; ``op`` names the caller in error messages.
    """
    geom, fmt = _geometry(op, cache_k, cache_v, fmt, qparam_k, qparam_v, block_tables, page_size)
    _checks.check_dtype(op, "kv_seqlen", seqlens, _checks.I32)
    if seqlens.ndim != 1 or seqlens.shape[0] > geom.B:
        _checks.fail(op, "kv_seqlen", f"int32 [n] with n <= {geom.B} lanes", _checks.describe(seqlens))
    n = int(seqlens.shape[0])
    be = _backend.current()
    xp = be.xp
    T = geom.capacity
    if T * geom.n_kv_heads >= 2 ** 31:
        _checks.fail(op, "cache_k", "capacity * N_KVH < 2**31", _checks.describe(cache_k))
    if validate:
        _checks.check_index_contents(op, "kv_seqlen", seqlens, 0, T + 1,
                                     what=f"a length in [0, {T}] (the cache capacity)")
        if geom.paged:
            _checks.check_block_table_entries(
                op, block_tables[:n], _checks.block_table_touched(xp, block_tables[:n], seqlens, geom.page_size),
                geom.n_pages)
    if not be.gpu:
        return ref.dequantize_cache_physical(cache_k, cache_v, seqlens, fmt, qparam_k=qparam_k,
                                             qparam_v=qparam_v, block_tables=block_tables,
                                             page_size=geom.page_size)
    shape = tuple(int(s) for s in cache_k.shape[:3]) + (geom.D,)
    words = geom.kind == "fp8" and qparam_k is not None
    wk, wv = (qparam_k, qparam_v) if words else (None, None)
    if geom.kind == "fp8_head":
        # scales are [B, N_KVH] of the table's lanes; a contiguous cache has B == B_KV
        sk, sv = qparam_k, qparam_v
    else:
        sk = sv = None
    if geom.paged:
        ok, ov = xp.zeros(shape, _checks.BF16), xp.zeros(shape, _checks.BF16)
        _launch(geom, fmt, cache_k, cache_v, wk, wv, sk, sv, seqlens, block_tables, ok, ov,
                B=n, max_len=T, T=T, phys=1)
    else:
        lens = xp.zeros(geom.B, np.int32)
        lens[:n] = seqlens
        ok, ov = xp.empty(shape, _checks.BF16), xp.empty(shape, _checks.BF16)
        _launch(geom, fmt, cache_k, cache_v, wk, wv, sk, sv, lens, None, ok, ov,
                B=geom.B, max_len=T, T=T, phys=0)
    return ok, ov
