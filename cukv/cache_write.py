"""Fused KV-cache writes: ``cukv.write_kv_prefill`` / ``cukv.write_kv_decode`` (SPEC §4, §5).

One launch takes a step's Q/K/V projections, returns Q position-encoded (and normed), and stores K/V
position-encoded, normed and quantized into a contiguous or paged cache of any format.

Kernel: ``cuda_src/cache_write.cu`` (``write_kv<FMT, G, W, NORM, PATH>``: one block per token, a
team of ``D/8`` lanes per row; qk_norm is a template parameter (its own register budget), and PATH
compiles the common input layout straight (aligned inputs, no write-back, the RoPE pair layout);
position encoding, Q-only mode, skips and paging are runtime flags). Reference: :mod:`cukv.ref.cache_write`.
"""
from __future__ import annotations

import numbers
import threading

import numpy as np

from . import _backend, _checks, _compile
from .codec import fmt_targs, resident_blocks, sm_count
from .formats import parse_format
from .ref import cache_write as ref
from .rope import position_tables

__all__ = ["write_kv_prefill", "write_kv_decode", "HEAD_DIMS"]

HEAD_DIMS = (64, 128, 256)
_FMT_G = [(0, 1), (1, 1), (2, 1), (3, 1), (3, 2), (3, 4), (3, 8)]
_WRITE = _compile.Family("cache_write.cu", [
    _compile.expression("write_kv", f, g, D // 8, norm, path)
    for f, g in _FMT_G for D in HEAD_DIMS for norm in (False, True) for path in (0, 1, 2)]
    + ["cw_inv_sqrt_probe"])
_BLOCK = 256               # CW_BLOCK of cache_write.cu
_TARGET_BLOCKS = 2048      # split a token's rows over blocks until about this many blocks run
_STAGES = 2                # tokens in flight per thread in the cp.async ring (= CW_STAGES of cache_write.cu)
_RING_MAX = 96 * 1024      # bytes of dynamic shared memory the ring may take per block
_ASYNC_OK = True

# kernel flags (cache_write.cu)
_INTERLEAVED, _QK_NORM, _Q_BACK, _K_BACK, _VEC_IN, _VEC_CACHE, _ALL_PRE, _ASYNC, _OFF32 = \
    1, 2, 4, 8, 16, 32, 64, 128, 256

_TABLES: dict = {}
_TABLES_LOCK = threading.Lock()


def _device_tables(pos_enc, D: int, host):
    """float64 frequency / zeta tables on the current device, uploaded once per (device, pos_enc, D)
    so that later calls copy nothing from the host (CUDA-graph capture)."""
    cp = _backend.cupy()
    key = (cp.cuda.Device().id, pos_enc, D)
    t = _TABLES.get(key)
    if t is None:
        with _TABLES_LOCK:
            t = _TABLES.get(key)
            if t is None:
                t = tuple(None if a is None else cp.asarray(a) for a in host)
                _TABLES[key] = t
    return t


def _static_smem(kernel) -> int:
    return int(getattr(kernel, "shared_size_bytes", 17 * 1024) or 0)


_DYN_SET: dict = {}


def _allow_dynamic_smem(kernel, nbytes: int) -> None:
    """Opt the kernel in to ``nbytes`` of dynamic shared memory when static + dynamic pass 48 KiB."""
    if _static_smem(kernel) + nbytes <= 48 * 1024:
        return
    key = id(kernel)
    hit = _DYN_SET.get(key)
    if hit is None or hit[0] is not kernel or hit[1] < nbytes:
        kernel.max_dynamic_shared_size_bytes = int(nbytes)
        _DYN_SET[key] = (kernel, int(nbytes))   # holds the kernel, so its id is never reused


# --------------------------------------------------------------------------------------- checks
def _bool_arg(op, name, v):
    if not isinstance(v, (bool, np.bool_)):
        _checks.fail(op, name, "a bool", type(v).__name__, TypeError)
    return bool(v)


def _check_rows(op, name, a, n, heads, D, what):
    _checks.check_dtype(op, name, a, _checks.BF16)
    ok = a.ndim == 3 and int(a.shape[0]) == n and int(a.shape[2]) == D and (
        heads is None or int(a.shape[1]) == heads)
    if not ok:
        _checks.fail(op, name, f"bfloat16 {what}", _checks.describe(a))


def _unit_last(a) -> bool:
    return a.shape[-1] <= 1 or a.strides[-1] == a.itemsize


def _validate_contents(op, xp, *, n, pos, pos_arg, cpos, lanes, lane_arg, vt, B, geom, block_tables,
                       q_only, amax):
    """``validate=True`` (SPEC §1.4): positions -1 or >= 0, lanes in [0, B), cache slots < capacity,
    touched block-table entries in [0, P), amax >= 0. One host copy (one synchronisation on CuPy)."""
    if n == 0 and amax is None:
        return
    i = xp.arange(n, dtype=np.int64)
    pos64 = pos.astype(np.int64)
    cons = xp.ones(n, dtype=bool) if vt is None else i < (vt if isinstance(vt, int) else vt.reshape(()))
    code = xp.zeros(n, dtype=np.int32)
    kept = cons & (pos64 >= 0)
    c64 = pos64
    if cpos is not None:
        c64 = cpos.astype(np.int64)
        kept &= c64 >= 0
    lane64 = i if lanes is None else lanes.astype(np.int64)
    lane_bad = kept & ((lane64 < 0) | (lane64 >= B)) if B is not None else xp.zeros(n, dtype=bool)
    ok = kept & ~lane_bad
    slot_bad = xp.zeros(n, dtype=bool)
    page_bad = xp.zeros(n, dtype=bool)
    if not q_only:
        slot_bad = ok & (c64 >= geom.capacity)
        ok &= ~slot_bad
        if block_tables is not None and block_tables.shape[1] > 0:
            bi = xp.where(ok, lane64, 0)
            pi = xp.where(ok, c64 // geom.page_size, 0)
            pid = block_tables[bi, pi]
            page_bad = ok & ((pid < 0) | (pid >= geom.n_pages))
    # order of report: positions, cache slots (-1 / negative), lanes, slot range, pages
    code = xp.where(page_bad, 5, code)
    code = xp.where(slot_bad, 4, code)
    code = xp.where(lane_bad, 3, code)
    if cpos is not None:
        code = xp.where(cons & (c64 < -1), 2, code)
    code = xp.where(cons & (pos64 < -1), 1, code)
    parts = []
    if n:
        first = xp.argmax(code != 0)
        parts += [code[first].astype(np.int64), first.astype(np.int64)]
    if amax is not None:
        parts.append((amax < 0).any().astype(np.int64))
    summary = xp.stack([xp.asarray(p).reshape(()) for p in parts])
    s = summary.get() if xp is not np else summary
    if n and s[0]:
        kind, t = int(s[0]), int(s[1])

        def host(a):
            return int(a[t].get() if xp is not np else a[t])

        if kind == 1:
            _checks.fail(op, f"{pos_arg}[{t}]", "a position -1 (skip) or >= 0", str(host(pos)))
        if kind == 2:
            _checks.fail(op, f"cache_pos[{t}]", "a cache slot -1 (skip) or >= 0", str(host(cpos)))
        if kind == 3:
            got = str(host(lanes)) if lanes is not None else f"{t} (lanes=None means lane i for row i)"
            _checks.fail(op, f"{lane_arg}[{t}]", f"a lane in [0, B={B})", got)
        slot_arg = "cache_pos" if cpos is not None else pos_arg
        if kind == 4:
            _checks.fail(op, f"{slot_arg}[{t}]", f"a cache slot < capacity={geom.capacity}",
                         str(host(cpos if cpos is not None else pos)))
        b = host(lanes) if lanes is not None else t
        c = host(cpos if cpos is not None else pos)
        pg = c // geom.page_size
        v = block_tables[b, pg]
        v = int(v.get() if xp is not np else v)
        _checks.fail(op, f"block_tables[{b}, {pg}]",
                     f"a page id in [0, {geom.n_pages}) (used by token {t}, slot {c})", str(v))
    if amax is not None and s[-1]:
        bad = (amax < 0)
        bad_h = bad.get() if xp is not np else bad
        j = np.unravel_index(_checks.first_bad_index(bad_h.ravel()), amax.shape)
        v = amax[j]
        _checks.fail(op, f"amax[{j[0]}, {j[1]}]", ">= 0 (pass zeros for a fresh pass)",
                     repr(float(v.get() if xp is not np else v)))


# --------------------------------------------------------------------------------------- the op
def _write(op, xq, xk, xv, cache_k, cache_v, lanes, pos, *, lane_arg, pos_arg, fmt, pos_enc, cache_pos,
           block_tables, page_size, qparam_k, qparam_v, qk_norm, qk_norm_eps, write_q_back,
           write_k_back, valid_tokens, amax, scale_precomputed, all_precomputed, out, validate,
           check_finite):
    # ---- activations and indices
    if xq is None:
        _checks.fail(op, "xq", "a bfloat16 array [B_T, N_H, D]", "None", TypeError)
    _checks.check_dtype(op, "xq", xq, _checks.BF16)
    if xq.ndim != 3:
        _checks.fail(op, "xq", "bfloat16 [B_T, N_H, D]", _checks.describe(xq))
    n, n_h, D = (int(s) for s in xq.shape)
    if D not in HEAD_DIMS:
        _checks.fail(op, "xq", f"a head dimension D in {{64, 128, 256}} (shape [B_T, N_H, D])",
                     _checks.describe(xq))
    if n_h < 1:
        _checks.fail(op, "xq", "at least one query head", _checks.describe(xq))
    if (xk is None) != (xv is None):
        name = "xv" if xv is None else "xk"
        _checks.fail(op, name, "a bfloat16 array [B_T, N_KVH, D] (xk and xv are both given, or both "
                     "None for Q-only mode)", "None")
    q_only = xk is None
    n_kv = 0
    if not q_only:
        _checks.check_dtype(op, "xk", xk, _checks.BF16)
        if xk.ndim != 3 or int(xk.shape[0]) != n or int(xk.shape[2]) != D or int(xk.shape[1]) < 1:
            _checks.fail(op, "xk", f"bfloat16 [B_T={n}, N_KVH, D={D}]", _checks.describe(xk))
        n_kv = int(xk.shape[1])
        _check_rows(op, "xv", xv, n, n_kv, D, f"[B_T={n}, N_KVH={n_kv}, D={D}] (the shape of xk)")
    _checks.check_array(op, pos_arg, pos, _checks.I32, (n,), f"int32 [{n}] (one per row of xq)")
    if lanes is not None:
        _checks.check_array(op, lane_arg, lanes, _checks.I32, (n,), f"int32 [{n}] (one per row of xq)")
    if cache_pos is not None:
        _checks.check_array(op, "cache_pos", cache_pos, _checks.I32, (n,), f"int32 [{n}] (one per row of xq)")
    vt = _checks.valid_tokens_arg(op, valid_tokens)
    qk_norm = _bool_arg(op, "qk_norm", qk_norm)
    write_q_back = _bool_arg(op, "write_q_back", write_q_back)
    if isinstance(qk_norm_eps, bool) or not isinstance(qk_norm_eps, numbers.Real) or \
            not np.isfinite(qk_norm_eps) or qk_norm_eps < 0:
        _checks.fail(op, "qk_norm_eps", "a finite real number >= 0", repr(qk_norm_eps))
    mode, interleaved, freqs, zeta = position_tables(pos_enc, D, op)
    xoff = float(pos_enc.exponent_offset) if mode == 2 else 0.0
    xbase = float(pos_enc.scale_base) if mode == 2 else 1.0

    # ---- cache, format, fp8_head extras
    geom = None
    if q_only:
        fmt = _checks.cache_format(op, cache_k, fmt) if cache_k is not None else (fmt or "bf16")
        kind, _ = parse_format(fmt, op)
    else:
        if cache_k is None or cache_v is None:
            _checks.fail(op, "cache_k" if cache_k is None else "cache_v",
                         "a cache array (None only in Q-only mode, xk = xv = None)", "None")
        geom = _checks.check_cache(op, cache_k, cache_v, fmt, D, block_tables=block_tables,
                                   page_size=page_size, qparam_k=qparam_k, qparam_v=qparam_v)
        fmt, kind = geom.fmt, geom.kind
        if geom.n_kv_heads != n_kv:
            _checks.fail(op, "cache_k", f"N_KVH={n_kv} heads (xk.shape[1]) in shape[2]",
                         _checks.describe(cache_k))
    B = geom.B if geom is not None else None
    if write_k_back is None:
        write_k_back = kind == "fp8_head"
    write_k_back = _bool_arg(op, "write_k_back", write_k_back) and not q_only
    hh = n_h + 2 * n_kv
    if kind == "fp8_head":
        if amax is None:
            _checks.fail(op, "amax", "float32 [B, N_H + 2*N_KVH] for fmt 'fp8_head' (zeros for a fresh "
                         "pass)", "None")
        _checks.check_dtype(op, "amax", amax, _checks.F32)
        if B is None:
            B = int(amax.shape[0]) if amax.ndim == 2 else -1
        if q_only and amax.ndim == 2 and int(amax.shape[1]) >= n_h:
            hh = int(amax.shape[1])
        if amax.ndim != 2 or int(amax.shape[0]) != B or int(amax.shape[1]) != hh or \
                (q_only and (hh - n_h) % 2):
            _checks.fail(op, "amax", f"float32 [B={B}, N_H + 2*N_KVH" + ("" if q_only else f"={hh}") + "]",
                         _checks.describe(amax))
        _checks.check_c_contiguous(op, "amax", amax)
        if scale_precomputed is not None:
            _checks.check_array(op, "scale_precomputed", scale_precomputed, _checks.BOOL, (n,),
                                f"bool [{n}] (one flag per row of xq)")
    else:
        for name, v in (("amax", amax), ("scale_precomputed", scale_precomputed)):
            if v is not None:
                _checks.fail(op, name, f"None for fmt {fmt!r} (only 'fp8_head' uses it)", _checks.describe(v))
    if write_q_back and not _unit_last(xq):
        _checks.fail(op, "xq", "unit last-axis stride (write_q_back=True writes into it)",
                     f"strides {tuple(int(s) for s in xq.strides)}")
    if write_k_back and not _unit_last(xk):
        _checks.fail(op, "xk", "unit last-axis stride (write_k_back=True writes into it)",
                     f"strides {tuple(int(s) for s in xk.strides)}")
    if out is not None:
        _checks.check_same_backend(op, "out", out, xq)
        _checks.check_array(op, "out", out, _checks.BF16, (n, n_h, D), f"bfloat16 [{n}, {n_h}, {D}]")
        _checks.check_c_contiguous(op, "out", out)

    # ---- overlaps: written arrays vs every other argument; write-backs vs non-activations
    ext = geom is not None and geom.external
    written = {"out": out, "amax": amax}
    if not q_only:
        written.update(cache_k=cache_k, cache_v=cache_v)
        if ext:
            written.update(qparam_k=qparam_k, qparam_v=qparam_v)
    idx_args = {pos_arg: pos, lane_arg: lanes, "cache_pos": cache_pos, "block_tables": block_tables,
                "scale_precomputed": scale_precomputed,
                "valid_tokens": vt if vt is not None and not isinstance(vt, int) else None}
    if not ext and not q_only:
        idx_args.update(qparam_k=qparam_k, qparam_v=qparam_v)
    _checks.check_no_overlap(op, written, {"xq": xq, "xk": xk, "xv": xv, **idx_args})
    for name, a, on in (("xq", xq, write_q_back), ("xk", xk, write_k_back)):
        if on:  # xq / xk may share a fused buffer with each other and xv (SPEC §1.4)
            _checks.check_no_overlap(op, {name: a}, idx_args)

    be = _backend.current()
    xp = be.xp
    if check_finite:
        for name, a in (("xq", xq), ("xk", xk), ("xv", xv)):
            _checks.check_finite(op, name, a)
    if validate:
        _validate_contents(op, xp, n=n, pos=pos, pos_arg=pos_arg, cpos=cache_pos, lanes=lanes,
                           lane_arg=lane_arg, vt=vt, B=B if (not q_only or kind == "fp8_head") else None,
                           geom=geom, block_tables=block_tables, q_only=q_only,
                           amax=amax if kind == "fp8_head" else None)

    if not be.gpu:
        tables = (mode, interleaved, freqs, zeta, xoff, xbase)
        vt_h = None if vt is None else (vt if isinstance(vt, int) else int(np.asarray(vt).reshape(())))
        return ref.write_kv(
            xq, xk, xv, None if q_only else cache_k, None if q_only else cache_v, lanes, pos, fmt=fmt,
            tables=tables, cache_pos=cache_pos, block_tables=None if q_only else block_tables,
            page_size=page_size, qparam_k=None if q_only else qparam_k,
            qparam_v=None if q_only else qparam_v, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps,
            write_q_back=write_q_back, write_k_back=write_k_back, valid_tokens=vt_h,
            amax=amax if kind == "fp8_head" else None, scale_precomputed=scale_precomputed,
            all_precomputed=all_precomputed, out=out)

    # ---- GPU launch
    if out is None:
        out = xp.empty((n, n_h, D), dtype=_checks.BF16)
    if n == 0:
        return out
    xq_r = xq if _unit_last(xq) else xp.ascontiguousarray(xq)
    xk_r = None if q_only else (xk if _unit_last(xk) else xp.ascontiguousarray(xk))
    xv_r = None if q_only else (xv if _unit_last(xv) else xp.ascontiguousarray(xv))

    def strides(a):
        return (_compile.i64(0), _compile.i64(0)) if a is None else \
            (_compile.i64(a.strides[0] // 2), _compile.i64(a.strides[1] // 2))

    def al16(a):
        return a is None or (_checks.aligned(a, 16) and all(int(s) % 16 == 0 for s in a.strides[:2]))

    flags = (_INTERLEAVED if interleaved else 0) | (_QK_NORM if qk_norm else 0) | \
        (_Q_BACK if write_q_back else 0) | (_K_BACK if write_k_back else 0) | \
        (_ALL_PRE if all_precomputed else 0)
    if al16(xq_r) and al16(xk_r) and al16(xv_r) and _checks.aligned(out, 16):
        flags |= _VEC_IN

    def fits32(a):   # every element offset of a's rows (and the kernel's int32 products) < 2^31
        if a is None:
            return True
        ts, hs = a.strides[0] // 2, a.strides[1] // 2
        return ts >= 0 and hs >= 0 and (n - 1) * ts + (int(a.shape[1]) - 1) * hs + D < 2**31

    if fits32(xq_r) and fits32(xk_r) and fits32(xv_r) and n * n_h * D < 2**31:
        flags |= _OFF32
    fcode, G = fmt_targs(fmt)
    if q_only:
        fcode, G = (2, 1) if kind == "fp8_head" else (0, 1)
        ck = cv = qk = qv = hk = hv = bt = None
        cap = max_pages = n_pages = 0
        S = 1
        row_bytes = 0
    else:
        ck, cv, bt = cache_k, cache_v, block_tables
        qk, qv = (qparam_k, qparam_v) if ext else (None, None)
        hk, hv = (qparam_k, qparam_v) if kind == "fp8_head" else (None, None)
        cap, S, n_pages = geom.capacity, geom.page_size, geom.n_pages
        max_pages = int(bt.shape[1]) if bt is not None else 0
        row_bytes = geom.R * (2 if kind == "bf16" else 1)
        need = 16 if kind == "bf16" else 4
        if int(ck.data.ptr) % need == 0 and int(cv.data.ptr) % need == 0:
            flags |= _VEC_CACHE
    if mode:
        d_freqs, d_zeta = _device_tables(pos_enc, D, (freqs, zeta))
    else:
        d_freqs = d_zeta = None
    if vt is None:
        vt_ptr, vt_kind, vt_host = None, 0, n
    elif isinstance(vt, int):
        vt_ptr, vt_kind, vt_host = None, 0, vt
    else:
        vt_ptr, vt_kind, vt_host = vt, (1 if vt.dtype == np.int32 else 2), 0
    W = D // 8
    teams = _BLOCK // W
    rows = n_h if q_only else n_h + 2 * n_kv
    split = max(1, min(-(-rows // teams), -(-_TARGET_BLOCKS // n)))
    npf = -(-rows // (teams * split))          # rows per team
    stages, smem = _STAGES, 0
    if _ASYNC_OK and flags & _VEC_IN:
        while stages > 2 and stages * npf * _BLOCK * 16 > _RING_MAX:
            stages -= 1
        if stages * npf * _BLOCK * 16 <= _RING_MAX:
            flags |= _ASYNC
            smem = stages * npf * _BLOCK * 16
    # the straight-compiled path (PATH 1 / 2 of the .cu) when the common-case flags all hold
    fast = (flags & (_VEC_IN | _ASYNC | _OFF32)) == (_VEC_IN | _ASYNC | _OFF32) and \
        (q_only or flags & _VEC_CACHE) and not flags & (_Q_BACK | _K_BACK)
    path = (1 if flags & _INTERLEAVED else 2) if fast else 0
    k = _WRITE.kernel("write_kv", fcode, G, W, bool(flags & _QK_NORM), path)
    _allow_dynamic_smem(k, smem)
    # one wave of resident blocks walks the tokens, in chunks of `ch` (position tables of a chunk fit
    # the kernel's 2048-double table)
    gx = max(1, min(n, sm_count() * resident_blocks(k, _BLOCK, smem) // split))
    ch = 32 if not mode else max(1, min(32, 2048 // ((D // 2) * (4 if mode == 2 else 2))))
    i32, i64, f32 = _compile.i32, _compile.i64, _compile.f32
    _compile.launch(k, (gx, split), (_BLOCK,), shared_mem=smem, args=(
        xq_r, *strides(xq_r), xk_r, *strides(xk_r), xv_r, *strides(xv_r), out,
        ck, cv, qk, qv, hk, hv, amax if kind == "fp8_head" else None,
        lanes, pos, cache_pos, bt, scale_precomputed,
        vt_ptr, i32(vt_kind), i64(vt_host),
        d_freqs, d_zeta, np.float64(xoff), np.float64(xbase),
        i32(n), i32(n_h), i32(n_kv), i32(-1 if B is None else B), i32(cap), i32(max_pages), i32(S),
        i32(n_pages), i64(row_bytes), i32(hh), f32(qk_norm_eps), i32(mode), i32(flags), i32(npf),
        i32(stages), i32(ch)))
    if xq_r is not xq and write_q_back:  # unreachable: write-back needs a unit last stride
        raise RuntimeError("cukv internal error: write-back into a copy")
    return out


_ARRAYS = ("xq", "xk", "xv", "cache_k", "cache_v", "cache_pos", "block_tables", "qparam_k", "qparam_v",
           "valid_tokens", "amax", "out")


@_backend.op("write_kv_prefill", arrays=_ARRAYS + ("token_lane", "token_pos", "scale_precomputed"))
def write_kv_prefill(xq, xk, xv, cache_k, cache_v, token_lane, token_pos, *, fmt=None, pos_enc=None,
                     cache_pos=None, block_tables=None, page_size=64, qparam_k=None, qparam_v=None,
                     qk_norm=False, qk_norm_eps=0.0, write_q_back=False, write_k_back=None,
                     valid_tokens=None, amax=None, scale_precomputed=None, out=None, validate=True,
                     check_finite=False):
    """Position-encode, norm and quantize a variable-length batch of Q/K/V into a KV cache.

    Parameters
    ----------
    xq : bfloat16 ``[B_T, N_H, D]``
        Query rows of ``B_T`` packed tokens; ``D`` in {64, 128, 256}. Any strides (e.g. a slice of a
        fused ``[B_T, HH, D]`` buffer); with ``write_q_back`` the last axis must have unit stride.
    xk, xv : bfloat16 ``[B_T, N_KVH, D]`` or None
        Key / value rows. Both ``None``: Q-only mode (caches are not touched and may be ``None``).
    cache_k, cache_v : bfloat16 or uint8 caches, C-contiguous, written in place
        Contiguous ``[B, MAX_T, N_KVH, R]`` or paged ``[1, P*page_size, N_KVH, R]`` (SPEC §2.1, §3).
    token_lane, token_pos : int32 ``[B_T]``
        Lane (sequence) and RoPE position of each token; position ``-1`` skips the token.
    fmt : str, optional
        Cache format; required for uint8 caches (``"fp8"``, ``"fp8_head"``, ``"int4:gG"``), optional
        (``"bf16"``) for bfloat16 caches.
    pos_enc : cukv.RoPE, cukv.XPos or None
        ``None`` is NoPE (Q copied, K unrotated).
    cache_pos : int32 ``[B_T]``, optional
        Cache slot of each token (default ``token_pos``); ``-1`` skips the token.
    block_tables : int32 ``[B, max_pages]``, optional
        Paged cache (SPEC §3); ``page_size`` rows per page.
    qparam_k, qparam_v : optional
        ``fp8``: int32 ``cache.shape[:3]`` external qparam words (written); ``fp8_head``: float32
        ``[B, N_KVH]`` scales (read).
    qk_norm : bool
        RMS-norm every Q and K row over ``D`` after the position encoding, with ``qk_norm_eps``.
    write_q_back, write_k_back : bool
        Store ``RN_bf16(y)`` of Q / K rows back into ``xq`` / ``xk``. ``write_k_back=None`` is
        ``True`` for ``fp8_head`` and ``False`` otherwise.
    valid_tokens : int or 1-element int32/int64 array, optional
        Tokens ``i >= valid_tokens`` are skipped (CUDA-graph padding); an array is read on the device.
    amax : float32 ``[B, N_H + 2*N_KVH]`` (``fp8_head`` only, required)
        Updated in place with ``max |y|`` per (lane, head) column (Q, then K, then V heads).
    scale_precomputed : bool ``[B_T]``, optional (``fp8_head`` only)
        Tokens whose lane already has K/V scales: their K/V rows are quantized with ``qparam_k/v``;
        the other tokens' K/V rows only update ``amax``.
    out : bfloat16 ``[B_T, N_H, D]``, optional
        C-contiguous output for ``xq_out``.
    validate : bool
        Check index contents first (one synchronisation on CuPy). ``False``: no synchronisation; an
        out-of-range index skips its token.
    check_finite : bool
        Reject NaN / Inf in ``xq``, ``xk``, ``xv``.

    Returns
    -------
    xq_out : bfloat16 ``[B_T, N_H, D]`` (``out`` if given)
        ``RN_bf16`` of the position-encoded (and normed) Q rows; zeros for skipped tokens.

    Raises
    ------
    TypeError
        Wrong dtype or array type, mixed array modules or devices, wrong ``pos_enc`` type.
    ValueError
        Wrong shapes, mismatched head counts, unsupported ``D``, non-contiguous written arrays,
        overlapping arguments, a uint8 cache without ``fmt``; with ``validate``: a position below -1,
        a lane outside ``[0, B)``, a cache slot ``>= capacity``, a touched block-table entry outside
        ``[0, P)``, a negative ``amax``.

    Notes
    -----
    Per kept token (SPEC §5.2): ``y`` = bf16 -> fp32, RoPE/xPos in float64 (one rounding per
    operation, then ``RN_f32``), ``qk_norm`` in fp32; Q -> ``RN_bf16(y)``; K, V (``y = f32(xv)``) ->
    the cache row ``(lane, cache_pos, h)`` in ``fmt``. ``xq_out`` does not depend on the format.
    Differences from FBGEMM: ``qk_norm`` divides by the real ``D`` and applies to every format (also
    bf16); Q-only mode works for every format; the half-split RoPE (``interleaved=False``) is
    offered; skipped tokens get ``xq_out = 0``; ``fp8_head`` returns a valid ``xq_out``.

    See Also
    --------
    cukv.ref.cache_write.write_kv : the NumPy reference.
    """
    return _write("write_kv_prefill", xq, xk, xv, cache_k, cache_v, token_lane, token_pos,
                  lane_arg="token_lane", pos_arg="token_pos", fmt=fmt, pos_enc=pos_enc,
                  cache_pos=cache_pos, block_tables=block_tables, page_size=page_size, qparam_k=qparam_k,
                  qparam_v=qparam_v, qk_norm=qk_norm, qk_norm_eps=qk_norm_eps,
                  write_q_back=write_q_back, write_k_back=write_k_back, valid_tokens=valid_tokens,
                  amax=amax, scale_precomputed=scale_precomputed, all_precomputed=False, out=out,
                  validate=validate, check_finite=check_finite)


@_backend.op("write_kv_decode", arrays=_ARRAYS + ("pos", "lanes"))
def write_kv_decode(xq, xk, xv, cache_k, cache_v, pos, *, lanes=None, cache_pos=None, fmt=None,
                    pos_enc=None, block_tables=None, page_size=64, qparam_k=None, qparam_v=None,
                    qk_norm=False, qk_norm_eps=0.0, write_q_back=False, write_k_back=None,
                    valid_tokens=None, amax=None, out=None, validate=True, check_finite=False):
    """One decode step: row ``i`` of ``xq``/``xk``/``xv`` is a token of lane ``lanes[i]`` at ``pos[i]``.

    Parameters
    ----------
    xq : bfloat16 ``[B_dec, N_H, D]``; xk, xv : bfloat16 ``[B_dec, N_KVH, D]`` or None (Q-only)
    pos : int32 ``[B_dec]``
        RoPE position (and, without ``cache_pos``, cache slot) of each row; ``-1`` skips the row.
    lanes : int32 ``[B_dec]``, optional
        Lane of each row; ``None`` means row ``i`` belongs to lane ``i``.
    Other keywords
        As :func:`write_kv_prefill` (no ``scale_precomputed``: with ``fp8_head`` every K/V row is
        quantized with the stored ``qparam_k/v`` scales and only Q updates ``amax``).

    Returns
    -------
    xq_out : bfloat16 ``[B_dec, N_H, D]``

    Notes
    -----
    Row ``i`` behaves exactly as prefill token ``i`` with ``token_lane = lanes[i]`` and
    ``token_pos = pos[i]``. Differences from FBGEMM: ``lanes`` is honoured for every format (FBGEMM
    ignores ``batch`` in its quantized rope/xpos paths); see :func:`write_kv_prefill` for the rest.

    See Also
    --------
    cukv.ref.cache_write.write_kv : the NumPy reference.
    """
    return _write("write_kv_decode", xq, xk, xv, cache_k, cache_v, lanes, pos, lane_arg="lanes",
                  pos_arg="pos", fmt=fmt, pos_enc=pos_enc, cache_pos=cache_pos,
                  block_tables=block_tables, page_size=page_size, qparam_k=qparam_k, qparam_v=qparam_v,
                  qk_norm=qk_norm, qk_norm_eps=qk_norm_eps, write_q_back=write_q_back,
                  write_k_back=write_k_back, valid_tokens=valid_tokens, amax=amax,
                  scale_precomputed=None, all_precomputed=True, out=out, validate=validate,
                  check_finite=check_finite)
