"""FP8 per-head Q/K/V quantizer: ``cukv.quantize_qkv_per_head`` (SPEC §2.4, §7).

Kernels: ``cuda_src/per_head.cu`` (a per-lane scale kernel, then one pass over Q/K/V rows).
Reference: :mod:`cukv.ref.per_head`.
"""
from __future__ import annotations

import numpy as np

from . import _backend, _checks, _compile
from .ref import per_head as ref

__all__ = ["quantize_qkv_per_head"]

_PER_HEAD = _compile.Family("per_head.cu", [
    _compile.expression("per_head_scales"),
    *(_compile.expression("quantize_qkv_rows", vec, nh) for vec in (True, False) for nh in (4, 8)),
])
_THREADS = 256
_MAX_D = 2048      # D/8 threads per row, at most one 256-thread block
HEADS = 8          # heads per thread and round of quantize_qkv_rows, 4 or 8 (H100: 8 is 2-3 points faster)


def _block_shape(n_heads, nch, nh):
    """``(head slots, tokens per block)`` of quantize_qkv_rows: enough head slots that each thread
    has at most ``nh`` heads of a token (one round of loads in flight), at most _THREADS threads."""
    hs = max(1, min(-(-n_heads // nh), _THREADS // nch))
    return hs, max(1, _THREADS // (nch * hs))


def _valid_tokens(op, valid_tokens, B_T):
    """``(device int64 [1] or None, host int)`` for ``valid_tokens`` (int, 1-element array or None)."""
    v = _checks.valid_tokens_arg(op, valid_tokens)
    if v is None:
        return None, B_T
    if isinstance(v, int):
        if v < 0:
            _checks.fail(op, "valid_tokens", "an integer >= 0", repr(v))
        return None, min(v, B_T)
    return v.reshape(1).astype(np.int64), None


def _strided(xp, a):
    """``(array, token stride, head stride)`` in elements; copies only views the kernel cannot walk."""
    if a.strides[-1] != a.itemsize or any(s < 0 or s % a.itemsize for s in a.strides):
        a = xp.ascontiguousarray(a)
    return a, a.strides[0] // a.itemsize, a.strides[1] // a.itemsize


@_backend.op("quantize_qkv_per_head", arrays=(
    "amax", "xq", "xk", "xv", "cache_k", "cache_v", "cache_pos", "token_lane", "scale_precomputed",
    "qparam_k", "qparam_v", "block_tables", "valid_tokens", "out"))
def quantize_qkv_per_head(amax, xq, xk, xv, cache_k, cache_v, cache_pos, *, token_lane=None,
                          scale_precomputed=None, qparam_k=None, qparam_v=None, block_tables=None,
                          page_size=64, valid_tokens=None, out=None, validate=True):
    """Quantize Q to FP8 with one scale per lane and (optionally) K/V into an ``fp8_head`` cache.

    Parameters
    ----------
    amax : float32 ``[B, HH]``
        Running absolute maxima from the ``fp8_head`` writes (SPEC §5.3), columns Q, K, V heads;
        ``HH = N_H + 2 N_KVH``. Gives ``B``. Read only.
    xq : bfloat16 ``[B_T, N_H, D]``
        Q after position encoding / norm (``xq_out`` of the write). Any strides.
    xk, xv : bfloat16 ``[B_T, N_KVH, D]`` or None
        K (after write-back) and V; None for Q only.
    cache_k, cache_v : uint8 ``fp8_head`` caches or None
        Contiguous ``[B, MAX_T, N_KVH, D]`` or paged ``[1, P*S, N_KVH, D]`` (with ``block_tables``).
        May be None in Q-only calls.
    cache_pos : int32 ``[B_T]``
        Cache slot of each token; -1 skips the token.
    token_lane : int32 ``[B_T]``, optional
        Lane of each token; None makes token ``i`` its own lane (``b = i``, needs ``B >= B_T``).
    scale_precomputed : bool ``[B_T]``, optional
        Tokens whose lane's K/V scales already exist (chunked prefill): their K/V are not written.
        None: no token is precomputed.
    qparam_k, qparam_v : float32 ``[B, N_KVH]``, optional
        Written: ``s_k``/``s_v`` for every KV head of each lane with a kept, non-precomputed token
        (other lanes untouched). Without them (or without ``xk``) only Q is quantized.
    valid_tokens : int or 1-element int32/int64 array, optional
        Tokens ``i >= valid_tokens`` are skipped (CUDA-graph padding).
    out : uint8 ``[B_T, N_H, D]``, optional
        C-contiguous buffer for ``xq_fp8``.
    validate : bool
        Check lanes, cache positions, used block-table entries and ``amax >= 0`` (one or two
        synchronisations). With ``False`` a token with an out-of-range index is skipped.

    Returns
    -------
    xq_fp8 : uint8 ``[B_T, N_H, D]``
        ``E4M3(clamp(RN(f32(xq) * RN(1/s_q(b))), +-448))``; skipped tokens' rows are zero bytes.
    scale_q : float32 ``[B, N_KVH]``
        ``s_q(b)`` in every column of a lane with a kept token, else 0.

    Raises
    ------
    TypeError
        Wrong dtype or array module.
    ValueError
        Shapes, head counts, overlapping written arrays; with ``validate`` an index out of range or a
        negative ``amax``.

    Notes
    -----
    Scales (SPEC §2.4): ``s_q(b) = max(RN(min(max_h amax[b, h], 12000)/448), S_MIN)``,
    ``s_k(b,h) = max(RN(min(64 amax[b, N_H+h], 12000)/448), S_MIN)``. Values depend only on
    ``amax[b]``, so tokens need not be contiguous per lane. **cukv differs** from FBGEMM: scales for
    every KV head (FBGEMM stores head 0 only), ``token_lane=None`` is one token per lane, paged caches
    and ``valid_tokens`` are honoured. Bit-exact with :func:`cukv.ref.per_head.quantize_qkv_per_head`.
    """
    op = "quantize_qkv_per_head"
    _checks.check_dtype(op, "amax", amax, _checks.F32)
    if amax.ndim != 2:
        _checks.fail(op, "amax", "float32 [B, HH]", _checks.describe(amax))
    _checks.check_dtype(op, "xq", xq, _checks.BF16)
    if xq.ndim != 3:
        _checks.fail(op, "xq", "bfloat16 [B_T, N_H, D]", _checks.describe(xq))
    B, HH = int(amax.shape[0]), int(amax.shape[1])
    B_T, N_H, D = (int(s) for s in xq.shape)
    if D <= 0 or D % 8 or D > _MAX_D:
        _checks.fail(op, "xq", f"a head dimension D with D % 8 == 0 and D <= {_MAX_D}",
                     _checks.describe(xq))
    if HH <= N_H or (HH - N_H) % 2:
        _checks.fail(op, "amax", f"float32 [B, N_H + 2*N_KVH] with N_H={N_H} and N_KVH >= 1",
                     _checks.describe(amax))
    N_KVH = (HH - N_H) // 2
    if (xk is None) != (xv is None):
        _checks.fail(op, "xv" if xv is None else "xk", "xk and xv both given or both None",
                     "None" if (xv is None) else _checks.describe(xk))
    for name, x in (("xk", xk), ("xv", xv)):
        if x is not None:
            _checks.check_array(op, name, x, _checks.BF16, (B_T, N_KVH, D),
                                f"bfloat16 [B_T={B_T}, N_KVH={N_KVH}, D={D}]")
    if (qparam_k is None) != (qparam_v is None):
        _checks.fail(op, "qparam_v" if qparam_v is None else "qparam_k",
                     "qparam_k and qparam_v both given or both None", "None")
    kv = qparam_k is not None and xk is not None
    if qparam_k is not None and xk is None:
        _checks.fail(op, "xk", "K/V rows when qparam_k/qparam_v are given (they are written from xk/xv)",
                     "None")
    if (cache_k is None) != (cache_v is None):
        _checks.fail(op, "cache_v" if cache_v is None else "cache_k", "both caches or neither", "None")
    if kv and cache_k is None:
        _checks.fail(op, "cache_k", "an fp8_head cache when qparam_k is given", "None")
    geom = None
    if cache_k is not None:
        geom = _checks.check_cache(op, cache_k, cache_v, "fp8_head", D, block_tables=block_tables,
                                   page_size=page_size, qparam_k=qparam_k, qparam_v=qparam_v,
                                   scales_required=False)
        if geom.B != B:
            what = "block_tables.shape[0]" if geom.paged else "cache_k.shape[0]"
            _checks.fail(op, "block_tables" if geom.paged else "cache_k",
                         f"{what} == B={B} (amax.shape[0])", _checks.describe(
                             block_tables if geom.paged else cache_k))
        if geom.n_kv_heads != N_KVH:
            _checks.fail(op, "cache_k", f"N_KVH={N_KVH} heads (from amax and xq)",
                         _checks.describe(cache_k))
    elif block_tables is not None:
        _checks.fail(op, "block_tables", "None without caches", _checks.describe(block_tables))
    elif qparam_k is not None:
        for name, qp in (("qparam_k", qparam_k), ("qparam_v", qparam_v)):
            _checks.check_array(op, name, qp, _checks.F32, (B, N_KVH), f"float32 [B={B}, N_KVH={N_KVH}]")
    _checks.check_array(op, "cache_pos", cache_pos, _checks.I32, (B_T,), f"int32 [B_T={B_T}]")
    if B_T >= 2 ** 31:
        _checks.fail(op, "xq", "B_T < 2**31 tokens", _checks.describe(xq))
    if token_lane is not None:
        _checks.check_array(op, "token_lane", token_lane, _checks.I32, (B_T,), f"int32 [B_T={B_T}]")
    elif B < B_T:
        _checks.fail(op, "amax", f"B >= B_T={B_T} lanes when token_lane is None (one lane per token)",
                     _checks.describe(amax))
    if scale_precomputed is not None:
        _checks.check_array(op, "scale_precomputed", scale_precomputed, _checks.BOOL, (B_T,),
                            f"bool [B_T={B_T}]")
    if out is not None:
        _checks.check_array(op, "out", out, _checks.U8, (B_T, N_H, D), f"uint8 [B_T={B_T}, N_H={N_H}, D={D}]")
        _checks.check_c_contiguous(op, "out", out)
    written = {"out": out}
    if kv:
        written.update(cache_k=cache_k, cache_v=cache_v, qparam_k=qparam_k, qparam_v=qparam_v)
    others = {"amax": amax, "xq": xq, "xk": xk, "xv": xv, "cache_pos": cache_pos,
              "token_lane": token_lane, "scale_precomputed": scale_precomputed,
              "block_tables": block_tables}
    if not kv:
        others.update(cache_k=cache_k, cache_v=cache_v, qparam_k=qparam_k, qparam_v=qparam_v)
    if not isinstance(valid_tokens, (int, np.integer)) and valid_tokens is not None \
            and hasattr(valid_tokens, "dtype"):
        others["valid_tokens"] = valid_tokens
    _checks.check_no_overlap(op, written, others)
    be = _backend.current()
    xp = be.xp
    vt_dev, vt_host = _valid_tokens(op, valid_tokens, B_T)

    if validate:
        if token_lane is not None:
            _checks.check_index_contents(op, "token_lane", token_lane, 0, B)
        cap = geom.capacity if geom is not None else np.iinfo(np.int32).max
        _checks.check_index_contents(op, "cache_pos", cache_pos, 0, cap, allow=(-1,))
        bad_amax = amax < 0
        if bool(bad_amax.any()):
            h = _to_host(bad_amax)
            i = np.unravel_index(_checks.first_bad_index(h.ravel()), h.shape)
            _checks.fail(op, f"amax[{int(i[0])}, {int(i[1])}]", "a value >= 0",
                         repr(float(_to_host(amax)[i])))
        if vt_dev is not None:
            v = int(_to_host(vt_dev)[0])
            if v < 0:
                _checks.fail(op, "valid_tokens", "a count >= 0", str(v))
        if kv and geom.paged and B_T:
            lanes = token_lane if token_lane is not None else xp.arange(B_T, dtype=np.int32)
            n_valid = vt_host if vt_host is not None else int(_to_host(vt_dev)[0])
            w = (xp.arange(B_T) < n_valid) & (cache_pos != -1)
            if scale_precomputed is not None:
                w &= ~scale_precomputed
            touched = xp.zeros(block_tables.shape, dtype=bool)
            idx = xp.flatnonzero(w)
            if idx.size:
                touched[lanes[idx].astype(np.int64), cache_pos[idx].astype(np.int64) // geom.page_size] = True
            _checks.check_block_table_entries(op, block_tables, touched, geom.n_pages)

    if not be.gpu:
        vt = vt_host if vt_host is not None else int(vt_dev[0])
        xq8, sq = ref.quantize_qkv_per_head(
            amax, xq, xk, xv, cache_k, cache_v, cache_pos, token_lane, scale_precomputed,
            qparam_k if kv else None, qparam_v if kv else None,
            block_tables if geom is not None and geom.paged else None,
            geom.page_size if geom is not None else 64, vt, out)
        return _backend.fp8_result(xq8), sq

    out = out if out is not None else xp.empty((B_T, N_H, D), np.uint8)
    if B_T == 0:
        return _backend.fp8_result(out), xp.zeros((B, N_KVH), np.float32)
    i32, i64 = _compile.i32, _compile.i64
    # per_head_scales zero-fills scale_q and writes scales and inverse scales to scr [2, B, 1 + 2 N_KVH]
    scale_q = xp.empty((B, N_KVH), np.float32)
    scr = xp.empty((2, B, 1 + 2 * N_KVH), np.float32)
    if B:
        _compile.launch(_PER_HEAD.kernel("per_head_scales"), (-(-(B * (1 + 2 * N_KVH)) // _THREADS),),
                        (_THREADS,), (xp.ascontiguousarray(amax), i32(B), i32(N_H), i32(N_KVH), scr, scale_q))
    xq_s, q_ts, q_hs = _strided(xp, xq)
    if kv:
        xk_s, k_ts, k_hs = _strided(xp, xk)
        xv_s, v_ts, v_hs = _strided(xp, xv)
    else:
        xk_s = xv_s = None
        k_ts = k_hs = v_ts = v_hs = 0
    loads = [(xq_s, q_ts, q_hs)] + ([(xk_s, k_ts, k_hs), (xv_s, v_ts, v_hs)] if kv else [])
    stores = [out] + ([cache_k, cache_v] if kv else [])
    # vector path: 16-byte loads of bf16 chunks, 8-byte stores of code chunks
    vec = all(int(a.data.ptr) % 16 == 0 and ts % 8 == 0 and hs % 8 == 0 for a, ts, hs in loads) \
        and all(int(a.data.ptr) % 8 == 0 for a in stores)
    paged = geom is not None and geom.paged
    bt = xp.ascontiguousarray(block_tables) if paged else None
    lane = xp.ascontiguousarray(token_lane) if token_lane is not None else None
    pre = xp.ascontiguousarray(scale_precomputed) if (kv and scale_precomputed is not None) else None
    cpos = xp.ascontiguousarray(cache_pos)
    capacity = geom.capacity if geom is not None else -1
    nch = D // 8
    nh = 8 if HEADS == 8 else 4
    hs, tpb = _block_shape(N_H + 2 * N_KVH if kv else N_H, nch, nh)
    k = _PER_HEAD.kernel("quantize_qkv_rows", bool(vec), nh)
    _compile.launch(k, (-(-B_T // tpb),), (nch, hs, tpb), (
        xq_s, i64(q_ts), i64(q_hs), xk_s, i64(k_ts), i64(k_hs), xv_s, i64(v_ts), i64(v_hs), scr,
        cache_k if kv else None, cache_v if kv else None, cpos, lane, pre,
        qparam_k if kv else None, qparam_v if kv else None, scale_q, out, bt,
        i32(bt.shape[1] if paged else 0), i32(geom.page_size if geom is not None else 1),
        i32(geom.n_pages if paged else 0), i32(geom.rows if geom is not None and not paged else 0),
        i32(paged), i64(capacity), vt_dev, i64(vt_host if vt_host is not None else 0), i32(B),
        i32(B_T), i32(N_H), i32(N_KVH), i32(D), i32(kv)))
    return _backend.fp8_result(out), scale_q


def _to_host(a):
    return a.get() if _backend.is_cupy(a) else np.asarray(a)
