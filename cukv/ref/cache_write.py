"""NumPy truth of the fused cache writes ``write_kv_prefill`` / ``write_kv_decode`` (SPEC §4, §5).

Each Q and K row is converted bf16 -> fp32 (exact), position-encoded in float64 with one rounding per
operation and a final ``RN_f32``, normed in fp32 when ``qk_norm``, and the fp32 ``y`` goes to
``xq_out`` (``RN_bf16``), the write-back and the row encoder of :mod:`cukv.ref.codec`. V rows are
encoded from ``f32(xv)``. Paged addressing is :func:`cukv.ref.layout.physical_slots`.

The functions take validated host arrays and apply the kernels' index guards (SPEC §1.4): a token
whose lane, slot or page is out of range is skipped, exactly like a ``-1`` position.
"""
from __future__ import annotations

import numpy as np

from . import codec
from .layout import physical_slots
from .norm import qk_norm as _qk_norm

F32 = np.float32
F64 = np.float64


def encode_positions(x, pos, mode: int, interleaved: bool = True, freqs=None, zeta=None,
                     xpos_offset: float = 0.0, xpos_base: float = 1.0, is_q: bool = True) -> np.ndarray:
    """Position-encode rows (SPEC §4.3-§4.4).

    ``x`` float32 ``[N, H, D]``, ``pos`` int ``[N]``; ``mode`` 0 NoPE (copy), 1 RoPE, 2 xPos;
    ``freqs`` / ``zeta`` float64 ``[D/2]`` (:func:`cukv.rope.rope_frequencies`, :func:`cukv.rope.xpos_zeta`).
    Returns float32 ``[N, H, D]``: ``RN_f32`` of the float64 result.
    """
    x = np.asarray(x, dtype=F32)
    if mode == 0:
        return x.copy()
    D = x.shape[-1]
    h = D // 2
    p64 = np.asarray(pos).astype(F64)
    x64 = x.astype(F64)
    with np.errstate(invalid="ignore", over="ignore"):
        a = p64[:, None] * np.asarray(freqs, F64)[None, :]          # [N, D/2]
        c = np.cos(a)[:, None, :]
        s = np.sin(a)[:, None, :]
        if interleaved:
            xi, xj = x64[..., 0::2], x64[..., 1::2]
        else:
            xi, xj = x64[..., :h], x64[..., h:]
        yi = xi * c - xj * s
        yj = xj * c + xi * s
        if mode == 2:
            base = F64(xpos_base) if is_q else -F64(xpos_base)
            e = (p64 - F64(xpos_offset)) / base                        # [N]
            z = (np.asarray(zeta, F64)[None, :] ** e[:, None])[:, None, :]
            yi = yi * z
            yj = yj * z
    y = np.empty_like(x64)
    if interleaved:
        y[..., 0::2], y[..., 1::2] = yi, yj
    else:
        y[..., :h], y[..., h:] = yi, yj
    return y.astype(F32)


def transform_rows(x, pos, tables, *, is_q: bool, qk_norm: bool = False, eps: float = 0.0) -> np.ndarray:
    """bf16 Q or K rows ``[N, H, D]`` -> fp32 ``y``: position encoding, then ``qk_norm`` (SPEC §4).

    ``tables`` = ``(mode, interleaved, freqs, zeta, xpos_offset, xpos_base)``.
    """
    mode, inter, freqs, zeta, off, base = tables
    y = encode_positions(np.asarray(x).astype(F32), pos, mode, inter, freqs, zeta, off, base, is_q)
    return _qk_norm(y, eps) if qk_norm else y


def amax_update(amax, lanes, col0: int, y) -> None:
    """``amax[b, col0 + h] = max(amax, max_d |y[., h, d]|)`` in place, as an integer max on the float
    bits (SPEC §1.5, §5.3): NaN beats +Inf beats every finite value; ``-0.0`` loses to ``+0``."""
    if y.shape[0] == 0:
        return
    bits = (np.ascontiguousarray(y, dtype=F32).view(np.int32) & np.int32(0x7FFFFFFF)).max(axis=-1)
    H = y.shape[1]
    a = amax.view(np.int32)
    np.maximum.at(a, (np.asarray(lanes, np.int64)[:, None], col0 + np.arange(H)[None, :]), bits)


def token_mask(n: int, token_pos, cache_pos, token_lane, valid_tokens, B):
    """Kept tokens (SPEC §5.2) before the slot checks: ``i < valid_tokens``, positions ``>= 0``
    (``-1`` skips; anything below is out of range), lane in ``[0, B)`` when ``B`` is known."""
    i = np.arange(n)
    pos = np.asarray(token_pos, np.int64)
    keep = pos >= 0
    if valid_tokens is not None:
        keep &= i < int(valid_tokens)
    if cache_pos is not None:
        keep &= np.asarray(cache_pos, np.int64) >= 0
    lane = i if token_lane is None else np.asarray(token_lane, np.int64)
    if B is not None:
        keep &= (lane >= 0) & (lane < B)
    return keep, lane


def write_kv(xq, xk, xv, cache_k, cache_v, token_lane, token_pos, *, fmt: str = "bf16", tables=None,
             cache_pos=None, block_tables=None, page_size: int = 64, qparam_k=None, qparam_v=None,
             qk_norm: bool = False, qk_norm_eps: float = 0.0, write_q_back: bool = False,
             write_k_back: bool = False, valid_tokens=None, amax=None, scale_precomputed=None,
             all_precomputed: bool = False, out=None) -> np.ndarray:
    """The fused write of SPEC §5.2-§5.3 on host arrays; caches, qparams, ``amax``, ``xq``/``xk``
    (write-back) and ``out`` are modified in place. Returns ``xq_out`` (``out`` if given).

    ``token_lane=None`` means lane ``i`` for token ``i`` (decode without ``lanes``). ``xk = xv = None``
    is Q-only mode. ``tables``: see :func:`transform_rows` (``None``: NoPE). ``all_precomputed``:
    every K/V row of ``fp8_head`` is quantized with the given scales (decode, and FBGEMM's
    ``kv_quant_scale_precomputed=None``).
    """
    from ..formats import parse_format  # noqa: PLC0415

    kind, G = parse_format(fmt)
    tables = tables if tables is not None else (0, True, None, None, 0.0, 1.0)
    n, n_h, D = (int(s) for s in xq.shape)
    q_only = xk is None
    paged = block_tables is not None
    B = None
    if not q_only and cache_k is not None:
        B = int(block_tables.shape[0]) if paged else int(cache_k.shape[0])
    elif amax is not None:
        B = int(amax.shape[0])
    keep, lane = token_mask(n, token_pos, cache_pos, token_lane, valid_tokens, B)
    pos = np.asarray(token_pos, np.int64)
    cpos = pos if cache_pos is None else np.asarray(cache_pos, np.int64)
    if not q_only:
        i0, i1, ok = physical_slots(np.where(keep, lane, 0), np.where(keep, cpos, 0),
                                    block_tables, page_size, int(cache_k.shape[1]))
        keep &= ok
    idx = np.flatnonzero(keep)
    bl = lane[idx]
    if out is None:
        out = np.zeros((n, n_h, D), codec.BF16)
    else:
        out[...] = 0
    xq_rows = np.asarray(xq)[idx].astype(F32)
    k_rows = None if q_only else np.asarray(xk)[idx].astype(F32)
    v_rows = None if q_only else np.asarray(xv)[idx].astype(F32)

    yq = transform_rows(xq_rows, pos[idx], tables, is_q=True, qk_norm=qk_norm, eps=qk_norm_eps)
    out[idx] = codec.to_bf16(yq)
    if write_q_back:
        xq[idx] = codec.to_bf16(yq)
    if kind == "fp8_head" and amax is not None:
        amax_update(amax, bl, 0, yq)
    if q_only:
        return out

    n_kv = int(xk.shape[1])
    yk = transform_rows(k_rows, pos[idx], tables, is_q=False, qk_norm=qk_norm, eps=qk_norm_eps)
    yv = v_rows
    if write_k_back:
        xk[idx] = codec.to_bf16(yk)
    r0, r1 = i0[idx], i1[idx]
    if kind == "fp8_head":
        if all_precomputed:
            pre = np.ones(idx.size, bool)
        elif scale_precomputed is not None:
            pre = np.asarray(scale_precomputed, bool)[idx]
        else:
            pre = np.zeros(idx.size, bool)
        amax_update(amax, bl[~pre], n_h, yk[~pre])
        amax_update(amax, bl[~pre], n_h + n_kv, yv[~pre])
        for cache, qp, y in ((cache_k, qparam_k, yk), (cache_v, qparam_v, yv)):
            if pre.any():
                cache[r0[pre], r1[pre]] = codec.quantize_fp8_head(y[pre], np.asarray(qp)[bl[pre]])
        return out
    for cache, qp, y in ((cache_k, qparam_k, yk), (cache_v, qparam_v, yv)):
        if kind == "bf16":
            cache[r0, r1] = codec.to_bf16(y)
        elif kind == "fp8" and qp is not None:
            codes, words = codec.quantize_fp8(y)
            cache[r0, r1] = codes
            qp[r0, r1] = words
        else:
            cache[r0, r1] = codec.quantize(y, fmt)
    return out
