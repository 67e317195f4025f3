"""NumPy truth of the FP8 per-head path: the scale recipes of SPEC §2.4 and ``quantize_qkv_per_head``
(SPEC §7).

``amax`` is float32 ``[B, HH]`` with columns in Q, K, V head order (``HH = N_H + 2 N_KVH``). Every
operation is one float32 rounding in the spec's order; ``min``/``max`` propagate NaN (SPEC §11.4).
"""
from __future__ import annotations

import numpy as np

from .codec import S_MIN, quantize_fp8_head
from .layout import physical_slots

F32 = np.float32
S_CAP = F32(12000.0)      # amax cap of the recipes: scales stay <= 12000/448
KV_HEADROOM = F32(64.0)   # K/V multiplier: headroom for later decode tokens

__all__ = ["scale_q", "scale_kv", "quantize_qkv_per_head", "token_guards"]


def _recipe(a) -> np.ndarray:
    """``max(RN(min(a, 12000) / 448), S_MIN)`` elementwise, float32, NaN propagating."""
    a = np.asarray(a, dtype=F32)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.maximum((np.minimum(a, S_CAP) / F32(448.0)).astype(F32), S_MIN).astype(F32)


def scale_q(amax, N_H: int) -> np.ndarray:
    """Q scale per lane, float32 ``[B]``: ``s_q(b) = max(RN(min(a_q, 12000)/448), S_MIN)`` with
    ``a_q = max_{h < N_H} amax[b, h]`` (SPEC §2.4)."""
    amax = np.asarray(amax, dtype=F32)
    N_H = int(N_H)
    if amax.shape[1] == 0 or N_H == 0:
        return _recipe(np.zeros(amax.shape[0], F32))
    return _recipe(amax[:, :N_H].max(axis=1))


def scale_kv(amax, N_H: int, N_KVH: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V scales, float32 ``[B, N_KVH]`` each (SPEC §2.4):
    ``s_k(b, h) = max(RN(min(RN(64 * amax[b, N_H+h]), 12000)/448), S_MIN)``, V from
    ``amax[b, N_H+N_KVH+h]``."""
    amax = np.asarray(amax, dtype=F32)
    N_H, N_KVH = int(N_H), int(N_KVH)
    with np.errstate(invalid="ignore", over="ignore"):
        ak = (KV_HEADROOM * amax[:, N_H:N_H + N_KVH]).astype(F32)
        av = (KV_HEADROOM * amax[:, N_H + N_KVH:N_H + 2 * N_KVH]).astype(F32)
    return _recipe(ak), _recipe(av)


def token_guards(B: int, B_T: int, cache_pos, token_lane=None, valid_tokens=None, *,
                 capacity: int | None = None, writes_kv=None, block_tables=None, page_size: int = 64,
                 n_rows: int | None = None):
    """Per-token ``(lane, kept, writes, phys0, phys1)`` of ``quantize_qkv_per_head`` (SPEC §5.2, §7).

    A token is kept unless ``i >= valid_tokens``, ``cache_pos[i] < 0`` (-1: skip), its lane is outside
    ``[0, B)``, its cache position is outside ``[0, capacity)`` (when ``capacity`` is given), or it
    writes K/V (``writes_kv[i]``) and its page id is outside ``[0, P)``. ``writes`` = kept and
    ``writes_kv``; ``phys0``/``phys1`` index the cache rows of written tokens.
    """
    i = np.arange(B_T, dtype=np.int64)
    lane = i.copy() if token_lane is None else np.asarray(token_lane, dtype=np.int64)
    cpos = np.asarray(cache_pos, dtype=np.int64)
    vt = B_T if valid_tokens is None else min(max(int(np.asarray(valid_tokens).reshape(-1)[0]), 0), B_T)
    kept = (i < vt) & (cpos >= 0) & (lane >= 0) & (lane < B)
    if capacity is not None:
        kept &= cpos < capacity
    wkv = np.zeros(B_T, bool) if writes_kv is None else np.asarray(writes_kv, bool)
    lanec = np.clip(lane, 0, max(B - 1, 0))
    cposc = np.clip(cpos, 0, None)
    p0, p1, ok = physical_slots(lanec, cposc, block_tables, page_size, n_rows)
    kept &= ~(wkv & ~ok)
    writes = kept & wkv
    return lane, kept, writes, p0, p1


def quantize_qkv_per_head(amax, xq, xk, xv, cache_k, cache_v, cache_pos, token_lane=None,
                          scale_precomputed=None, qparam_k=None, qparam_v=None, block_tables=None,
                          page_size: int = 64, valid_tokens=None, out=None):
    """Reference ``quantize_qkv_per_head`` over validated host arrays (SPEC §7).

    Writes the K/V cache rows and ``qparam_k``/``qparam_v`` of kept, non-precomputed tokens in place
    (only when ``xk`` and ``qparam_k`` are given), and returns ``(xq_fp8 uint8 [B_T, N_H, D],
    scale_q float32 [B, N_KVH])``. ``out`` (uint8 ``[B_T, N_H, D]``) receives ``xq_fp8`` if given.
    """
    amax = np.asarray(amax, dtype=F32)
    B, HH = amax.shape
    B_T, N_H, D = xq.shape
    N_KVH = (HH - N_H) // 2
    kv = xk is not None and qparam_k is not None
    pre = (np.zeros(B_T, bool) if scale_precomputed is None
           else np.asarray(scale_precomputed, dtype=bool).reshape(B_T))
    capacity = n_rows = None
    if cache_k is not None:
        n_rows = int(cache_k.shape[1])
        capacity = (int(block_tables.shape[1]) * int(page_size) if block_tables is not None
                    else n_rows)
    lane, kept, writes, p0, p1 = token_guards(
        B, B_T, cache_pos, token_lane, valid_tokens, capacity=capacity,
        writes_kv=(~pre if kv else None), block_tables=block_tables, page_size=page_size,
        n_rows=n_rows)

    sq = scale_q(amax, N_H)
    xq_fp8 = np.zeros((B_T, N_H, D), np.uint8) if out is None else out
    if out is not None:
        out[...] = 0
    k_idx = np.flatnonzero(kept)
    if k_idx.size:
        y = np.asarray(xq[k_idx]).astype(F32)
        s = np.broadcast_to(sq[lane[k_idx]][:, None], (k_idx.size, N_H))
        xq_fp8[k_idx] = quantize_fp8_head(y, s)
    scale_q_out = np.zeros((B, N_KVH), F32)
    if k_idx.size:
        scale_q_out[lane[k_idx]] = sq[lane[k_idx]][:, None]

    if kv:
        sk, sv = scale_kv(amax, N_H, N_KVH)
        w = np.flatnonzero(writes)
        if w.size:
            lw = lane[w]
            for x, cache, s in ((xk, cache_k, sk), (xv, cache_v, sv)):
                codes = quantize_fp8_head(np.asarray(x[w]).astype(F32), s[lw])
                cache[p0[w], p1[w]] = codes
            qparam_k[lw] = sk[lw]
            qparam_v[lw] = sv[lw]
    return xq_fp8, scale_q_out
