"""FBGEMM-compatible layer (SPEC §10): FBGEMM gen_ai kv_cache ops under their own names.

Each function keeps FBGEMM's name, positional order, argument names and defaults, and maps onto the
native cukv API. Tensors become NumPy/CuPy arrays; FBGEMM's ``float8_e4m3fn`` tensors are ``uint8``.
Every function also takes keyword-only ``validate=True``, ``check_finite=False`` and
``cache_format=None`` (overrides the dispatch by cache dtype of SPEC §10).

Where FBGEMM is wrong or limited (SPEC §12), cukv does the correct thing; each docstring says where.
"""
from __future__ import annotations

import numpy as np

from . import _backend, _checks

# ---------------------------------------------------------------------------------------- writers
# (SPEC §10.1) rope_qkv_varseq_prefill, rope_qkv_decoding, nope_*, xpos_*


def _fb_writer_format(op, cache_K, XQ, qparam_k, cache_logical_dtype_int, num_groups, cache_format):
    """The native ``fmt`` of a writer call (SPEC §10 dispatch by cache dtype)."""
    if cache_format is not None:
        return cache_format
    if cache_K is None:
        return None
    if cache_K.dtype == _checks.BF16:
        return "bf16"
    if cache_K.dtype != _checks.U8:
        _checks.fail(op, "cache_K", "a bfloat16 or uint8 cache", _checks.describe(cache_K), TypeError)
    cdt = cache_logical_dtype_int
    if isinstance(cdt, bool) or not isinstance(cdt, (int, np.integer)) or int(cdt) not in (0, 1, 2):
        _checks.fail(op, "cache_logical_dtype_int", "0 (bf16 or int4 by dtype), 1 (FP8) or 2 (INT4)", repr(cdt))
    if int(cdt) == 1:
        if num_groups not in (None, 1):
            _checks.fail(op, "num_groups", "None or 1 for an FP8 cache (cache_logical_dtype_int=1)",
                      repr(num_groups))
        R, D = int(cache_K.shape[-1]), int(XQ.shape[-1])
        if R == D + 4:
            return "fp8"
        if R == D:
            if qparam_k is not None and qparam_k.dtype == _checks.I32:
                return "fp8"
            return "fp8_head"
        _checks.fail(op, "cache_K", f"rows of D+4={D + 4} (inline qparams) or D={D} bytes for an FP8 cache",
                  _checks.describe(cache_K))
    g = 1 if num_groups is None else num_groups
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or int(g) not in (1, 2, 4, 8):
        _checks.fail(op, "num_groups", "1, 2, 4 or 8 for an INT4 cache", repr(num_groups))
    return f"int4:g{int(g)}"


def _fb_rope(theta, rope_scaling, old_context_len, scaling_factor, lo_freq_factor, hi_freq_factor):
    from .rope import Llama31Scaling  # noqa: PLC0415

    if not rope_scaling:
        return None
    return Llama31Scaling(old_context_len, scaling_factor, lo_freq_factor, hi_freq_factor)


def _fb_write(op, decode, XQ, XK, XV, cache_K, cache_V, lanes, pos, cache_pos, pos_enc, *, num_groups,
              block_tables, page_size, actual_batch_size, cache_logical_dtype_int, qparam_k, qparam_v,
              write_k_back=False, k_norm=False, update_kv=True, amax_qkv=None, precomputed=None,
              has_fp8_head=True, validate=True, check_finite=False, cache_format=None):
    from .cache_write import _write  # noqa: PLC0415
    from .formats import parse_format  # noqa: PLC0415

    if not isinstance(update_kv, (bool, np.bool_)):
        _checks.fail(op, "update_kv", "a bool", type(update_kv).__name__, TypeError)
    if not update_kv and (XK is not None or XV is not None):
        _checks.fail(op, "XK" if XK is not None else "XV", "None when update_kv=False (Q-only mode)",
                  _checks.describe(XK if XK is not None else XV))
    fmt = _fb_writer_format(op, cache_K, XQ, qparam_k, cache_logical_dtype_int, num_groups, cache_format)
    kind = parse_format(fmt, op, "cache_format")[0] if fmt is not None else "bf16"
    q_back = False
    all_pre = decode
    amax = None
    if kind == "fp8_head":
        if not has_fp8_head:
            _checks.fail(op, "cache_K", "a bf16, fp8 (inline or int32 external qparams) or int4 cache "
                      "(the xpos writers have no FP8 per-head path)", _checks.describe(cache_K))
        amax, q_back, write_k_back = amax_qkv, True, True
        all_pre = decode or precomputed is None
    else:
        precomputed = None
    if kind == "bf16":
        qparam_k = qparam_v = None
    if not update_kv:
        write_k_back = False
    return _write(op, XQ, XK, XV, cache_K, cache_V, lanes, pos,
                  lane_arg="batch" if decode else "varseq_batch",
                  pos_arg="seqpos" if decode else "varseq_seqpos", fmt=fmt, pos_enc=pos_enc,
                  cache_pos=cache_pos, block_tables=block_tables, page_size=page_size,
                  qparam_k=qparam_k, qparam_v=qparam_v, qk_norm=bool(k_norm), qk_norm_eps=0.0,
                  write_q_back=q_back, write_k_back=bool(write_k_back), valid_tokens=actual_batch_size,
                  amax=amax, scale_precomputed=None if all_pre else precomputed,
                  all_precomputed=all_pre, out=None, validate=validate, check_finite=check_finite)


_FB_W_ARRAYS = ("XQ", "XK", "XV", "cache_K", "cache_V", "block_tables", "actual_batch_size", "qparam_k",
                "qparam_v")
_FB_NOTES = """
    Notes
    -----
    Maps onto :func:`cukv.write_kv_prefill` / :func:`cukv.write_kv_decode` (SPEC §10.1). Format by
    cache dtype (SPEC §10): bf16 cache -> ``"bf16"`` (``num_groups``, ``qparam_*``, ``amax_qkv`` and
    ``cache_logical_dtype_int`` ignored); uint8 with ``cache_logical_dtype_int=1`` -> ``"fp8"``
    (rows ``D+4``, or ``D`` with int32 ``qparam_k``) or ``"fp8_head"`` (rows ``D`` with float32 or no
    ``qparam_k``); uint8 with 0 or 2 -> ``"int4:g{num_groups}"``. ``cache_format=`` overrides.
    FP8 per-head (``fp8_head``): ``amax_qkv`` is updated in place, Q and K are written back into
    ``XQ`` / ``XK`` as FBGEMM does, ``kv_quant_scale_precomputed=None`` means every token already has
    its scales (FBGEMM's meaning).

    **cukv differs:** the returned ``XQ_O`` is valid on every path (FBGEMM leaves it uninitialised in
    the FP8 per-head path) and zero for skipped tokens; ``k_norm`` divides by the real ``D`` and also
    applies to bf16 caches (FBGEMM ignores it there); ``update_kv=False`` and ``actual_batch_size``
    work for every format; ``batch`` is honoured in every decode path; ``D`` may be 64, 128 or 256
    (FBGEMM's quantized paths need 128); caches of every format may be paged; min/max reductions
    cover the whole row or group.
"""


def _fb_doc(summary, args):
    return f"""{summary}

    Parameters
    ----------
    {args}
    validate, check_finite, cache_format : keyword-only
        As in the native API; ``cache_format`` overrides the dispatch by cache dtype.

    Returns
    -------
    XQ_O : bfloat16, the shape of ``XQ``
{_FB_NOTES}"""


_PREFILL_ARGS = """XQ : bfloat16 ``[B_T, N_H, D]``; XK, XV : bfloat16 ``[B_T, N_KVH, D]`` (None with update_kv=False)
    cache_K, cache_V : caches (SPEC §2-§3), contiguous or paged (``block_tables``, ``page_size``)
    varseq_batch, varseq_seqpos : int32 ``[B_T]``: lane and position of each token (-1 skips)
    varseq_cache_seqpos : int32 ``[B_T]``, optional: cache slot (default the position)
    actual_batch_size : int or 1-element array, optional: tokens at or past it are skipped"""
_DECODE_ARGS = """XQ : bfloat16 ``[B, N_H, D]``; XK, XV : bfloat16 ``[B, N_KVH, D]`` (None with update_kv=False)
    cache_K, cache_V : caches (SPEC §2-§3), contiguous or paged (``block_tables``, ``page_size``)
    seqpos : int32 ``[B]``: position of each row (-1 skips); batch : int32 ``[B]``, optional: lanes
    cache_seqpos : int32 ``[B]``, optional: cache slot (default the position)
    actual_batch_size : int or 1-element array, optional: rows at or past it are skipped"""
_ROPE_ARGS = """theta, rope_scaling, old_context_len, scaling_factor, lo_freq_factor, hi_freq_factor :
        ``cukv.RoPE(theta, scaling=cukv.Llama31Scaling(...) if rope_scaling else None)``"""


@_backend.op("rope_qkv_varseq_prefill", arrays=_FB_W_ARRAYS + ("varseq_batch", "varseq_seqpos",
                                                          "varseq_cache_seqpos", "amax_qkv",
                                                          "kv_quant_scale_precomputed"))
def rope_qkv_varseq_prefill(XQ, XK, XV, cache_K, cache_V, varseq_batch, varseq_seqpos, theta,
                            num_groups=1, block_tables=None, page_size=64, actual_batch_size=None,
                            varseq_cache_seqpos=None, cache_logical_dtype_int=0, rope_scaling=False,
                            old_context_len=8192, scaling_factor=16, lo_freq_factor=1, hi_freq_factor=32,
                            qparam_k=None, qparam_v=None, write_k_back=False, k_norm=False,
                            update_kv=True, amax_qkv=None, kv_quant_scale_precomputed=None, *,
                            validate=True, check_finite=False, cache_format=None):
    from .rope import RoPE  # noqa: PLC0415

    pe = RoPE(theta, scaling=_fb_rope(theta, rope_scaling, old_context_len, scaling_factor,
                                      lo_freq_factor, hi_freq_factor))
    return _fb_write("rope_qkv_varseq_prefill", False, XQ, XK, XV, cache_K, cache_V, varseq_batch,
                     varseq_seqpos, varseq_cache_seqpos, pe, num_groups=num_groups,
                     block_tables=block_tables, page_size=page_size, actual_batch_size=actual_batch_size,
                     cache_logical_dtype_int=cache_logical_dtype_int, qparam_k=qparam_k, qparam_v=qparam_v,
                     write_k_back=write_k_back, k_norm=k_norm, update_kv=update_kv, amax_qkv=amax_qkv,
                     precomputed=kv_quant_scale_precomputed, validate=validate, check_finite=check_finite,
                     cache_format=cache_format)


@_backend.op("rope_qkv_decoding", arrays=_FB_W_ARRAYS + ("seqpos", "batch", "cache_seqpos", "amax_qkv"))
def rope_qkv_decoding(XQ, XK, XV, cache_K, cache_V, seqpos, theta, num_groups=1, block_tables=None,
                      page_size=64, actual_batch_size=None, batch=None, cache_seqpos=None,
                      cache_logical_dtype_int=0, rope_scaling=False, old_context_len=8192, scaling_factor=16,
                      lo_freq_factor=1, hi_freq_factor=32, qparam_k=None, qparam_v=None, k_norm=False,
                      update_kv=True, amax_qkv=None, *, validate=True, check_finite=False,
                      cache_format=None):
    from .rope import RoPE  # noqa: PLC0415

    pe = RoPE(theta, scaling=_fb_rope(theta, rope_scaling, old_context_len, scaling_factor,
                                      lo_freq_factor, hi_freq_factor))
    return _fb_write("rope_qkv_decoding", True, XQ, XK, XV, cache_K, cache_V, batch, seqpos, cache_seqpos,
                     pe, num_groups=num_groups, block_tables=block_tables, page_size=page_size,
                     actual_batch_size=actual_batch_size, cache_logical_dtype_int=cache_logical_dtype_int,
                     qparam_k=qparam_k, qparam_v=qparam_v, k_norm=k_norm, update_kv=update_kv,
                     amax_qkv=amax_qkv, validate=validate, check_finite=check_finite,
                     cache_format=cache_format)


@_backend.op("nope_qkv_varseq_prefill", arrays=_FB_W_ARRAYS + ("varseq_batch", "varseq_seqpos",
                                                          "varseq_cache_seqpos", "amax_qkv",
                                                          "kv_quant_scale_precomputed"))
def nope_qkv_varseq_prefill(XQ, XK, XV, cache_K, cache_V, varseq_batch, varseq_seqpos, block_tables=None,
                            page_size=64, actual_batch_size=None, varseq_cache_seqpos=None,
                            cache_logical_dtype_int=0, num_groups=1, qparam_k=None, qparam_v=None,
                            k_norm=False, update_kv=True, amax_qkv=None, kv_quant_scale_precomputed=None,
                            *, validate=True, check_finite=False, cache_format=None):
    return _fb_write("nope_qkv_varseq_prefill", False, XQ, XK, XV, cache_K, cache_V, varseq_batch,
                     varseq_seqpos, varseq_cache_seqpos, None, num_groups=num_groups,
                     block_tables=block_tables, page_size=page_size, actual_batch_size=actual_batch_size,
                     cache_logical_dtype_int=cache_logical_dtype_int, qparam_k=qparam_k, qparam_v=qparam_v,
                     k_norm=k_norm, update_kv=update_kv, amax_qkv=amax_qkv,
                     precomputed=kv_quant_scale_precomputed, validate=validate, check_finite=check_finite,
                     cache_format=cache_format)


@_backend.op("nope_qkv_decoding", arrays=_FB_W_ARRAYS + ("seqpos", "batch", "cache_seqpos", "amax_qkv"))
def nope_qkv_decoding(XQ, XK, XV, cache_K, cache_V, seqpos, block_tables=None, page_size=64,
                      actual_batch_size=None, batch=None, cache_seqpos=None, cache_logical_dtype_int=0,
                      num_groups=1, qparam_k=None, qparam_v=None, k_norm=False, update_kv=True,
                      amax_qkv=None, *, validate=True, check_finite=False, cache_format=None):
    return _fb_write("nope_qkv_decoding", True, XQ, XK, XV, cache_K, cache_V, batch, seqpos, cache_seqpos,
                     None, num_groups=num_groups, block_tables=block_tables, page_size=page_size,
                     actual_batch_size=actual_batch_size, cache_logical_dtype_int=cache_logical_dtype_int,
                     qparam_k=qparam_k, qparam_v=qparam_v, k_norm=k_norm, update_kv=update_kv,
                     amax_qkv=amax_qkv, validate=validate, check_finite=check_finite,
                     cache_format=cache_format)


@_backend.op("xpos_qkv_varseq_prefill", arrays=_FB_W_ARRAYS + ("varseq_batch", "varseq_seqpos",
                                                          "varseq_cache_seqpos"))
def xpos_qkv_varseq_prefill(XQ, XK, XV, cache_K, cache_V, varseq_batch, varseq_seqpos, theta, gamma,
                            scale_base, exponent_offset, num_groups=1, block_tables=None, page_size=64,
                            actual_batch_size=None, varseq_cache_seqpos=None, cache_logical_dtype_int=0,
                            rope_scaling=False, old_context_len=8192, scaling_factor=16, lo_freq_factor=1,
                            hi_freq_factor=32, qparam_k=None, qparam_v=None, *, validate=True,
                            check_finite=False, cache_format=None):
    from .rope import XPos  # noqa: PLC0415

    pe = XPos(theta, gamma, scale_base, exponent_offset,
              scaling=_fb_rope(theta, rope_scaling, old_context_len, scaling_factor, lo_freq_factor,
                               hi_freq_factor))
    return _fb_write("xpos_qkv_varseq_prefill", False, XQ, XK, XV, cache_K, cache_V, varseq_batch,
                     varseq_seqpos, varseq_cache_seqpos, pe, num_groups=num_groups,
                     block_tables=block_tables, page_size=page_size, actual_batch_size=actual_batch_size,
                     cache_logical_dtype_int=cache_logical_dtype_int, qparam_k=qparam_k, qparam_v=qparam_v,
                     has_fp8_head=False, validate=validate, check_finite=check_finite,
                     cache_format=cache_format)


@_backend.op("xpos_qkv_decoding", arrays=_FB_W_ARRAYS + ("seqpos", "batch", "cache_seqpos"))
def xpos_qkv_decoding(XQ, XK, XV, cache_K, cache_V, seqpos, theta, gamma, scale_base, exponent_offset,
                      num_groups=1, block_tables=None, page_size=64, actual_batch_size=None, batch=None,
                      cache_seqpos=None, cache_logical_dtype_int=0, rope_scaling=False, old_context_len=8192,
                      scaling_factor=16, lo_freq_factor=1, hi_freq_factor=32, qparam_k=None, qparam_v=None,
                      *, validate=True, check_finite=False, cache_format=None):
    from .rope import XPos  # noqa: PLC0415

    pe = XPos(theta, gamma, scale_base, exponent_offset,
              scaling=_fb_rope(theta, rope_scaling, old_context_len, scaling_factor, lo_freq_factor,
                               hi_freq_factor))
    return _fb_write("xpos_qkv_decoding", True, XQ, XK, XV, cache_K, cache_V, batch, seqpos, cache_seqpos,
                     pe, num_groups=num_groups, block_tables=block_tables, page_size=page_size,
                     actual_batch_size=actual_batch_size, cache_logical_dtype_int=cache_logical_dtype_int,
                     qparam_k=qparam_k, qparam_v=qparam_v, has_fp8_head=False, validate=validate,
                     check_finite=check_finite, cache_format=cache_format)


rope_qkv_varseq_prefill.__doc__ = _fb_doc(
    "FBGEMM ``rope_qkv_varseq_prefill``: RoPE (adjacent pairs) on a packed prefill batch, K/V into the "
    "cache.", _PREFILL_ARGS + "\n    " + _ROPE_ARGS + """
    write_k_back : bool: store the rotated K into ``XK``; k_norm : bool: qk_norm with eps 0
    update_kv : bool: ``False`` is Q-only mode; amax_qkv, kv_quant_scale_precomputed : FP8 per-head""")
rope_qkv_decoding.__doc__ = _fb_doc(
    "FBGEMM ``rope_qkv_decoding``: RoPE on one decode step, K/V into the cache.",
    _DECODE_ARGS + "\n    " + _ROPE_ARGS + """
    k_norm : bool: qk_norm with eps 0; update_kv : bool: ``False`` is Q-only mode
    amax_qkv : float32 ``[B, HH]``: FP8 per-head amax (K/V use the stored scales)""")
nope_qkv_varseq_prefill.__doc__ = _fb_doc(
    "FBGEMM ``nope_qkv_varseq_prefill``: no position encoding; Q copied, K/V into the cache.",
    _PREFILL_ARGS + """
    k_norm, update_kv, amax_qkv, kv_quant_scale_precomputed : as in ``rope_qkv_varseq_prefill``""")
nope_qkv_decoding.__doc__ = _fb_doc(
    "FBGEMM ``nope_qkv_decoding``: no position encoding on one decode step.",
    _DECODE_ARGS + """
    k_norm, update_kv, amax_qkv : as in ``rope_qkv_decoding``""")
xpos_qkv_varseq_prefill.__doc__ = _fb_doc(
    "FBGEMM ``xpos_qkv_varseq_prefill``: xPos on a packed prefill batch (no FP8 per-head path, no "
    "k_norm: use the native API for those).", _PREFILL_ARGS + """
    theta, gamma, scale_base, exponent_offset, rope_scaling, ... : ``cukv.XPos(...)``""")
xpos_qkv_decoding.__doc__ = _fb_doc(
    "FBGEMM ``xpos_qkv_decoding``: xPos on one decode step (no FP8 per-head path).", _DECODE_ARGS + """
    theta, gamma, scale_base, exponent_offset, rope_scaling, ... : ``cukv.XPos(...)``""")


# ---------------------------------------------------------------------------------------- dequantizers
# (SPEC §10.2, §10.3) dequantize_fp8_cache, dequantize_int4_cache, quantize_qkv_per_head


def _fb_fp8_format(op, cache_K, qparam_k, cache_format):
    if cache_format is not None:
        return cache_format
    if qparam_k is None:
        return "fp8"
    if qparam_k.dtype == _checks.I32:
        return "fp8"
    if qparam_k.dtype == _checks.F32:
        return "fp8_head"
    _checks.fail(op, "qparam_k", "int32 external fp8 qparams or float32 fp8_head scales",
             _checks.describe(qparam_k), TypeError)


@_backend.op("dequantize_fp8_cache", arrays=("cache_K", "cache_V", "kv_seqlen", "qparam_k", "qparam_v",
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
        _checks.fail(op, "cache_format", "'fp8' or 'fp8_head'", repr(fmt))
    return dequantize_cache_physical(cache_K, cache_V, kv_seqlen, fmt, qparam_k=qparam_k,
                                     qparam_v=qparam_v, block_tables=block_tables,
                                     page_size=page_size, validate=validate, op=op)


@_backend.op("dequantize_int4_cache", arrays=("cache_K", "cache_V", "kv_seqlen", "qparam_k", "qparam_v",
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
            _checks.fail(op, name, "None (external INT4 qparams are not a cukv format)", _checks.describe(qp))
    if cache_format is None:
        g = 1 if num_groups is None else num_groups
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g not in (1, 2, 4, 8):
            _checks.fail(op, "num_groups", "1, 2, 4 or 8", repr(num_groups))
        cache_format = f"int4:g{int(g)}"
    elif not cache_format.startswith("int4"):
        _checks.fail(op, "cache_format", "an 'int4:gG' format", repr(cache_format))
    return dequantize_cache_physical(cache_K, cache_V, kv_seqlen, cache_format,
                                     block_tables=block_tables, page_size=page_size,
                                     validate=validate, op=op)


@_backend.op("quantize_qkv_per_head", arrays=("amax", "XQKV", "varseq_seqpos", "varseq_batch",
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
        _checks.fail(op, "cache_format", "'fp8_head' (or None)", repr(cache_format))
    if not isinstance(B, (int, np.integer)) or isinstance(B, bool):
        if not hasattr(B, "dtype") or B.size != 1 or B.dtype.kind not in "iu":
            _checks.fail(op, "B", "an int or a 1-element integer array", repr(B), TypeError)
        B = int(B.reshape(-1)[0])
    B = int(B)
    _checks.check_dtype(op, "XQKV", XQKV, _checks.BF16)
    _checks.check_dtype(op, "XQ_O", XQ_O, _checks.U8)
    if XQKV.ndim != 3 or XQ_O.ndim != 3:
        _checks.fail(op, "XQKV" if XQKV.ndim != 3 else "XQ_O", "a 3-d array",
                 _checks.describe(XQKV if XQKV.ndim != 3 else XQ_O))
    _checks.check_dtype(op, "amax", amax, _checks.F32)
    if amax.ndim != 2 or not 0 <= B <= amax.shape[0]:
        _checks.fail(op, "B", f"0 <= B <= amax.shape[0] (amax {_checks.describe(amax)})", str(B))
    N_H, HH = int(XQ_O.shape[1]), int(XQKV.shape[1])
    if HH <= N_H or (HH - N_H) % 2:
        _checks.fail(op, "XQKV", f"[B_T, N_H + 2*N_KVH, D] with N_H={N_H} (XQ_O.shape[1])",
                 _checks.describe(XQKV))
    N_KVH = (HH - N_H) // 2
    if check_finite:
        _checks.check_finite(op, "XQKV", XQKV)
    pre = is_precalculated_qparam
    if pre is None:
        xp = _backend.current().xp
        pre = xp.ones(int(XQKV.shape[0]), dtype=bool)
    _, scale_q = native(amax[:B], XQKV[:, :N_H], XQKV[:, N_H:N_H + N_KVH], XQKV[:, N_H + N_KVH:],
                        cache_K, cache_V, varseq_seqpos, token_lane=varseq_batch,
                        scale_precomputed=pre, qparam_k=qparam_k, qparam_v=qparam_v,
                        block_tables=block_tables, page_size=page_size, out=XQ_O, validate=validate)
    return scale_q


# ---------------------------------------------------------------------------------------- attention
# (SPEC §10.4) mqa_attn, gqa_attn_splitk


def _fb_attn_plan(op, XQ, cache_K, cache_V, seq_positions, qk_scale, num_groups, cache_logical_dtype_int,
                  qparam_k, qparam_v, block_tables, page_size, validate, check_finite, cache_format,
                  num_splits=None):
    """Validate an FBGEMM attention call and map it onto decode attention (SPEC §10.4)."""
    from .attention_decode import prepare  # noqa: PLC0415

    _checks.check_dtype(op, "XQ", XQ, _checks.BF16)
    if XQ.ndim != 4 or int(XQ.shape[1]) != 1:
        _checks.fail(op, "XQ", "bfloat16 [B, 1, N_H, D] (one decode token per lane)", _checks.describe(XQ))
    _checks.check_dtype(op, "seq_positions", seq_positions, _checks.I32)
    if cache_K is None:
        _checks.fail(op, "cache_K", "a cache array", "None", TypeError)
    fmt = _fb_writer_format(op, cache_K, XQ, qparam_k, cache_logical_dtype_int, num_groups, cache_format)
    if isinstance(qk_scale, bool) or not isinstance(qk_scale, (int, float, np.integer, np.floating)):
        _checks.fail(op, "qk_scale", "a real number", repr(qk_scale), TypeError)
    seqlens = seq_positions + np.int32(1)
    return prepare(op, XQ[:, 0], cache_K, cache_V, seqlens, fmt=fmt, qparam_k=qparam_k,
                   qparam_v=qparam_v, block_tables=block_tables, page_size=page_size,
                   softmax_scale=float(qk_scale), num_splits=num_splits, validate=validate,
                   check_finite=check_finite, seq_arg="seq_positions", seq_shift=1, q_arg="XQ")


def _fb_ref_kw(p):
    return dict(fmt=p.geom.fmt, qparam_k=p.qparam_k, qparam_v=p.qparam_v, block_tables=p.block_tables,
                page_size=p.geom.page_size, softmax_scale=p.scale)


@_backend.op("mqa_attn", arrays=("XQ", "cache_K", "cache_V", "seq_positions", "qparam_k", "qparam_v",
                             "block_tables"))
def mqa_attn(XQ, cache_K, cache_V, seq_positions, qk_scale, num_groups=1, cache_logical_dtype_int=0,
             qparam_k=None, qparam_v=None, *, block_tables=None, page_size=64, validate=True,
             check_finite=False, cache_format=None):
    """FBGEMM ``mqa_attn``: decode attention of one token per lane, ``O`` bfloat16 ``[B, 1, N_H, D]``.

    Parameters
    ----------
    XQ : bfloat16 ``[B, 1, N_H, D]``
    cache_K, cache_V : a cache of any SPEC §2 format, contiguous or paged (``block_tables``).
        Format by dtype (SPEC §10): bf16; uint8 with ``cache_logical_dtype_int=1`` FP8 (inline rows,
        int32 external ``qparam_k``/``qparam_v``, or float32 ``fp8_head`` scales); other uint8
        ``int4:g{num_groups}``.
    seq_positions : int32 ``[B]``
        The last attended position, **inclusive** (FBGEMM's convention): lane ``b`` attends
        ``[0, seq_positions[b]]``; ``-1`` is an empty lane (``O = 0``).
    qk_scale : float
        The softmax scale.

    Notes
    -----
    ``decode_attention(XQ[:, 0], ..., seqlens=seq_positions + 1, softmax_scale=qk_scale)``.
    **cukv differs:** any ``N_KVH`` dividing ``N_H`` (FBGEMM: MQA or MHA), D in {64, 128, 256},
    paged caches, no 16K context limit.
    """
    op = "mqa_attn"
    p = _fb_attn_plan(op, XQ, cache_K, cache_V, seq_positions, qk_scale, num_groups,
                      cache_logical_dtype_int, qparam_k, qparam_v, block_tables, page_size, validate,
                      check_finite, cache_format)
    if not _backend.current().gpu:
        from .ref import attention_decode as ref  # noqa: PLC0415

        return ref.decode_attention(p.q, cache_K, cache_V, p.seqlens, **_fb_ref_kw(p))[:, None]
    from .attention_decode import run  # noqa: PLC0415

    return run(p)[0][:, None]


@_backend.op("gqa_attn_splitk", arrays=("XQ", "cache_K", "cache_V", "seq_positions", "block_tables"))
def gqa_attn_splitk(XQ, cache_K, cache_V, seq_positions, qk_scale, num_split_ks,
                    kv_cache_quant_num_groups=1, use_tensor_cores=True, cache_logical_dtype_int=0, *,
                    block_tables=None, page_size=64, validate=True, check_finite=False,
                    cache_format=None):
    """FBGEMM ``gqa_attn_splitk``: split-K decode attention with its auxiliary outputs.

    Returns
    -------
    O : bfloat16 ``[B, 1, N_H, D]``
    aux1, aux2 :
        ``use_tensor_cores=True``: ``aux1`` float32 ``[B, S, N_H, D]``, the unnormalised split sums
        ``a_s = sum_{t in split s} exp(s_t - m_s) v_t``; ``aux2`` float32 ``[B, 2, S, N_H]`` with
        ``aux2[:, 0] = m_s`` (max scaled score of the split) and ``aux2[:, 1] = l_s``.
        ``use_tensor_cores=False``: ``aux1`` float32 ``[B, N_H, capacity]`` softmax probabilities,
        ``aux2`` the raw unscaled dots ``<q, k_t>``; both 0 for ``t > seq_positions[b]``.

    Notes
    -----
    ``S = num_split_ks``; split ``s`` of lane ``b`` covers ``[s*t_per, min((s+1)*t_per, T_b))`` with
    ``T_b = seq_positions[b] + 1`` and ``t_per = ceil(T_b / S)``. ``use_tensor_cores`` selects only
    which auxiliaries are returned, never a numeric path. **cukv differs:** empty splits give
    ``a = 0``, ``m = -inf``, ``l = 0`` (FBGEMM leaves them uninitialised); any ``N_KVH`` dividing
    ``N_H`` (FBGEMM: one KV head), D in {64, 128, 256}, paged caches, contexts beyond 16384.
    """
    op = "gqa_attn_splitk"
    S = num_split_ks
    if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or S < 1:
        _checks.fail(op, "num_split_ks", "an integer >= 1", repr(num_split_ks))
    S = int(S)
    p = _fb_attn_plan(op, XQ, cache_K, cache_V, seq_positions, qk_scale, kv_cache_quant_num_groups,
                      cache_logical_dtype_int, None, None, block_tables, page_size, validate,
                      check_finite, cache_format, num_splits=S)
    be = _backend.current()
    if not be.gpu:
        from .ref import attention_decode as ref  # noqa: PLC0415

        kw = _fb_ref_kw(p)
        O = ref.decode_attention(p.q, cache_K, cache_V, p.seqlens, **kw)[:, None]
        if use_tensor_cores:
            a, m, l = ref.split_partials(p.q, cache_K, cache_V, p.seqlens, S, **kw)
            aux2 = np.stack([m.astype(np.float32), l.astype(np.float32)], axis=1)
            return O, a.astype(np.float32), aux2
        probs, dots = ref.scores(p.q, cache_K, cache_V, p.seqlens, **kw)
        return O, probs.astype(np.float32), dots.astype(np.float32)
    from .attention_decode import run  # noqa: PLC0415

    if use_tensor_cores:
        out, _, pa, pm, _ = run(p, partials=True)
        return out[:, None], pa, pm
    out, lse, _, _, dots = run(p, dots=True)
    cp = be.xp
    g = p.geom
    t = cp.arange(g.capacity, dtype=np.int32)
    n = cp.clip(p.seqlens, 0, g.capacity)
    valid = t[None, :] < n[:, None]
    if g.paged:
        bt = cp.ascontiguousarray(p.block_tables)
        pid = bt[:, t // g.page_size]
        valid &= (pid >= 0) & (pid < g.n_pages)
    with np.errstate(all="ignore"):
        probs = cp.where(valid[:, None, :], cp.exp(np.float32(p.scale) * dots - lse[..., None]),
                         np.float32(0))
    return out[:, None], probs.astype(np.float32), dots
