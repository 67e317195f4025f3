"""NumPy truth of variable-length prefill attention (SPEC §8.2, math of §8.1).

Everything is float64: ``q`` and the (dequantized) bf16 keys and values are widened exactly, scores
are ``softmax_scale * <q, k>`` with ``softmax_scale`` the float32 value the kernels use, and the
softmax is taken per query row over the keys it sees. :func:`prefill_attention_f64` returns the
float64 truth that tests compare against (SPEC §11.2); :func:`prefill_attention` rounds it to the
public dtypes (bf16 ``out``, float32 ``lse``).

The guards of ``validate=False`` (SPEC §1.4) are applied exactly as the kernels apply them: every
``cu_seqlens`` entry is clamped into ``[0, packed length]`` and a lane's length is
``max(end - start, 0)``; ``seqlens_k`` is clamped into ``[0, capacity]``; a key behind a page id
outside ``[0, P)`` is excluded from attention. A row with no visible key gives ``out = 0`` and
``lse = -inf``.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from . import codec

BF16 = np.dtype(ml_dtypes.bfloat16)

__all__ = ["prefill_attention", "prefill_attention_f64", "lane_ranges", "gather_kv"]


def default_scale(D: int) -> float:
    """``softmax_scale`` default: ``1/sqrt(D)`` in float64, rounded to float32 (the kernel's value)."""
    return float(np.float32(1.0 / math.sqrt(D)))


def lane_ranges(cu_seqlens_q, T_q, *, cu_seqlens_k=None, seqlens_k=None, T_k=0, capacity=0):
    """Per-lane clamped ``(q_start, L_q, k_start, L_k)`` as four int64 arrays (the kernels' plan)."""
    cq = np.clip(np.asarray(cu_seqlens_q, dtype=np.int64), 0, T_q)
    qs = cq[:-1]
    lq = np.maximum(cq[1:] - qs, 0)
    if cu_seqlens_k is not None:
        ck = np.clip(np.asarray(cu_seqlens_k, dtype=np.int64), 0, T_k)
        ks = ck[:-1]
        lk = np.maximum(ck[1:] - ks, 0)
    else:
        lk = np.clip(np.asarray(seqlens_k, dtype=np.int64), 0, capacity)
        ks = np.zeros_like(lk)
    return qs, lq, ks, lk


def gather_kv(cache, b, ks, lk, *, layout, block_tables=None, page_size=64, fmt=None, qparams=None):
    """Lane ``b``'s first ``lk`` keys (or values) as float64 ``[lk, N_KVH, D]`` plus a bool ``[lk]``
    validity mask (False behind an out-of-range page id, whose rows are zeros).

    ``layout``: ``"packed"`` (``cache [T_k, N_KVH, D]``, rows ``ks ..``), ``"padded"``
    (``cache [B, KV_PAD, N_KVH, R]``) or ``"paged"`` (``cache [1, P*S, N_KVH, R]``). Quantized caches
    (``fmt`` not bf16) are dequantized row by row with :func:`cukv.ref.codec.dequantize`:
    ``qparams`` are external fp8 words (``cache.shape[:3]``) or fp8_head scales ``[B, N_KVH]``.
    """
    cache = np.asarray(cache)
    kind = "bf16" if fmt is None else fmt.split(":")[0]
    external = kind == "fp8" and qparams is not None
    t = np.arange(lk, dtype=np.int64)
    valid = np.ones(lk, dtype=bool)
    words = None
    if layout == "packed":
        rows = cache[ks + t]
    elif layout == "padded":
        rows = cache[b, t]
        if external:
            words = np.asarray(qparams)[b, t]
    else:
        n_pages = cache.shape[1] // page_size
        pid = np.asarray(block_tables, dtype=np.int64)[b, t // page_size]
        valid = (pid >= 0) & (pid < n_pages)
        phys = np.where(valid, pid, 0) * page_size + t % page_size
        rows = cache[0, phys]
        if external:
            words = np.asarray(qparams)[0, phys]
    if kind == "bf16":
        x = np.asarray(rows).astype(np.float64)
    elif kind == "fp8":
        x = codec.dequantize(rows, fmt, qparams=words).astype(np.float64)
    elif kind == "fp8_head":
        s = np.asarray(qparams, dtype=np.float32)[b]                 # [N_KVH]
        x = codec.dequantize(rows, fmt, scale=np.broadcast_to(s, rows.shape[:-1])).astype(np.float64)
    else:
        x = codec.dequantize(rows, fmt).astype(np.float64)
    x = np.where(valid[:, None, None], x, 0.0)
    return x, valid


def prefill_attention_f64(q, k, v, cu_seqlens_q, *, cu_seqlens_k=None, seqlens_k=None,
                          block_tables=None, page_size=64, causal=True, softmax_scale=None,
                          fmt=None, qparam_k=None, qparam_v=None):
    """Float64 ``(out [T_q, N_H, D], lse [T_q, N_H])``; arguments as :func:`cukv.prefill_attention`.

    Rows of ``q`` outside every lane stay ``out = 0``, ``lse = -inf``.
    """
    q = np.asarray(q)
    T_q, N_H, D = (int(s) for s in q.shape)
    scale = float(np.float32(default_scale(D) if softmax_scale is None else softmax_scale))
    if cu_seqlens_k is not None:
        layout, T_k, cap = "packed", int(k.shape[0]), 0
    elif block_tables is not None:
        layout, T_k, cap = "paged", 0, int(np.asarray(block_tables).shape[1]) * int(page_size)
    else:
        layout, T_k, cap = "padded", 0, int(k.shape[1])
    n_kvh = int(k.shape[-2])
    grp = N_H // n_kvh
    qs, lq, ks, lk = lane_ranges(cu_seqlens_q, T_q, cu_seqlens_k=cu_seqlens_k, seqlens_k=seqlens_k,
                                 T_k=T_k, capacity=cap)
    out = np.zeros((T_q, N_H, D), dtype=np.float64)
    lse = np.full((T_q, N_H), -np.inf, dtype=np.float64)
    qp_k = qparam_k if fmt is not None and fmt != "bf16" else None
    qp_v = qparam_v if fmt is not None and fmt != "bf16" else None
    f = None if fmt in (None, "bf16") else fmt
    for b in range(len(qs)):
        Lq, Lk = int(lq[b]), int(lk[b])
        if Lq == 0:
            continue
        kk, valid = gather_kv(k, b, int(ks[b]), Lk, layout=layout, block_tables=block_tables,
                              page_size=page_size, fmt=f, qparams=qp_k)
        vv, _ = gather_kv(v, b, int(ks[b]), Lk, layout=layout, block_tables=block_tables,
                          page_size=page_size, fmt=f, qparams=qp_v)
        qq = q[qs[b]:qs[b] + Lq].astype(np.float64)                      # [Lq, N_H, D]
        qg = qq.reshape(Lq, n_kvh, grp, D).transpose(1, 2, 0, 3)         # [N_KVH, grp, Lq, D]
        kt = kk.transpose(1, 0, 2)                                       # [N_KVH, Lk, D]
        vt = vv.transpose(1, 0, 2)
        s = scale * np.matmul(qg, kt[:, None].swapaxes(-1, -2))         # [N_KVH, grp, Lq, Lk]
        vis = np.broadcast_to(valid[None, :], (Lq, Lk))
        if causal:
            r = np.arange(Lq)[:, None]
            j = np.arange(Lk)[None, :]
            vis = vis & (j <= r + (Lk - Lq))
        s = np.where(vis, s, -np.inf)
        with np.errstate(invalid="ignore", over="ignore"):
            m = s.max(axis=-1, keepdims=True) if Lk else np.full(s.shape[:-1] + (1,), -np.inf)
            m_use = np.where(np.isfinite(m), m, 0.0)
            p = np.where(vis, np.exp(s - m_use), 0.0)
            l = p.sum(axis=-1, keepdims=True)
            o = np.matmul(p, vt[:, None])                                # [N_KVH, grp, Lq, D]
            o = np.where(l > 0, o / np.where(l > 0, l, 1.0), 0.0)
            ls = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)),
                          -np.inf)
        out[qs[b]:qs[b] + Lq] = o.transpose(2, 0, 1, 3).reshape(Lq, N_H, D)
        lse[qs[b]:qs[b] + Lq] = ls.transpose(2, 0, 1).reshape(Lq, N_H)
    return out, lse


def prefill_attention(q, k, v, cu_seqlens_q, **kw):
    """:func:`prefill_attention_f64` rounded once: ``out`` bfloat16 (float64 -> float32 -> bf16 is
    the kernel's rounding path up to its float32 accumulation), ``lse`` float32."""
    out, lse = prefill_attention_f64(q, k, v, cu_seqlens_q, **kw)
    return out.astype(np.float32).astype(BF16), lse.astype(np.float32)
