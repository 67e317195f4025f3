"""Paged / contiguous cache addressing (SPEC §3), shared by every reference op."""
from __future__ import annotations

import numpy as np


def physical_slots(b, t, block_tables=None, page_size: int = 64, n_rows: int | None = None):
    """Map logical ``(b, t)`` (broadcastable int arrays) to ``(idx0, idx1, ok)``.

    Contiguous caches: ``cache[b, t]`` (``ok`` = ``t < n_rows`` when ``n_rows`` is given).
    Paged caches: ``cache[0, page * S + t % S]`` with ``page = block_tables[b, t // S]``;
    ``ok`` is False where ``t`` is past the table or the page id is outside ``[0, n_rows // S)``
    (such rows read as zeros and are never written, SPEC §1.4). ``t`` must be ``>= 0``.
    """
    b = np.asarray(b, dtype=np.int64)
    t = np.asarray(t, dtype=np.int64)
    b, t = np.broadcast_arrays(b, t)
    if block_tables is None:
        ok = np.ones(b.shape, bool) if n_rows is None else (t < n_rows)
        return b, t, ok & (t >= 0)
    S = int(page_size)
    bt = np.asarray(block_tables, dtype=np.int64)
    pi = t // S
    in_table = (t >= 0) & (pi < bt.shape[1]) & (b >= 0) & (b < bt.shape[0])
    page = np.where(in_table, bt[np.clip(b, 0, bt.shape[0] - 1), np.clip(pi, 0, bt.shape[1] - 1)], -1)
    P = np.iinfo(np.int64).max if n_rows is None else n_rows // S
    ok = in_table & (page >= 0) & (page < P)
    return np.zeros_like(b), np.where(ok, page * S + t % S, 0), ok


def gather_logical(cache, B: int, T: int, block_tables=None, page_size: int = 64):
    """Logical rows ``[B, T, N_KVH, R]`` of a cache and a validity mask ``[B, T]``."""
    b = np.arange(B)[:, None]
    t = np.arange(T)[None, :]
    i0, i1, ok = physical_slots(b, t, block_tables, page_size, int(cache.shape[1]))
    rows = np.asarray(cache)[i0, i1]
    return rows, ok
