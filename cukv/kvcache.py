"""``cukv.KVCache``: a small holder of K/V cache storage that forwards to the functional ops.

It allocates (or wraps) the K/V arrays of one format, the block tables of a paged cache, and the
external ``fp8`` qparam words or ``fp8_head`` scales, and passes them to :func:`cukv.write_kv_prefill`,
:func:`cukv.write_kv_decode`, :func:`cukv.quantize_qkv_per_head`, :func:`cukv.dequantize_cache` and
:func:`cukv.decode_attention`. It holds no state beyond the arrays; users with their own buffers never
need it. Works with NumPy (reference) and CuPy (kernels) arrays alike.
"""
from __future__ import annotations

import numpy as np

from . import _backend, _checks
from .formats import head_dim_from_row, parse_format, row_bytes

__all__ = ["KVCache"]


def _module_of(a):
    return _backend.cupy() if _backend.is_cupy(a) else np


class KVCache:
    """K/V cache storage of one format, contiguous or paged (SPEC §2, §3).

    Parameters
    ----------
    k, v : arrays
        Existing caches to wrap (not copied): contiguous ``[B, MAX_T, N_KVH, R]`` or paged
        ``[1, P*page_size, N_KVH, R]``, C-contiguous, bfloat16 (``fmt="bf16"``) or uint8.
    fmt : str, optional
        Cache format; required for uint8 caches.
    block_tables : int32 ``[B, max_pages]``, optional
        Makes the cache paged.
    page_size : int
        Rows per page (paged caches).
    qparam_k, qparam_v : optional
        int32 ``k.shape[:3]`` external ``fp8`` words, or float32 ``[B, N_KVH]`` ``fp8_head`` scales
        (required for ``fp8_head``).

    Attributes
    ----------
    k, v, block_tables, qparam_k, qparam_v : the raw arrays (``block_tables``/qparams may be None)
    fmt, head_dim, n_kv_heads, batch, capacity, page_size, paged, n_pages

    Notes
    -----
    Allocate with :meth:`allocate`. Methods forward to the functional ops with this cache's arrays and
    keywords; any other keyword is passed through.
    """

    def __init__(self, k, v, fmt=None, *, block_tables=None, page_size=64, qparam_k=None,
                 qparam_v=None):
        op = "KVCache"
        for name, a in (("k", k), ("v", v)):
            _backend.classify(op, name, a)
        fmt = _checks.cache_format(op, k, fmt, "k")
        kind, _ = parse_format(fmt, op)
        if k.ndim != 4:
            _checks.fail(op, "k", "a 4-d cache [B, MAX_T, N_KVH, R] or [1, P*S, N_KVH, R]",
                         _checks.describe(k))
        external = kind == "fp8" and qparam_k is not None
        D = head_dim_from_row(fmt, int(k.shape[-1]), external)
        geom = _checks.check_cache(op, k, v, fmt, D, block_tables=block_tables, page_size=page_size,
                                   qparam_k=qparam_k, qparam_v=qparam_v, written=True)
        _backend.resolve(op, {"k": k, "v": v, "block_tables": block_tables, "qparam_k": qparam_k,
                              "qparam_v": qparam_v})
        self.k, self.v = k, v
        self.fmt = fmt
        self.block_tables = block_tables
        self.qparam_k, self.qparam_v = qparam_k, qparam_v
        self._geom = geom

    # ------------------------------------------------------------------------------------ creation
    @classmethod
    def allocate(cls, fmt, batch, max_len, n_kv_heads, head_dim, *, xp=np, paged=False,
                 page_size=64, n_pages=None, block_tables=None, external_qparams=False):
        """Allocate zeroed storage.

        Parameters
        ----------
        fmt : str
            Any SPEC §2.1 format.
        batch, max_len, n_kv_heads, head_dim : int
            Lanes ``B``, rows per lane (capacity), ``N_KVH`` and ``D``.
        xp : module
            ``numpy`` or ``cupy`` (the current CuPy device).
        paged : bool
            Allocate ``[1, n_pages*page_size, N_KVH, R]`` and block tables. ``max_pages =
            ceil(max_len / page_size)``; the default tables give lane ``b`` the pages
            ``[b*max_pages, (b+1)*max_pages)`` and ``n_pages = batch*max_pages``.
        block_tables : int32 ``[batch, max_pages]``, optional
            Own tables for a paged cache (copied into ``xp``); ``n_pages`` then defaults to
            ``batch*max_pages``.
        external_qparams : bool
            ``fp8`` only: store qparam words in int32 arrays shaped ``k.shape[:3]``.

        Notes
        -----
        Caches and fp8 words are zero bytes; ``fp8_head`` scales start at 1.0 (the per-head pipeline
        overwrites them, SPEC §7).
        """
        op = "KVCache.allocate"
        kind, _ = parse_format(fmt, op)
        for name, val in (("batch", batch), ("max_len", max_len), ("n_kv_heads", n_kv_heads),
                          ("head_dim", head_dim), ("page_size", page_size)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0 or (
                    name in ("head_dim", "page_size", "n_kv_heads") and val < 1):
                _checks.fail(op, name, "a non-negative integer" if name in ("batch", "max_len")
                             else "a positive integer", repr(val))
        if external_qparams and kind != "fp8":
            _checks.fail(op, "external_qparams", f"False for fmt {fmt!r}", "True")
        R = row_bytes(fmt, int(head_dim), bool(external_qparams))
        dtype = _checks.BF16 if kind == "bf16" else np.uint8
        bt = None
        if paged:
            S = int(page_size)
            max_pages = -(-int(max_len) // S)
            if block_tables is None:
                need = int(batch) * max_pages
                n_pages = need if n_pages is None else int(n_pages)
                if n_pages < need:
                    _checks.fail(op, "n_pages", f">= batch*max_pages = {need} for the default tables",
                                 str(n_pages))
                bt = np.arange(need, dtype=np.int32).reshape(int(batch), max_pages)
            else:
                bt = np.asarray(block_tables.get() if _backend.is_cupy(block_tables) else block_tables)
                _checks.check_array(op, "block_tables", bt, _checks.I32, (int(batch), None),
                                    f"int32 [batch={batch}, max_pages]")
                n_pages = int(batch) * int(bt.shape[1]) if n_pages is None else int(n_pages)
            shape = (1, n_pages * S, int(n_kv_heads), R)
            bt = xp.asarray(bt)
        else:
            shape = (int(batch), int(max_len), int(n_kv_heads), R)
        k = xp.zeros(shape, dtype=dtype)
        v = xp.zeros(shape, dtype=dtype)
        qk = qv = None
        if kind == "fp8" and external_qparams:
            qk, qv = xp.zeros(shape[:3], np.int32), xp.zeros(shape[:3], np.int32)
        elif kind == "fp8_head":
            qk = xp.ones((int(batch), int(n_kv_heads)), np.float32)
            qv = xp.ones((int(batch), int(n_kv_heads)), np.float32)
        return cls(k, v, fmt, block_tables=bt, page_size=int(page_size), qparam_k=qk, qparam_v=qv)

    # ------------------------------------------------------------------------------------ geometry
    @property
    def head_dim(self) -> int:
        return self._geom.D

    @property
    def n_kv_heads(self) -> int:
        return self._geom.n_kv_heads

    @property
    def batch(self) -> int:
        return self._geom.B

    @property
    def capacity(self) -> int:
        return self._geom.capacity

    @property
    def paged(self) -> bool:
        return self._geom.paged

    @property
    def page_size(self) -> int:
        return self._geom.page_size

    @property
    def n_pages(self) -> int:
        return self._geom.n_pages

    @property
    def xp(self):
        """The array module of the storage (``numpy`` or ``cupy``)."""
        return _module_of(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes of K, V and qparams (not block tables)."""
        return sum(int(a.nbytes) for a in (self.k, self.v, self.qparam_k, self.qparam_v) if a is not None)

    def __repr__(self) -> str:
        where = "cupy" if _backend.is_cupy(self.k) else "numpy"
        lay = (f"paged P={self.n_pages} S={self.page_size}" if self.paged else "contiguous")
        return (f"KVCache(fmt={self.fmt!r}, B={self.batch}, capacity={self.capacity}, "
                f"N_KVH={self.n_kv_heads}, D={self.head_dim}, {lay}, {where})")

    def _common(self, kw: dict) -> dict:
        base = {"block_tables": self.block_tables, "page_size": self.page_size}
        base.update(kw)
        return base

    # ------------------------------------------------------------------------------------ forwarding
    def write_prefill(self, xq, xk, xv, token_lane, token_pos, **kw):
        """:func:`cukv.write_kv_prefill` into this cache (``fmt``, paging and qparams filled in)."""
        from .cache_write import write_kv_prefill  # noqa: PLC0415

        return write_kv_prefill(xq, xk, xv, self.k, self.v, token_lane, token_pos, fmt=self.fmt,
                                **self._common({"qparam_k": self.qparam_k, "qparam_v": self.qparam_v,
                                                **kw}))

    def write_decode(self, xq, xk, xv, pos, **kw):
        """:func:`cukv.write_kv_decode` into this cache."""
        from .cache_write import write_kv_decode  # noqa: PLC0415

        return write_kv_decode(xq, xk, xv, self.k, self.v, pos, fmt=self.fmt,
                               **self._common({"qparam_k": self.qparam_k, "qparam_v": self.qparam_v,
                                               **kw}))

    def quantize_per_head(self, amax, xq, xk, xv, cache_pos, **kw):
        """:func:`cukv.quantize_qkv_per_head` with this ``fp8_head`` cache and its scales
        (``xk``/``xv`` None: Q only). Returns ``(xq_fp8, scale_q)``."""
        from .per_head import quantize_qkv_per_head  # noqa: PLC0415

        if self.fmt != "fp8_head":
            _checks.fail("KVCache.quantize_per_head", "fmt", "'fp8_head'", repr(self.fmt))
        q = {"qparam_k": self.qparam_k, "qparam_v": self.qparam_v} if xk is not None else {}
        return quantize_qkv_per_head(amax, xq, xk, xv, self.k, self.v, cache_pos,
                                     **self._common({**q, **kw}))

    def dequantize(self, seqlens, **kw):
        """:func:`cukv.dequantize_cache`: ``(k, v)`` bfloat16 ``[B, max_len, N_KVH, D]``, zero padded."""
        from .dequant import dequantize_cache  # noqa: PLC0415

        return dequantize_cache(self.k, self.v, seqlens, self.fmt,
                                **self._common({"qparam_k": self.qparam_k, "qparam_v": self.qparam_v,
                                                **kw}))

    def attend(self, q, seqlens, **kw):
        """:func:`cukv.decode_attention` of ``q`` ``[B, N_H, D]`` over this cache (lengths ``seqlens``)."""
        try:
            from .attention_decode import decode_attention  # noqa: PLC0415
        except ImportError as e:  # pragma: no cover - lands with the decode-attention module
            raise NotImplementedError("KVCache.attend: cukv.decode_attention is not available") from e
        return decode_attention(q, self.k, self.v, seqlens, fmt=self.fmt,
                                **self._common({"qparam_k": self.qparam_k, "qparam_v": self.qparam_v,
                                                **kw}))
