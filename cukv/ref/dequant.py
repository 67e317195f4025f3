"""NumPy truth of the padded cache dequantize (SPEC §6) and of FBGEMM's physical-layout dequantize
(SPEC §10.2).

Rows ``t < seqlens[b]`` of lane ``b`` are the dequantized logical rows (through the block table when
paged); every other row is +0.0. ``seqlens`` are clamped to ``[0, min(capacity, max_len)]`` and a row
behind an out-of-range page id reads as zeros (the ``validate=False`` guards of SPEC §1.4).
"""
from __future__ import annotations

import numpy as np

from .codec import BF16, dequantize as dequantize_rows
from .layout import physical_slots

__all__ = ["dequantize_cache", "dequantize_cache_physical", "logical_rows"]


def logical_rows(cache, qparam, seqlens, fmt: str, T: int, block_tables=None, page_size: int = 64):
    """Dequantized logical rows ``bfloat16 [B, T, N_KVH, D]`` (``T <= capacity``) and the data mask
    ``[B, T]`` (``t < seqlens[b]`` and the row's page id in range).

    ``qparam``: external fp8 words (``cache.shape[:3]``, indexed like the cache), float32 fp8_head
    scales ``[B, N_KVH]``, or None.
    """
    B = int(seqlens.shape[0])
    b = np.arange(B)[:, None]
    t = np.arange(T)[None, :]
    i0, i1, ok = physical_slots(b, t, block_tables, page_size, int(cache.shape[1]))
    data = ok & (t < np.asarray(seqlens, dtype=np.int64)[:, None])
    rows = np.asarray(cache)[i0, i1]                               # [B, T, N_KVH, R]
    kind = fmt.split(":")[0]
    if kind == "fp8_head":
        s = np.broadcast_to(np.asarray(qparam, np.float32)[:B, None, :], rows.shape[:3])
        deq = dequantize_rows(rows, fmt, scale=s)
    elif kind == "fp8" and qparam is not None:
        deq = dequantize_rows(rows, fmt, qparams=np.asarray(qparam)[i0, i1])
    else:
        deq = dequantize_rows(rows, fmt)
    return deq, data


def dequantize_cache(cache_k, cache_v, seqlens, fmt: str, *, qparam_k=None, qparam_v=None,
                     block_tables=None, page_size: int = 64, max_len: int | None = None, out=None):
    """Reference :func:`cukv.dequantize_cache` over validated host arrays.

    Returns ``(k, v)``, bfloat16 ``[B, max_len, N_KVH, D]`` (written into ``out`` if given).
    """
    seqlens = np.asarray(seqlens, dtype=np.int64)
    B = int(seqlens.shape[0])
    rows = int(cache_k.shape[1])
    capacity = int(block_tables.shape[1]) * int(page_size) if block_tables is not None else rows
    max_len = capacity if max_len is None else int(max_len)
    T = min(capacity, max_len)
    lens = np.clip(seqlens, 0, T)
    results = []
    for j, (cache, qp) in enumerate(((cache_k, qparam_k), (cache_v, qparam_v))):
        deq, data = logical_rows(cache, qp, lens, fmt, T, block_tables, page_size)
        D = int(deq.shape[-1])
        o = np.zeros((B, max_len, int(cache.shape[2]), D), BF16) if out is None else out[j]
        o[...] = 0
        o[:, :T] = np.where(data[:, :, None, None], deq, np.zeros((), BF16))
        results.append(o)
    return tuple(results)


def dequantize_cache_physical(cache_k, cache_v, seqlens, fmt: str, *, qparam_k=None, qparam_v=None,
                              block_tables=None, page_size: int = 64):
    """Reference of FBGEMM's dequantize output layout (SPEC §10.2): the cache shape with last axis D.

    Contiguous: ``[B_KV, MAX_T, N_KVH, D]``, lanes ``b >= len(seqlens)`` all zero. Paged: the physical
    ``[1, P*S, N_KVH, D]``, a row holds data iff some ``(b, t < seqlens[b])`` maps to it.
    """
    seqlens = np.asarray(seqlens, dtype=np.int64)
    n = int(seqlens.shape[0])
    results = []
    for cache, qp in ((cache_k, qparam_k), (cache_v, qparam_v)):
        if block_tables is None:
            Bc, T = int(cache.shape[0]), int(cache.shape[1])
            lens = np.zeros(Bc, np.int64)
            lens[:n] = np.clip(seqlens, 0, T)
            deq, data = logical_rows(cache, qp, lens, fmt, T)
            o = np.where(data[:, :, None, None], deq, np.zeros((), BF16))
        else:
            S = int(page_size)
            bt = np.asarray(block_tables)[:n]
            T = int(bt.shape[1]) * S
            lens = np.clip(seqlens, 0, T)
            deq, data = logical_rows(cache, qp, lens, fmt, T, bt, S)
            b = np.arange(n)[:, None]
            t = np.arange(T)[None, :]
            _, p, _ = physical_slots(b, t, bt, S, int(cache.shape[1]))
            D = int(deq.shape[-1])
            o = np.zeros((1, int(cache.shape[1]), int(cache.shape[2]), D), BF16)
            o[0, p[data]] = deq[data]
        results.append(o)
    return tuple(results)
