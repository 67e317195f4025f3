"""Variable-length prefill attention: ``cukv.prefill_attention`` (SPEC §8.2).

Kernel: ``cuda_src/prefill_attention.cu`` (FlashAttention-2 style, ``mma.sync`` bf16 tensor cores with
fp32 accumulation, online softmax in registers, fully masked key tiles skipped).
Reference: :mod:`cukv.ref.attention_prefill` (float64).
"""
from __future__ import annotations

import math

import numpy as np

from . import _backend, _checks, _compile
from .formats import parse_format, row_bytes
from .ref import attention_prefill as ref

__all__ = ["prefill_attention"]

OP = "prefill_attention"
HEAD_DIMS = (64, 128, 256)
_FMT_CODE = {"bf16": 0, "fp8": 1, "fp8_head": 2, "int4": 3}
_LINEAR, _PAGED = 0, 1

# Tile configuration per head dimension: (MT, NW, BN, QREG, MINB). A CTA has NW warps of 16*MT query
# rows each (BM = NW*16*MT rows) and walks key tiles of BN keys; QREG keeps the Q fragments in
# registers instead of re-reading them from shared memory; MINB is the __launch_bounds__ occupancy.
CONFIGS = {64: (2, 4, 64, True, 2), 128: (2, 4, 64, False, 2), 256: (1, 4, 64, False, 2)}
# Alternatives for D = 128 (bf16, contiguous/packed K/V), declared so the benchmark can compare them.
ALT_CONFIGS_128 = ((1, 4, 64, True, 3), (1, 8, 64, True, 1), (2, 4, 32, False, 2))


def _fwd_expr(D, cfg, layout, fcode):
    return _compile.expression("prefill_attention_fwd", D, *cfg[:4], layout, fcode, cfg[4])


_PREFILL = _compile.Family("prefill_attention.cu", [
    _compile.expression("prefill_plan"),
    _compile.expression("prefill_fill_unowned"),
    *(_fwd_expr(D, cfg, layout, f) for D, cfg in CONFIGS.items() for layout in (_LINEAR, _PAGED)
      for f in range(4)),
    *(_fwd_expr(128, cfg, _LINEAR, 0) for cfg in ALT_CONFIGS_128),
], exact=False)


def _warm_one(args):
    expr, arch = args
    _compile._cached_cubin(_PREFILL, expr, arch)
    return expr


def warm_cache(arch: str, exprs=None, procs=None) -> int:
    """Compile prefill instantiations into cukv's cubin cache in parallel processes (NVRTC only, no
    GPU needed), so a test or benchmark session does not compile them one by one. Returns the count.
    """
    import concurrent.futures as cf  # noqa: PLC0415
    import multiprocessing as mp  # noqa: PLC0415
    import os  # noqa: PLC0415

    exprs = list(_PREFILL.expressions if exprs is None else exprs)
    if not exprs:
        return 0
    n = max(1, min(len(exprs), procs or os.cpu_count() or 1))
    with cf.ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_warm_one, [(e, arch) for e in exprs]))
    return len(exprs)


# ------------------------------------------------------------------------------------ checks
class _Geom:
    __slots__ = ("layout", "B", "T_q", "N_H", "D", "N_KVH", "T_k", "capacity", "n_pages", "page_size",
                 "fmt", "kind", "G", "external", "scale")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _check_args(q, k, v, cu_q, cu_k, lens_k, bt, page_size, softmax_scale, fmt, qp_k, qp_v) -> _Geom:
    """Every host-side check of SPEC §1.4 (no device memory is read)."""
    op = OP
    _checks.check_dtype(op, "q", q, _checks.BF16)
    if q.ndim != 3:
        _checks.fail(op, "q", "bfloat16 [T_q, N_H, D]", _checks.describe(q))
    T_q, N_H, D = (int(s) for s in q.shape)
    if D not in HEAD_DIMS:
        _checks.fail(op, "q", f"head dimension D in {{64, 128, 256}} (q.shape[2])", f"D={D}")
    _checks.check_dtype(op, "cu_seqlens_q", cu_q, _checks.I32)
    if cu_q.ndim != 1 or cu_q.shape[0] < 1:
        _checks.fail(op, "cu_seqlens_q", "int32 [B+1] (at least one element)", _checks.describe(cu_q))
    B = int(cu_q.shape[0]) - 1

    if (cu_k is None) == (lens_k is None):
        _checks.fail(op, "cu_seqlens_k", "exactly one of cu_seqlens_k (packed K/V) and seqlens_k "
                     "(padded or paged K/V)", "both" if cu_k is not None else "neither")
    if bt is not None and cu_k is not None:
        _checks.fail(op, "block_tables", "None with cu_seqlens_k (paged K/V take seqlens_k)",
                     _checks.describe(bt))
    layout = "packed" if cu_k is not None else ("paged" if bt is not None else "padded")

    # format of K/V
    if fmt is None:
        if k.dtype == _checks.U8:
            raise ValueError(f"{op}: fmt: expected a format string for uint8 K/V caches (row sizes are "
                             f"ambiguous), got None for k {_checks.describe(k)}")
        kind, G, fmt_s = "bf16", 0, "bf16"
    else:
        kind, G = parse_format(fmt, op)
        fmt_s = fmt
    if kind != "bf16" and layout == "packed":
        _checks.fail(op, "fmt", "None or 'bf16' for packed K/V (quantized caches are padded or paged, "
                     "with seqlens_k)", repr(fmt))
    cdt = _checks.BF16 if kind == "bf16" else _checks.U8
    _checks.check_dtype(op, "k", k, cdt)
    _checks.check_dtype(op, "v", v, cdt)
    external = kind == "fp8" and qp_k is not None
    R = row_bytes(fmt_s, D, external)
    unit = "elements" if kind == "bf16" else "bytes"
    row_what = f"{R} {unit} per row for fmt {fmt_s!r} and D={D}"

    if not _is_int(page_size) or page_size < 1:
        _checks.fail(op, "page_size", "an integer >= 1", repr(page_size))
    S = int(page_size)
    n_pages = 0
    if layout == "packed":
        _checks.check_array(op, "k", k, cdt, (None, None, R), f"[T_k, N_KVH, {D}] (packed K/V)")
        T_k, cap = int(k.shape[0]), int(k.shape[0])
        _checks.check_array(op, "cu_seqlens_k", cu_k, _checks.I32, (B + 1,), f"int32 [B+1={B + 1}]")
    elif layout == "padded":
        _checks.check_array(op, "k", k, cdt, (B, None, None, R), f"[B={B}, KV_PAD, N_KVH, {R}] ({row_what})")
        T_k, cap = 0, int(k.shape[1])
        _checks.check_array(op, "seqlens_k", lens_k, _checks.I32, (B,), f"int32 [B={B}]")
    else:
        _checks.check_array(op, "k", k, cdt, (1, None, None, R), f"[1, P*{S}, N_KVH, {R}] ({row_what})")
        if k.shape[1] % S:
            _checks.fail(op, "k", f"shape[1] a multiple of page_size={S}", _checks.describe(k))
        _checks.check_dtype(op, "block_tables", bt, _checks.I32)
        if bt.ndim != 2 or bt.shape[0] != B:
            _checks.fail(op, "block_tables", f"int32 [B={B}, max_pages]", _checks.describe(bt))
        n_pages = int(k.shape[1]) // S
        T_k, cap = 0, int(bt.shape[1]) * S
        _checks.check_array(op, "seqlens_k", lens_k, _checks.I32, (B,), f"int32 [B={B}]")
    if tuple(v.shape) != tuple(k.shape):
        _checks.fail(op, "v", f"the shape of k {_checks.describe(k)}", _checks.describe(v))
    N_KVH = int(k.shape[-2])
    if N_KVH < 1 or N_H % N_KVH:
        _checks.fail(op, "k", f"N_KVH >= 1 dividing N_H={N_H} (k.shape[-2])", f"N_KVH={N_KVH}")

    for name, qp in (("qparam_k", qp_k), ("qparam_v", qp_v)):
        if kind == "fp8":
            if qp is not None:
                _checks.check_array(op, name, qp, _checks.I32, tuple(k.shape[:3]),
                                    f"int32 {list(k.shape[:3])} (external fp8 qparams, k.shape[:3])")
        elif kind == "fp8_head":
            if qp is None:
                _checks.fail(op, name, f"float32 [B={B}, N_KVH={N_KVH}] scales for fmt 'fp8_head'", "None")
            _checks.check_array(op, name, qp, _checks.F32, (B, N_KVH), f"float32 [B={B}, N_KVH={N_KVH}]")
        elif qp is not None:
            _checks.fail(op, name, f"None for fmt {fmt_s!r}", _checks.describe(qp))
    if kind == "fp8" and (qp_k is None) != (qp_v is None):
        _checks.fail(op, "qparam_v", "external qparams for both k and v or for neither",
                     "None" if qp_v is None else _checks.describe(qp_v))

    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.integer,
                                                                              np.floating)):
            _checks.fail(op, "softmax_scale", "a finite number > 0 or None", repr(softmax_scale),
                         TypeError)
        scale = float(softmax_scale)
        if not (math.isfinite(scale) and scale > 0 and math.isfinite(float(np.float32(scale)))
                and float(np.float32(scale)) > 0):
            _checks.fail(op, "softmax_scale", "a finite number > 0 (as float32) or None",
                         repr(softmax_scale))
    return _Geom(layout=layout, B=B, T_q=T_q, N_H=N_H, D=D, N_KVH=N_KVH, T_k=T_k, capacity=cap,
                 n_pages=n_pages, page_size=S, fmt=fmt_s, kind=kind, G=max(G, 1), external=external,
                 scale=float(np.float32(scale)))


def _contents_ok(xp, geo, cu_q, cu_k, lens_k, bt, causal):
    """One device boolean: every index content check of SPEC §1.4 passes (no synchronisation)."""
    i64 = np.int64
    cq = cu_q.astype(i64)
    flags = [cq[0] != 0, cq[-1] != geo.T_q, (cq[1:] < cq[:-1]).any()]
    if cu_k is not None:
        ck = cu_k.astype(i64)
        flags += [ck[0] != 0, ck[-1] != geo.T_k, (ck[1:] < ck[:-1]).any()]
        lk = ck[1:] - ck[:-1]
    else:
        lk = lens_k.astype(i64)
        flags.append(((lk < 0) | (lk > geo.capacity)).any())
    if bt is not None and bt.size:
        touched = _checks.block_table_touched(xp, bt, xp.clip(lk, 0, geo.capacity), geo.page_size)
        flags.append((touched & ((bt < 0) | (bt >= geo.n_pages))).any())
    if causal and geo.B:
        flags.append(((cq[1:] - cq[:-1]) > lk).any())
    return ~xp.stack([xp.asarray(f) for f in flags]).any()


def _cu_report(op, arg, cu, total, total_name):
    if cu[0] != 0:
        _checks.fail(op, f"{arg}[0]", "0", str(int(cu[0])))
    d = np.flatnonzero(cu[1:] < cu[:-1])
    if d.size:
        i = int(d[0]) + 1
        _checks.fail(op, f"{arg}[{i}]", f"non-decreasing offsets (>= {arg}[{i - 1}] = {int(cu[i - 1])})",
                     str(int(cu[i])))
    if cu[-1] != total:
        _checks.fail(op, f"{arg}[{cu.shape[0] - 1}]", f"the packed length {total_name} = {total}",
                     str(int(cu[-1])))


def _report_contents(geo, cu_q, cu_k, lens_k, bt, causal):
    """Raise the ``ValueError`` for the first failed content check (host arrays)."""
    op = OP
    cu_q = np.asarray(cu_q, dtype=np.int64)
    _cu_report(op, "cu_seqlens_q", cu_q, geo.T_q, "T_q")
    if cu_k is not None:
        ck = np.asarray(cu_k, dtype=np.int64)
        _cu_report(op, "cu_seqlens_k", ck, geo.T_k, "T_k")
        lk = ck[1:] - ck[:-1]
    else:
        lk = np.asarray(lens_k, dtype=np.int64)
        _checks.check_index_contents(op, "seqlens_k", lk, 0, geo.capacity + 1,
                                     what=f"a key count in [0, {geo.capacity}] (the capacity)")
    if bt is not None:
        _checks.check_block_table_entries(op, np.asarray(bt), _checks.block_table_touched(np, np.asarray(bt), lk,
                                                                           geo.page_size), geo.n_pages)
    if causal:
        lq = cu_q[1:] - cu_q[:-1]
        bad = np.flatnonzero(lq > lk)
        if bad.size:
            b = int(bad[0])
            _checks.fail(op, "cu_seqlens_q", "L_q(b) <= L_k(b) for every lane of a causal call "
                         "(bottom-right aligned mask)", f"L_q({b}) = {int(lq[b])} > L_k({b}) = {int(lk[b])}")
    raise ValueError(f"{op}: internal error: a content check failed on the device but not on the host")


# ------------------------------------------------------------------------------------ device
def _strided(xp, a, align: int):
    """``(array, strides in elements)`` with unit last-axis stride, every stride and the base address a
    multiple of ``align`` bytes; otherwise a C-contiguous copy (read-only inputs, SPEC §1.5)."""
    it = a.itemsize
    ok = a.size == 0 or (a.strides[-1] == it and int(a.data.ptr) % align == 0
                         and all(s % align == 0 for s, n in zip(a.strides[:-1], a.shape[:-1]) if n > 1))
    if not ok:
        a = a.copy()
    return a, tuple(int(s) // it for s in a.strides)


def _run_gpu(geo, q, k, v, cu_q, cu_k, lens_k, bt, qp_k, qp_v, causal, return_lse, validated=True,
             cfg=None):
    xp = _backend.cupy()
    D = geo.D
    cfg = cfg or CONFIGS[D]
    MT, NW, BN, QREG, MINB = cfg
    BM = NW * 16 * MT
    out = xp.empty((geo.T_q, geo.N_H, D), dtype=_checks.BF16)
    lse = xp.empty((geo.T_q, geo.N_H), dtype=np.float32) if return_lse else None
    if geo.T_q == 0 or geo.N_H == 0:
        return out, lse
    if geo.B == 0:                       # no lane owns a row: out = 0, lse = -inf (as the reference)
        out.fill(0)
        if lse is not None:
            lse.fill(-np.inf)
        return out, lse
    q, (q_st, q_sh, _) = _strided(xp, q, 16)
    align = 16 if geo.kind == "bf16" else 4
    k, ks = _strided(xp, k, align)
    v, vs = _strided(xp, v, align)
    if geo.layout == "packed":
        k_sb, k_st, k_sh = 0, ks[0], ks[1]
        v_sb, v_st, v_sh = 0, vs[0], vs[1]
    elif geo.layout == "padded":
        k_sb, k_st, k_sh = ks[0], ks[1], ks[2]
        v_sb, v_st, v_sh = vs[0], vs[1], vs[2]
    else:
        k_sb, k_st, k_sh = 0, ks[1], ks[2]
        v_sb, v_st, v_sh = 0, vs[1], vs[2]
    cu_q = xp.ascontiguousarray(cu_q)
    cu_k = xp.ascontiguousarray(cu_k) if cu_k is not None else None
    lens_k = xp.ascontiguousarray(lens_k) if lens_k is not None else None
    bt = xp.ascontiguousarray(bt) if bt is not None else None
    if qp_k is not None:
        qp_k = xp.ascontiguousarray(qp_k).view(np.int32)
        qp_v = xp.ascontiguousarray(qp_v).view(np.int32)

    i32 = _compile.i32
    plan = xp.empty((geo.B, 4), dtype=np.int32)
    blk_cum = xp.empty((geo.B + 1,), dtype=np.int32)
    ctl = xp.empty((3,), dtype=np.int32)
    cap_k = geo.T_k if geo.layout == "packed" else geo.capacity
    _compile.launch(_PREFILL.kernel("prefill_plan"), (1,), (1024,),
                    (cu_q, i32(geo.T_q), cu_k, lens_k, i32(cap_k), i32(BM), i32(geo.B), plan, blk_cum,
                     ctl))
    if not validated:   # rows that no lane owns: out = 0, lse = -inf (as the reference)
        _compile.launch(_PREFILL.kernel("prefill_fill_unowned"), (256,), (256,),
                        (ctl, i32(geo.T_q), i32(geo.N_H), i32(geo.N_H * D // 8), out, lse))

    layout = _PAGED if geo.layout == "paged" else _LINEAR
    fcode = _FMT_CODE[geo.kind]
    kern = _PREFILL.kernel("prefill_attention_fwd", D, MT, NW, BN, QREG, layout, fcode, MINB)
    n_blocks = geo.T_q // BM + geo.B
    grid = n_blocks * geo.N_H
    if grid >= 2 ** 31:
        _checks.fail(OP, "q", f"fewer than 2^31 / N_H query blocks of {BM} rows", f"{n_blocks} blocks")
    R = row_bytes(geo.fmt, D, geo.external) if geo.kind != "bf16" else 0
    rsp = (R + 15) // 16 * 16
    smem = (BM + 2 * BN) * D * 2 + BN + 8 * (BN + 4) + (2 * BN * rsp + 8 * BN if R else 0)
    S = geo.page_size
    page_shift = S.bit_length() - 1 if S & (S - 1) == 0 else -1
    scale_log2 = np.float32(geo.scale * math.log2(math.e))
    kv_pad = int(k.shape[1]) if geo.layout == "padded" else 0
    qp_off = 4 if geo.kind == "fp8" and not geo.external else 0
    i64 = _compile.i64
    _compile.launch(kern, (grid,), (NW * 32,),
                    (q, i64(q_st), i64(q_sh), k, v, i64(k_sb), i64(k_st), i64(k_sh),
                     i64(v_sb), i64(v_st), i64(v_sh), plan, blk_cum, bt, qp_k, qp_v, out, lse,
                     i32(geo.B), i32(geo.N_H), i32(geo.N_H // geo.N_KVH), i32(geo.N_KVH),
                     i32(1 if causal else 0), scale_log2,
                     i32(bt.shape[1] if bt is not None else 0), i32(S), i32(page_shift),
                     i32(geo.n_pages), i32(kv_pad), i32(geo.G), i32(R), i32(qp_off)),
                    shared_mem=smem)
    return out, lse


# ------------------------------------------------------------------------------------ public
@_backend.op(OP, arrays=("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqlens_k", "block_tables",
                         "qparam_k", "qparam_v"))
def prefill_attention(q, k, v, cu_seqlens_q, *, cu_seqlens_k=None, seqlens_k=None, block_tables=None,
                      page_size=64, causal=True, softmax_scale=None, return_lse=False, validate=True,
                      check_finite=False, fmt=None, qparam_k=None, qparam_v=None):
    """Variable-length (causal) attention of packed queries over packed, padded or paged K/V.

    Parameters
    ----------
    q : bfloat16 ``[T_q, N_H, D]``
        Packed queries, ``D`` in {64, 128, 256}; any strides.
    k, v : bfloat16
        Exactly one layout: **packed** ``[T_k, N_KVH, D]`` with ``cu_seqlens_k``; **padded**
        ``[B, KV_PAD, N_KVH, D]`` with ``seqlens_k`` (a contiguous bf16 cache); **paged**
        ``[1, P*S, N_KVH, D]`` with ``block_tables`` and ``seqlens_k`` (SPEC §3). With ``fmt`` a
        quantized format, padded or paged uint8 caches ``[..., N_KVH, R]`` (an extension, below).
        ``N_H % N_KVH == 0``: query head ``h`` reads KV head ``h // (N_H / N_KVH)``. Any strides.
    cu_seqlens_q : int32 ``[B+1]``
        Lane ``b`` owns query rows ``[cu_seqlens_q[b], cu_seqlens_q[b+1])``; ``L_q(b)`` rows.
    cu_seqlens_k : int32 ``[B+1]``, optional
        Packed K/V: lane ``b`` owns rows ``[cu_seqlens_k[b], cu_seqlens_k[b+1])``.
    seqlens_k : int32 ``[B]``, optional
        Padded or paged K/V: ``L_k(b)``, the lane's key count (``<= capacity``).
    block_tables : int32 ``[B, max_pages]``, optional
        Paged K/V; ``page_size`` rows per page. Entries past a lane's last page are never read.
    causal : bool
        Bottom-right aligned mask: query row ``r`` sits at position ``r + L_k - L_q`` and sees keys
        ``j <= r + L_k - L_q``; requires ``L_q(b) <= L_k(b)``. ``False`` attends every ``j < L_k``.
    softmax_scale : float, optional
        Default ``1/sqrt(D)``; used as float32, must be finite and > 0.
    return_lse : bool
        Also return the log-sum-exp (natural log, in units of scaled scores).
    validate : bool
        Check ``cu_seqlens`` (0 first, non-decreasing, packed length last), ``seqlens_k`` in
        ``[0, capacity]``, used block-table entries in ``[0, P)`` and, if causal, ``L_q <= L_k``: one
        reduction and one synchronisation on CuPy. With ``False`` nothing synchronises; ranges are
        clamped, a key behind an out-of-range page id is excluded, nothing is read out of bounds, rows
        that no lane owns are 0 (``lse = -inf``) and rows of overlapping lanes are unspecified.
    check_finite : bool
        Reject NaN/Inf in ``q`` (and in packed ``k``/``v``; caches are not scanned).
    fmt : str, optional
        ``None``/``"bf16"`` for bf16 K/V. **Extension:** ``"fp8"``, ``"fp8_head"`` or ``"int4:gG"`` for
        padded or paged uint8 caches; K/V tiles are dequantized in shared memory to exactly the bf16
        values of :func:`cukv.dequantize` (SPEC §2.3-§2.5), so the result equals
        ``dequantize_cache`` followed by bf16 attention.
    qparam_k, qparam_v : optional
        ``fp8``: external int32 words ``k.shape[:3]`` (or None for inline qparams); ``fp8_head``: float32
        scales ``[B, N_KVH]`` (required).

    Returns
    -------
    out : bfloat16 ``[T_q, N_H, D]``
    lse : float32 ``[T_q, N_H]``, with ``return_lse``
        A row with no visible key (``L_k = 0``) gives ``out = 0`` and ``lse = -inf``.

    Raises
    ------
    TypeError
        Wrong dtype or array module, float8 ``ml_dtypes`` arrays, non-numeric ``softmax_scale``.
    ValueError
        Shapes, layout combination, ``D``, ``N_H % N_KVH``, ``page_size``, ``fmt``, ``softmax_scale``;
        with ``validate``, index contents; with ``check_finite``, a non-finite activation.

    Notes
    -----
    FlashAttention-2 forward on ``mma.sync.m16n8k16`` (bf16 in, fp32 accumulation), exp2 with a
    log2(e)-prescaled scale, ``P`` rounded to bf16 for ``P V`` while ``l`` sums the unrounded values;
    shared memory does not grow with the sequence length. Accuracy: SPEC §11.2 against the float64
    :func:`cukv.ref.attention_prefill.prefill_attention_f64`. **cukv differs** from FBGEMM, whose
    attention needs ``D = 128`` and does not page: every layout, ``D`` and GQA ratio here, and
    quantized caches are read directly.

    The same kernel runs on sm_80 and sm_90 (``mma.sync`` only; no wgmma path). With ``fmt`` every
    CTA decodes the K/V tiles it reads, i.e. once per query head of a GQA group, so the fused path
    is ALU-bound and slower than ``dequantize_cache`` followed by bf16 attention when the cache is
    read by many query blocks (``scripts/bench_prefill.py`` measures both layouts and formats).

    See Also
    --------
    cukv.ref.attention_prefill.prefill_attention
    """
    geo = _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, seqlens_k, block_tables, page_size,
                      softmax_scale, fmt, qparam_k, qparam_v)
    be = _backend.current()
    xp = be.xp
    if validate:
        if not bool(_contents_ok(xp, geo, cu_seqlens_q, cu_seqlens_k, seqlens_k, block_tables, causal)):
            host = (lambda a: None if a is None else (a.get() if be.gpu else a))
            _report_contents(geo, host(cu_seqlens_q), host(cu_seqlens_k), host(seqlens_k),
                             host(block_tables), causal)
    if check_finite:
        packed = geo.layout == "packed"
        for name, a in (("q", q), ("k", k if packed else None), ("v", v if packed else None)):
            _checks.check_finite(OP, name, a)
    if not be.gpu:
        out, lse = ref.prefill_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqlens_k=seqlens_k,
            block_tables=block_tables, page_size=geo.page_size, causal=causal,
            softmax_scale=geo.scale, fmt=None if geo.kind == "bf16" else geo.fmt,
            qparam_k=qparam_k, qparam_v=qparam_v)
        return (out, lse) if return_lse else out
    out, lse = _run_gpu(geo, q, k, v, cu_seqlens_q, cu_seqlens_k, seqlens_k, block_tables,
                        qparam_k, qparam_v, causal, return_lse, validated=validate)
    return (out, lse) if return_lse else out
