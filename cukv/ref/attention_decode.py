"""NumPy float64 truth of decode attention (SPEC §8.1) and of FBGEMM's split-K auxiliaries (§10.4).

Every function takes already-validated host arrays. The cache is dequantized with the reference
codec (:mod:`cukv.ref.codec`, the bf16 values every kernel must reproduce), rows behind out-of-range
page ids are excluded (SPEC §1.4), lengths are clamped to ``[0, capacity]``, and everything after
that is float64: ``s_t = scale * <q, k_t>``, ``m = max s``, ``l = sum exp(s - m)``,
``O = sum exp(s - m) v / l``, ``lse = m + ln l``. A lane without keys gives ``O = 0``, ``lse = -inf``.
"""
from __future__ import annotations

import math

import numpy as np

from ..formats import parse_format
from . import codec
from .layout import gather_logical

F32 = np.float32


def lengths(seqlens, capacity: int) -> np.ndarray:
    """int64 ``[B]``: ``seqlens`` clamped to ``[0, capacity]`` (the kernels' guard)."""
    return np.clip(np.asarray(seqlens, dtype=np.int64), 0, int(capacity))


def capacity_of(cache, block_tables=None, page_size: int = 64) -> int:
    if block_tables is None:
        return int(cache.shape[1])
    return int(np.asarray(block_tables).shape[1]) * int(page_size)


def dequantized(cache, fmt: str, B: int, T: int, *, qparam=None, block_tables=None,
                page_size: int = 64):
    """Logical rows ``[B, T, N_KVH, D]`` as float64 (exact bf16 values) and the validity ``[B, T]``.

    ``qparam``: external fp8 words (``cache.shape[:3]``) or ``fp8_head`` scales ``[B, N_KVH]``.
    Rows behind an out-of-range page id are invalid and read as 0.
    """
    kind, _ = parse_format(fmt)
    rows, ok = gather_logical(np.asarray(cache), B, T, block_tables, page_size)
    words = scale = None
    if kind == "fp8" and qparam is not None:
        words = gather_logical(np.asarray(qparam)[..., None], B, T, block_tables, page_size)[0][..., 0]
    elif kind == "fp8_head":
        scale = np.broadcast_to(np.asarray(qparam, dtype=F32)[:, None, :], rows.shape[:3])
    x = codec.dequantize(rows, fmt, qparams=words, scale=scale).astype(np.float64)
    return np.where(ok[..., None, None], x, 0.0), ok


def _inputs(q, cache_k, cache_v, seqlens, fmt, qparam_k, qparam_v, block_tables, page_size,
            softmax_scale):
    q = np.asarray(q).astype(np.float64)
    B, NH, D = q.shape
    cap = capacity_of(cache_k, block_tables, page_size)
    n = lengths(seqlens, cap)
    T = int(n.max()) if B else 0
    k, ok = dequantized(cache_k, fmt, B, T, qparam=qparam_k, block_tables=block_tables,
                        page_size=page_size)
    v, _ = dequantized(cache_v, fmt, B, T, qparam=qparam_v, block_tables=block_tables,
                       page_size=page_size)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    valid = ok & (np.arange(T)[None, :] < n[:, None])
    k = np.where(valid[..., None, None], k, 0.0)      # rows past a length are never read
    v = np.where(valid[..., None, None], v, 0.0)
    return q, k, v, valid, n, scale, cap


def _dots(q, k):
    """Raw ``<q_h, k_t>`` float64 ``[B, N_H, T]`` with query head h reading KV head h // (N_H/N_KVH)."""
    B, NH, D = q.shape
    nkv = k.shape[2]
    if NH == 0 or nkv == 0:
        return np.zeros((B, NH, k.shape[1]))
    r = NH // nkv
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.einsum("bkrd,btkd->bkrt", q.reshape(B, nkv, r, D), k)
    return s.reshape(B, NH, k.shape[1])


def _softmax_pv(s, valid, v, NH):
    """Masked softmax statistics and the unnormalised ``a``: (m, l, a) over the keys where valid."""
    B, _, T = s.shape
    nkv = v.shape[2]
    r = NH // nkv if nkv else 1
    with np.errstate(invalid="ignore", over="ignore"):
        sm = np.where(valid[:, None, :], s, -np.inf)
        m = sm.max(axis=-1) if T else np.full((B, NH), -np.inf)
        mm = np.where(np.isfinite(m), m, 0.0)
        p = np.where(valid[:, None, :], np.exp(sm - mm[..., None]), 0.0)
        l = p.sum(axis=-1)
        a = np.einsum("bkrt,btkd->bkrd", p.reshape(B, nkv, r, T), v).reshape(B, NH, v.shape[3]) \
            if NH else np.zeros((B, 0, v.shape[3]))
    return m, l, a


def attention_f64(q, cache_k, cache_v, seqlens, *, fmt: str, qparam_k=None, qparam_v=None,
                  block_tables=None, page_size: int = 64, softmax_scale=None):
    """float64 ``(O [B, N_H, D], lse [B, N_H])`` of SPEC §8.1 over the dequantized cache."""
    q, k, v, valid, n, scale, _ = _inputs(q, cache_k, cache_v, seqlens, fmt, qparam_k, qparam_v,
                                          block_tables, page_size, softmax_scale)
    NH = q.shape[1]
    m, l, a = _softmax_pv(scale * _dots(q, k), valid, v, NH)
    with np.errstate(invalid="ignore", divide="ignore"):
        empty = l == 0
        O = np.where(empty[..., None], 0.0, a / np.where(empty, 1.0, l)[..., None])
        lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l)))
    return O, lse


def decode_attention(q, cache_k, cache_v, seqlens, *, fmt: str, qparam_k=None, qparam_v=None,
                     block_tables=None, page_size: int = 64, softmax_scale=None, return_lse=False):
    """Reference :func:`cukv.decode_attention`: bf16 ``out`` (and float32 ``lse``)."""
    O, lse = attention_f64(q, cache_k, cache_v, seqlens, fmt=fmt, qparam_k=qparam_k,
                           qparam_v=qparam_v, block_tables=block_tables, page_size=page_size,
                           softmax_scale=softmax_scale)
    out = O.astype(F32).astype(codec.BF16)
    return (out, lse.astype(F32)) if return_lse else out


def split_partials(q, cache_k, cache_v, seqlens, num_splits: int, *, fmt: str, qparam_k=None,
                   qparam_v=None, block_tables=None, page_size: int = 64, softmax_scale=None):
    """FBGEMM ``gqa_attn_splitk`` partials (SPEC §10.4), float64.

    Split ``s`` of lane ``b`` covers ``[s*t_per, min((s+1)*t_per, n_b))`` with
    ``t_per = ceil(n_b / S)``. Returns ``a [B, S, N_H, D]`` (unnormalised), ``m [B, S, N_H]`` and
    ``l [B, S, N_H]``; an empty split gives ``a = 0``, ``m = -inf``, ``l = 0``.
    """
    q, k, v, valid, n, scale, _ = _inputs(q, cache_k, cache_v, seqlens, fmt, qparam_k, qparam_v,
                                          block_tables, page_size, softmax_scale)
    B, NH, D = q.shape
    S = int(num_splits)
    s = scale * _dots(q, k)
    T = k.shape[1]
    t_per = -(-n // S)                                     # [B]
    t = np.arange(T)[None, :]
    A = np.zeros((B, S, NH, D))
    M = np.full((B, S, NH), -np.inf)
    L = np.zeros((B, S, NH))
    for sp in range(S):
        lo = sp * t_per[:, None]
        hi = np.minimum(lo + t_per[:, None], n[:, None])
        vs = valid & (t >= lo) & (t < hi)
        m, l, a = _softmax_pv(s, vs, v, NH)
        M[:, sp] = np.where(l > 0, m, -np.inf)
        L[:, sp] = l
        A[:, sp] = a
    return A, M, L


def scores(q, cache_k, cache_v, seqlens, *, fmt: str, qparam_k=None, qparam_v=None,
           block_tables=None, page_size: int = 64, softmax_scale=None):
    """``(probs, dots)``, float64 ``[B, N_H, capacity]``: softmax probabilities and raw ``<q, k_t>``;
    both 0 for positions that are not attended (SPEC §10.4, ``use_tensor_cores=False``)."""
    q, k, v, valid, n, scale, cap = _inputs(q, cache_k, cache_v, seqlens, fmt, qparam_k, qparam_v,
                                            block_tables, page_size, softmax_scale)
    B, NH, _ = q.shape
    d = _dots(q, k)
    m, l, _ = _softmax_pv(scale * d, valid, v, NH)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mm = np.where(np.isfinite(m), m, 0.0)
        p = np.where(valid[:, None, :], np.exp(scale * d - mm[..., None]) /
                     np.where(l > 0, l, 1.0)[..., None], 0.0)
    T = d.shape[-1]
    probs = np.zeros((B, NH, cap))
    dots = np.zeros((B, NH, cap))
    probs[..., :T] = p
    dots[..., :T] = np.where(valid[:, None, :], d, 0.0)
    return probs, dots
