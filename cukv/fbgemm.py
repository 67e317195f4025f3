"""FBGEMM-compatible layer (SPEC §10): FBGEMM gen_ai kv_cache ops under their own names.

Each function keeps FBGEMM's name, positional order, argument names and defaults, and maps onto the
native cukv API. Tensors become NumPy/CuPy arrays; FBGEMM's ``float8_e4m3fn`` tensors are ``uint8``.
Every function also takes keyword-only ``validate=True``, ``check_finite=False`` and
``cache_format=None`` (overrides the dispatch by cache dtype of SPEC §10).

Where FBGEMM is wrong or limited (SPEC §12), cukv does the correct thing; each docstring says where.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------------- writers
# (SPEC §10.1) rope_qkv_varseq_prefill, rope_qkv_decoding, nope_*, xpos_*

# ---------------------------------------------------------------------------------------- dequantizers
# (SPEC §10.2, §10.3) dequantize_fp8_cache, dequantize_int4_cache, quantize_qkv_per_head
import numpy as _np  # noqa: E402

from . import _backend as _be, _checks as _ck  # noqa: E402


def _fb_check_finite(op, arg, x):
    """``check_finite=True`` on an activation (SPEC §1.4)."""
    fn = getattr(_ck, "check_finite", None)
    if fn is not None:
        fn(op, arg, x)
        return
    xp = _np if isinstance(x, _np.ndarray) else _be.cupy()
    if x.size and not bool(xp.isfinite(x.astype(_np.float32)).all()):
        _ck.fail(op, arg, "finite values (check_finite=True)", "a NaN or infinity")


def _fb_fp8_format(op, cache_K, qparam_k, cache_format):
    if cache_format is not None:
        return cache_format
    if qparam_k is None:
        return "fp8"
    if qparam_k.dtype == _ck.I32:
        return "fp8"
    if qparam_k.dtype == _ck.F32:
        return "fp8_head"
    _ck.fail(op, "qparam_k", "int32 external fp8 qparams or float32 fp8_head scales",
             _ck.describe(qparam_k), TypeError)


@_be.op("dequantize_fp8_cache", arrays=("cache_K", "cache_V", "kv_seqlen", "qparam_k", "qparam_v",
                                        "block_tables"))
def dequantize_fp8_cache(cache_K, cache_V, kv_seqlen, qparam_k=None, qparam_v=None, block_tables=None,
                         page_size=64, *, validate=True, check_finite=False, cache_format=None):
    """FBGEMM ``dequantize_fp8_cache``: an FP8 cache to bfloat16, in the cache's own layout.

    Parameters
    ----------
    cache_K, cache_V : uint8 ``[B_KV, MAX_T, N_KVH, R]`` or paged ``[1, P*S, N_KVH, R]``
        ``R = D + 4`` (inline qparams) or ``R = D`` (external words / fp8_head scales).
    kv_seqlen : int32 ``[n]``
        Rows per lane, ``n <= B_KV`` (contiguous) or ``n <= block_tables.shape[0]`` (paged).
    qparam_k, qparam_v : optional
        int32 ``cache.shape[:3]``: external ``fp8`` words; float32 ``[B, N_KVH]``: ``fp8_head``
        scales (an extension).
    block_tables : int32 ``[B, max_pages]``, optional; page_size : int

    Returns
    -------
    (K, V) : bfloat16, the cache shape with the last axis set to ``D``
        Contiguous: ``[B_KV, MAX_T, N_KVH, D]``, lanes ``b >= n`` all zero. Paged: the physical
        ``[1, P*S, N_KVH, D]``; a row holds data iff some ``(b, t < kv_seqlen[b])`` maps to it.

    Notes
    -----
    **cukv differs:** every non-data row is exactly +0 (FBGEMM zero-fills to a 128-row or page
    boundary and leaves the rest uninitialised); any ``D`` in {64, 128, 256} (FBGEMM: 128). ``check_finite``
    is accepted for uniformity (no activations are read).
    """
    from .dequant import dequantize_cache_physical  # noqa: PLC0415

    op = "dequantize_fp8_cache"
    fmt = _fb_fp8_format(op, cache_K, qparam_k, cache_format)
    if fmt not in ("fp8", "fp8_head"):
        _ck.fail(op, "cache_format", "'fp8' or 'fp8_head'", repr(fmt))
    return dequantize_cache_physical(cache_K, cache_V, kv_seqlen, fmt, qparam_k=qparam_k,
                                     qparam_v=qparam_v, block_tables=block_tables,
                                     page_size=page_size, validate=validate, op=op)


@_be.op("dequantize_int4_cache", arrays=("cache_K", "cache_V", "kv_seqlen", "qparam_k", "qparam_v",
                                         "block_tables"))
def dequantize_int4_cache(cache_K, cache_V, kv_seqlen, num_groups=1, qparam_k=None, qparam_v=None, *,
                          block_tables=None, page_size=64, validate=True, check_finite=False,
                          cache_format=None):
    """FBGEMM ``dequantize_int4_cache``: an ``int4:g{num_groups}`` cache to bfloat16.

    Output layout as :func:`dequantize_fp8_cache`. ``qparam_k``/``qparam_v`` must be None (external
    INT4 qparams are not a cukv format). **cukv differs:** the paging keywords are an extension, every
    non-data row is +0, and ``D`` may be 64, 128 or 256.
    """
    from .dequant import dequantize_cache_physical  # noqa: PLC0415

    op = "dequantize_int4_cache"
    for name, qp in (("qparam_k", qparam_k), ("qparam_v", qparam_v)):
        if qp is not None:
            _ck.fail(op, name, "None (external INT4 qparams are not a cukv format)", _ck.describe(qp))
    if cache_format is None:
        g = 1 if num_groups is None else num_groups
        if isinstance(g, bool) or not isinstance(g, (int, _np.integer)) or g not in (1, 2, 4, 8):
            _ck.fail(op, "num_groups", "1, 2, 4 or 8", repr(num_groups))
        cache_format = f"int4:g{int(g)}"
    elif not cache_format.startswith("int4"):
        _ck.fail(op, "cache_format", "an 'int4:gG' format", repr(cache_format))
    return dequantize_cache_physical(cache_K, cache_V, kv_seqlen, cache_format,
                                     block_tables=block_tables, page_size=page_size,
                                     validate=validate, op=op)


@_be.op("quantize_qkv_per_head", arrays=("amax", "XQKV", "varseq_seqpos", "varseq_batch",
                                         "is_precalculated_qparam", "cache_K", "cache_V", "XQ_O", "B",
                                         "qparam_k", "qparam_v", "block_tables"))
def quantize_qkv_per_head(amax, XQKV, varseq_seqpos, varseq_batch, is_precalculated_qparam, cache_K,
                          cache_V, XQ_O, B, qparam_k=None, qparam_v=None, *, block_tables=None,
                          page_size=64, validate=True, check_finite=False, cache_format=None):
    """FBGEMM ``quantize_qkv_per_head``: FP8 Q (in place into ``XQ_O``) and, with ``qparam_k``, K/V
    into an ``fp8_head`` cache with per-(lane, KV head) scales.

    Parameters
    ----------
    amax : float32 ``[>= B, HH]``; only ``amax[:B]`` is read.
    XQKV : bfloat16 ``[B_T, HH, D]``, ``HH = N_H + 2 N_KVH`` with ``N_H = XQ_O.shape[1]``.
    varseq_seqpos : int32 ``[B_T]``, cache positions (-1 skips a token).
    varseq_batch : int32 ``[B_T]`` lanes (``< B``), or None: each token its own lane.
    is_precalculated_qparam : bool ``[B_T]`` or None (None: **every** token precomputed, FBGEMM's meaning).
    cache_K, cache_V : uint8 ``fp8_head`` caches ``[B, MAX_T, N_KVH, D]`` or paged.
    XQ_O : uint8 ``[B_T, N_H, D]``, written in place.
    B : int (or a 1-element integer array): lanes.
    qparam_k, qparam_v : float32 ``[B, N_KVH]`` or None (None: only Q is quantized).

    Returns
    -------
    scale_q : float32 ``[B, N_KVH]``

    Notes
    -----
    Calls :func:`cukv.quantize_qkv_per_head`. **cukv differs:** scales are written for every KV head
    and ``scale_q`` holds the lane's Q scale in every column (FBGEMM: head 0 / column 0 only); paged
    caches and ``D`` in {64, 128, 256} are supported; skipped tokens' ``XQ_O`` rows are zero.
    """
    from .per_head import quantize_qkv_per_head as native  # noqa: PLC0415

    op = "quantize_qkv_per_head"
    if cache_format is not None and cache_format != "fp8_head":
        _ck.fail(op, "cache_format", "'fp8_head' (or None)", repr(cache_format))
    if not isinstance(B, (int, _np.integer)) or isinstance(B, bool):
        if not hasattr(B, "dtype") or B.size != 1 or B.dtype.kind not in "iu":
            _ck.fail(op, "B", "an int or a 1-element integer array", repr(B), TypeError)
        B = int(B.reshape(-1)[0])
    B = int(B)
    _ck.check_dtype(op, "XQKV", XQKV, _ck.BF16)
    _ck.check_dtype(op, "XQ_O", XQ_O, _ck.U8)
    if XQKV.ndim != 3 or XQ_O.ndim != 3:
        _ck.fail(op, "XQKV" if XQKV.ndim != 3 else "XQ_O", "a 3-d array",
                 _ck.describe(XQKV if XQKV.ndim != 3 else XQ_O))
    _ck.check_dtype(op, "amax", amax, _ck.F32)
    if amax.ndim != 2 or not 0 <= B <= amax.shape[0]:
        _ck.fail(op, "B", f"0 <= B <= amax.shape[0] (amax {_ck.describe(amax)})", str(B))
    N_H, HH = int(XQ_O.shape[1]), int(XQKV.shape[1])
    if HH <= N_H or (HH - N_H) % 2:
        _ck.fail(op, "XQKV", f"[B_T, N_H + 2*N_KVH, D] with N_H={N_H} (XQ_O.shape[1])",
                 _ck.describe(XQKV))
    N_KVH = (HH - N_H) // 2
    if check_finite:
        _fb_check_finite(op, "XQKV", XQKV)
    pre = is_precalculated_qparam
    if pre is None:
        xp = _be.current().xp
        pre = xp.ones(int(XQKV.shape[0]), dtype=bool)
    _, scale_q = native(amax[:B], XQKV[:, :N_H], XQKV[:, N_H:N_H + N_KVH], XQKV[:, N_H + N_KVH:],
                        cache_K, cache_V, varseq_seqpos, token_lane=varseq_batch,
                        scale_precomputed=pre, qparam_k=qparam_k, qparam_v=qparam_v,
                        block_tables=block_tables, page_size=page_size, out=XQ_O, validate=validate)
    return scale_q


# ---------------------------------------------------------------------------------------- attention
# (SPEC §10.4) mqa_attn, gqa_attn_splitk
