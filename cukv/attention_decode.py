"""Decode attention straight over bf16 / FP8 / INT4 KV caches: ``cukv.decode_attention`` (SPEC §8.1).

Kernels: ``cuda_src/decode_attention.cu`` (split-K, tensor-core QK/PV, in-register dequantization,
cp.async pipelines, a deterministic log-sum-exp merge). Reference: :mod:`cukv.ref.attention_decode`.
The FBGEMM-named wrappers (``mqa_attn``, ``gqa_attn_splitk``) live in :mod:`cukv.fbgemm` and use
:func:`run` below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _backend, _checks, _compile
from .ref import attention_decode as ref

__all__ = ["decode_attention"]

HEAD_DIMS = (64, 128, 256)
_KIND = {"bf16": 0, "fp8": 1, "fp8_head": 1, "int4": 2}
_STAGES = {0: 3, 1: 2, 2: 2}          # Geo<KIND, D>::STAGES in the .cu (CUKV_DA_STAGES_Q)
_STAGES_REC = 2                       # the records ring (CUKV_DA_STAGES_REC)
_SMEM_TARGET = 112 * 1024             # per CTA: two CTAs fit one H100 SM
_MAX_AUTO_SPLITS = 128
_TUNE: dict = {}                      # tuning overrides (benchmarks only): nw, smem_target, head_major, occ,
                                      # tma, stream, records, stream_occ, stream_any, l2_promotion, half,
                                      # swizzle
_LAST: dict = {}                      # the last launch's schedule ("split" / "stream" / "records"), CTA
                                      # count, kpack and swizzle (tests and scripts/bench_decode.py read it)

_MERGE_WARPS = 8                      # warps per merge block (decode_attn_merge*<NWM, WIDE>)
_STREAM_MAX_B = 512                   # the stream schedule's prologue scans every lane's length per CTA
_FAMILY = _compile.Family("decode_attention.cu", [
    *(_compile.expression("decode_attn", k, d, nt, 0) for k in (0, 1, 2) for d in HEAD_DIMS
      for nt in (0, 1, 2)),
    *(_compile.expression("decode_attn", k, d, nt, st) for k in (1, 2) for st in (1, 2) for d in HEAD_DIMS
      for nt in (0, 1, 2)),
    *(_compile.expression("decode_attn", 2, d, nt, 3) for d in HEAD_DIMS for nt in (0, 1, 2)),
    *(_compile.expression(m, _MERGE_WARPS, wide) for m in ("decode_attn_merge", "decode_attn_merge_stream")
      for wide in (False, True)),
], exact=False)


# ------------------------------------------------------------------------------------ validation
@dataclass
class Plan:
    """Validated arguments of one decode-attention call."""

    op: str
    q: object
    cache_k: object
    cache_v: object
    seqlens: object
    qparam_k: object
    qparam_v: object
    block_tables: object
    geom: _checks.CacheGeom
    B: int
    n_heads: int
    D: int
    scale: float
    num_splits: int | None


def _fail_contents(op, arg, a, bad, expected, shift=0):
    a_h = a.get() if _backend.is_cupy(a) else np.asarray(a)
    bad_h = bad.get() if _backend.is_cupy(bad) else np.asarray(bad)
    i = np.unravel_index(_checks.first_bad_index(bad_h.ravel()), bad_h.shape)
    idx = ", ".join(str(int(j)) for j in i)
    _checks.fail(op, f"{arg}[{idx}]", expected, str(int(a_h[i]) - shift))


def prepare(op, q, cache_k, cache_v, seqlens, *, fmt, qparam_k, qparam_v, block_tables, page_size,
            softmax_scale, num_splits, validate, check_finite, seq_arg="seqlens", seq_shift=0,
            q_arg="q") -> Plan:
    """Every SPEC §1.4 check of decode attention, before any launch.

    ``seq_arg``/``seq_shift``/``q_arg`` name arguments in messages: the FBGEMM layer passes
    ``XQ[:, 0]`` and ``seqlens = seq_positions + 1`` with ``seq_arg="seq_positions", seq_shift=1``.
    """
    _checks.check_dtype(op, q_arg, q, _checks.BF16)
    if q.ndim != 3:
        _checks.fail(op, q_arg, "bfloat16 [B, N_H, D]", _checks.describe(q))
    B, NH, D = (int(s) for s in q.shape)
    if D not in HEAD_DIMS:
        _checks.fail(op, q_arg, "bfloat16 [B, N_H, D] with D in {64, 128, 256}", _checks.describe(q))
    if cache_v is None:
        _checks.fail(op, "cache_v", "a cache array like cache_k", "None", TypeError)
    geom = _checks.check_cache(op, cache_k, cache_v, fmt, D, block_tables=block_tables,
                               page_size=page_size, qparam_k=qparam_k, qparam_v=qparam_v, written=False)
    src = "block_tables.shape[0]" if geom.paged else "cache_k.shape[0]"
    if B != geom.B:
        _checks.fail(op, q_arg, f"bfloat16 [B={geom.B} ({src}), N_H, {D}]", _checks.describe(q))
    nkv = geom.n_kv_heads
    if nkv < 1 or NH % nkv:
        _checks.fail(op, q_arg, f"N_H (query heads) divisible by N_KVH={nkv} (cache_k.shape[2])", f"N_H={NH}")
    _checks.check_array(op, seq_arg, seqlens, _checks.I32, (B,), f"int32 [B={B}]")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.integer, np.floating)):
            _checks.fail(op, "softmax_scale", "a real number or None", repr(softmax_scale), TypeError)
        scale = float(softmax_scale)
        if not math.isfinite(scale):
            _checks.fail(op, "softmax_scale", "a finite number", repr(softmax_scale))
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or num_splits < 1:
            _checks.fail(op, "num_splits", "None or an integer >= 1", repr(num_splits))
        num_splits = int(num_splits)
    if check_finite:
        _checks.check_finite(op, q_arg, q)
    cap = geom.capacity
    if validate and B:
        bad = (seqlens < 0) | (seqlens > cap)
        if bool(bad.any()):
            _fail_contents(op, seq_arg, seqlens, bad,
                           f"in [{-seq_shift}, {cap - seq_shift}] (lengths within the cache capacity "
                           f"{cap})", seq_shift)
        if geom.paged and block_tables.size:
            xp = _backend.current().xp
            S = geom.page_size
            touched = (xp.arange(block_tables.shape[1], dtype=np.int64)[None, :] * S
                       < seqlens.astype(np.int64)[:, None])
            bad = touched & ((block_tables < 0) | (block_tables >= geom.n_pages))
            if bool(bad.any()):
                _fail_contents(op, "block_tables", block_tables, bad,
                               f"page ids in [0, {geom.n_pages}) for every page a lane attends")
    return Plan(op=op, q=q, cache_k=cache_k, cache_v=cache_v, seqlens=seqlens, qparam_k=qparam_k,
                qparam_v=qparam_v, block_tables=block_tables, geom=geom, B=B, n_heads=NH, D=D,
                scale=scale, num_splits=num_splits)


# ------------------------------------------------------------------------------------ GPU launch
_DEVICE_INFO: dict[int, tuple[int, int, int, int]] = {}


def _device_info(cp) -> tuple[int, int, int, int]:
    """(SM count, shared memory per SM, max opt-in shared memory per block, compute capability as
    major * 10 + minor) of the current device."""
    dev = cp.cuda.Device()
    info = _DEVICE_INFO.get(dev.id)
    if info is None:
        a = dev.attributes
        info = (int(a["MultiProcessorCount"]), int(a["MaxSharedMemoryPerMultiprocessor"]),
                int(a["MaxSharedMemoryPerBlockOptin"]), int(dev.compute_capability))
        _DEVICE_INFO[dev.id] = info
    return info


# ------------------------------------------------------------------------------------ tensor maps
_TMAP = np.dtype([("w", np.uint64, 16)])     # a CUtensorMap (128 bytes), passed to the kernel by value
_NO_TMAP = np.zeros((), _TMAP)[()]
_TMAPS: dict = {}
_ENCODE = []


def _encode_tiled():
    """``cuTensorMapEncodeTiled`` of the CUDA driver (ctypes), or None where it cannot be loaded."""
    if not _ENCODE:
        fn = None
        try:
            import ctypes  # noqa: PLC0415

            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuTensorMapEncodeTiled
            u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p,
                           u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _ENCODE.append(fn)
    return _ENCODE[0]


def _tensor_map(ptr: int, rec: int, T: int, B: int, box_w: int, elem: int = 1, rows: int = 16,
                swizzle: int = 0):
    """The tensor map of a cache ``[B, T, rec bytes]`` (C-contiguous) with boxes of ``rows`` rows x
    ``box_w`` bytes, seen as elements of ``elem`` bytes (1: uint8, 8: uint64, for boxes wider than 256
    bytes), or None if the driver refuses it. ``swizzle``: CUtensorMapSwizzle (3: 128-byte, the box
    rows then at most 128 bytes). Cached by its arguments."""
    # L2 promotion 128 B (H100: 1-3% faster than 256 B or none on fp8 / int4 decode)
    promo = int(_TUNE.get("l2_promotion", 2))
    key = (ptr, rec, T, B, box_w, promo, elem, rows, swizzle)
    m = _TMAPS.get(key)
    if m is None:
        import ctypes  # noqa: PLC0415

        fn = _encode_tiled()
        if fn is None:
            return None
        out = np.zeros((), _TMAP)
        dims = (ctypes.c_uint64 * 3)(rec // elem, T, B)
        strides = (ctypes.c_uint64 * 2)(rec, rec * T)
        box = (ctypes.c_uint32 * 3)(box_w // elem, rows, 1)
        es = (ctypes.c_uint32 * 3)(1, 1, 1)
        # uint8 (0) or uint64 (4), rank 3, no interleave, `swizzle` (0: none, 3: 128 bytes), L2 promotion
        # `promo`, OOB -> zeros
        rc = fn(out.ctypes.data, 0 if elem == 1 else 4, 3, ctypes.c_void_p(ptr), dims, strides, box, es, 0, swizzle,
                promo, 0)
        if rc != 0:
            return None
        if len(_TMAPS) > 256:
            _TMAPS.clear()
        m = _TMAPS[key] = out[()]
    return m


def auto_splits(base_ctas: int, capacity: int, n_sm: int, ctas_per_sm: int, *, dequant: int = 0) -> int:
    """``num_splits=None``: a split count that keeps the whole GPU busy, also at batch 1.

    ``base_ctas`` = lanes x KV heads x head groups. With ``slots = n_sm * ctas_per_sm``, the smallest
    split count whose CTAs fill the slots evenly (``ctas / (ceil(ctas / slots) * slots) >= 0.96``) is
    taken (0.96: at batch 1 a 0.9 rule left 12 of 132 H100 SMs idle); splits keep at least 256 keys
    of capacity each. The dequantizing kinds are arithmetic-heavy and, once there are at least half as
    many base CTAs as SMs, run best with about ``dequant`` CTAs per SM in total (16 for fp8, 8 for int4:
    H100 sweeps with the TMA copy, e.g. fp8 B16 x 8 KV heads: 2 splits 0.255 ms, 16 splits 0.232 ms).
    """
    if base_ctas <= 0:
        return 1
    s_max = max(1, min(_MAX_AUTO_SPLITS, capacity // 256))
    if dequant and 2 * base_ctas >= n_sm:
        return max(1, min(s_max, round(dequant * n_sm / base_ctas)))
    slots = max(1, n_sm * max(1, ctas_per_sm))
    best, best_eff = 1, -1.0
    for s in range(1, s_max + 1):
        ctas = base_ctas * s
        eff = ctas / (-(-ctas // slots) * slots)
        if eff >= 0.96:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def _layout(kind: str, fmt_g: int, D: int, R_bytes: int, external: bool):
    """Shared-memory row slots: (pad, hdr, sK, sV, stage_bytes, warp_bytes, STAGES).

    ``hdr``: qparam bytes at the row front; ``pad``: where the generic copy puts a row in its slot
    (payload 16-aligned). The fast copy puts a row at its address mod 16 (<= 12), so a slot holds
    ``R + 15`` bytes rounded up, plus 16 bytes of bank skew (bf16) or rounded to an odd number of
    16-byte lines (quantized kinds, see ``k_elem`` in the .cu).
    """
    hdr = {"bf16": 0, "fp8": 0 if external else 4, "fp8_head": 0, "int4": 4 * fmt_g}[kind]
    pad = (-hdr) % 16
    shift = pad if kind == "bf16" else max(pad, 12)      # bf16 rows take the fast copy only when 16-aligned
    if kind == "bf16":
        slot = 16 * (-(-(shift + R_bytes) // 16) + 1)     # bank skew for the LDS.128 reads
    else:
        slot = _odd_lines(shift + R_bytes)                # conflict-free interleaved K word reads
    stages = _STAGES[_KIND[kind]]
    stage_bytes, warp_bytes = _ring(slot, stages)
    return pad, hdr, slot, slot, stage_bytes, warp_bytes, stages


def _ring(slot: int, stages: int, tma: bool = False, kpack: int = 1) -> tuple[int, int]:
    """(stage_bytes, warp_bytes) of one warp's ring: ``stages`` slots of 16 K + 16 V rows of ``slot``
    bytes (tensor copies of ``kpack`` tokens a box row: 16 / kpack rows each) plus 128 bytes (fp8
    external words), then the row offsets (256 bytes) and masks (16 bytes); tensor copies add the stage
    mbarriers and keep every ring 128-byte aligned (TMA destinations)."""
    stage_bytes = 2 * (-(-(16 // kpack * slot) // 128) * 128) + 128   # (the V box 128-byte aligned)
    extra, align = (32, 128) if tma else (0, 16)
    return stage_bytes, -(-(stages * stage_bytes + 256 + 16 + extra) // align) * align


def _odd_lines(nbytes: int) -> int:
    """``nbytes`` rounded up to an odd number of 16-byte lines: rows at this pitch put the interleaved
    K word reads of keys g = 0..7 (see ``k_elem`` in the .cu) in 32 different banks."""
    lines = -(-nbytes // 16)
    return 16 * (lines + 1 - lines % 2)


def _tma_box(R_bytes: int, n_kv: int, kpack: int = 1) -> int:
    """Bytes per row of a tensor-copy box: from the 16-byte boundary at or before any head's row (the
    TMA engine needs 16-byte-aligned box starts) to past its end, an odd number of 16-byte lines
    (conflict-free K word reads, see :func:`_layout`). Row h of a record starts at h * R_bytes. With
    ``kpack`` > 1 a box row is ``kpack`` consecutive token records and holds the head's ``kpack`` rows."""
    span = (kpack - 1) * n_kv * R_bytes + R_bytes
    return _odd_lines(max((h * R_bytes) % 16 + span for h in range(min(n_kv, 4))))


def _record_pitch(rec: int) -> int:
    """Bytes per token record in the ``records`` ring: the record (a multiple of 16 bytes) itself where
    its K word reads meet at most 2-way bank conflicts (a pitch of 4 words mod 8 or 8 words mod 16); else
    rounded up to an odd number of 16-byte lines (conflict-free), the box then running past the record,
    where the TMA fills zeros. H100, fp8 with 8 KV heads (1056-byte records), same run: the exact box
    0.2132 ms at B64 T4096, the padded one 0.2150 ms (copy-only probe: 92.4% of copy against 89.3%);
    reading the words of keys 4-7 rotated to avoid the 2-way conflicts gained nothing measurable."""
    words = rec // 4
    return rec if words % 8 == 4 or words % 16 == 8 else _odd_lines(rec)


def _smem(D: int, nw: int, warp_bytes: int, stream: bool = False) -> int:
    if stream:                         # q fragments per warp, no combine area
        return nw * (32 * D + warp_bytes)
    return 32 * D + max(nw * warp_bytes, nw * 16 * D * 4 + nw * 16 * 12)   # combine: O, m, l, shift sum


def _occupancy(kernel, smem: int, nw: int, smem_sm: int) -> int:
    """CTAs of ``nw`` warps and ``smem`` bytes that fit one SM (registers and shared memory)."""
    regs = max(1, int(getattr(kernel, "num_regs", 128) or 128))
    per_warp = -(-regs * 32 // 256) * 256
    return max(1, min(smem_sm // (smem + 1024), 65536 // (per_warp * nw), 32))


def _merge_launch(name: str, n_tasks: int, partials: float, D: int):
    """(kernel, grid, block) of a merge, launched with PDL (see :func:`_compile.launch`). With many
    partials per (lane, head) task (>= 64) a block of 8 warps merges 32 columns of a task (the warps
    split its partials); else each warp merges one task (with 16.5 partials, int4 records B16 T16384,
    the 2048 blocks of 32 columns took a call from 149 to 173 us). H100, fp8 records, 32/8 heads, D128,
    time a call spends after the decode kernel (B64 T4096 / B16 T16384 / B128 T2048 / B1 T131072): plain
    launch 6.1 / 5.9 / 9.2 / 10.3 us, PDL 4.4 / 4.2 / 7.1 / 9.5 us; the 32-column blocks then took B1
    from 114.5 to 111.8 us. Since then the 32-column blocks load their partials in one round trip
    (``merge_wide`` in the .cu)."""
    wide = partials >= 64
    grid = n_tasks * (D // 32) if wide else -(-n_tasks // _MERGE_WARPS)
    return _FAMILY.kernel(name, _MERGE_WARPS, wide), (grid,), (32 * _MERGE_WARPS,)


def _pick_copy_width(vals) -> int:
    for w in (16, 8, 4):
        if all(int(v) % w == 0 for v in vals):
            return w
    return 1


@dataclass
class Config:
    """Launch configuration of one plan: kernel, warps per CTA, shared memory, split count and the
    shared-memory row layout (see ``decode_attention.cu``)."""

    kernel: object
    nw: int
    smem: int
    num_splits: int
    n_hg: int
    pad: int
    hdr: int
    sK: int
    sV: int
    stage_bytes: int
    warp_bytes: int
    auto: bool = False


def _nt(r: int) -> int:
    """decode_attn's head-tile template argument for ``r`` query heads a KV head: 2 (two tiles of 8) above
    8, 1 above 4, else 0 (HALF: one tile holding both d halves of the <= 4 heads, so half the output
    accumulators and P.V operands without key pairing; H100, int4:g4 32/8 heads D128: 2.7-4.5% faster)."""
    if r <= 4 and _TUNE.get("half", True):
        return 0
    return 1 if r <= 8 else 2


def config(p: Plan, num_splits: int | None = None) -> Config:
    """The launch configuration :func:`run` uses (``num_splits=None``: the plan's, else automatic)."""
    cp = _backend.cupy()
    g = p.geom
    r = p.n_heads // g.n_kv_heads if g.n_kv_heads else 1
    n_hg = max(1, -(-r // 16))
    item = 2 if g.kind == "bf16" else 1
    pad, hdr, sK, sV, stage_bytes, warp_bytes, _ = _layout(g.kind, g.groups, p.D, g.R * item, g.external)
    n_sm, smem_sm, smem_optin, _ = _device_info(cp)
    limit = min(_TUNE.get("smem_target", _SMEM_TARGET), smem_optin)
    nw = next((w for w in (4, 2, 1) if _smem(p.D, w, warp_bytes) <= limit), 1)
    nw = min(nw, _TUNE.get("nw", 4))
    smem = _smem(p.D, nw, warp_bytes)
    kernel = _FAMILY.kernel("decode_attn", _KIND[g.kind], p.D, _nt(r), 0)
    S = num_splits if num_splits is not None else p.num_splits
    auto = S is None
    if auto:
        # CTAs the chip should hold at once: one per SM for bf16 (memory-bound: one CTA of 4 warps
        # streams fast enough; at batch 1 two per SM measured 10% slower), two or four for the
        # dequantizing kinds (more warps hide their arithmetic), fewer if shared memory or registers
        # allow less (H100 sweeps, scripts/bench_decode.py).
        occ = _occupancy(kernel, smem, nw, smem_sm)
        base = p.B * g.n_kv_heads * n_hg
        # int4 holds four CTAs per SM (<= 128 registers), but since the S^T = K Q^T kernel a single
        # wave of four per SM runs slower than two per SM or several waves (H100, B16 x 8 KV heads:
        # 2 splits 0.171 ms, 4 splits 0.193-0.198 ms, 8 splits 0.173 ms; B64: 1/2/3 splits 0.182/0.176/
        # 0.174 ms; B128: 1/2 splits 0.164/0.184 ms), so two per SM below two waves, 8 in total above.
        cap = {"bf16": 1}.get(g.kind, 2)
        occ = min(occ, _TUNE.get("occ", cap))
        S = auto_splits(base, g.capacity, n_sm, occ, dequant={"bf16": 0, "int4": 8}.get(g.kind, 16))
    return Config(kernel=kernel, nw=nw, smem=smem, num_splits=S, n_hg=n_hg, pad=pad, hdr=hdr, sK=sK, sV=sV,
                  stage_bytes=stage_bytes, warp_bytes=warp_bytes, auto=auto)


def run(p: Plan, *, partials: bool = False, dots: bool = False, num_splits: int | None = None):
    """Launch decode attention on the GPU. Returns ``(out, lse, part_a, part_ml, dots)``.

    ``partials``: always go through the float32 split partials (``part_a [B, S, N_H, D]``,
    ``part_ml [B, 2, S, N_H]``) and return them; ``dots``: also return the raw scores
    ``float32 [B, N_H, capacity]`` (0 where not attended).
    """
    cp = _backend.cupy()
    g = p.geom
    B, NH, D = p.B, p.n_heads, p.D
    out = cp.empty((B, NH, D), dtype=_checks.BF16)
    lse = cp.empty((B, NH), dtype=np.float32)
    nkv = g.n_kv_heads
    if B == 0 or NH == 0:
        S = num_splits or p.num_splits or 1
        pa = cp.zeros((B, S, NH, D), np.float32) if partials else None
        pm = cp.zeros((B, 2, S, NH), np.float32) if partials else None
        dt = cp.zeros((B, NH, g.capacity), np.float32) if dots else None
        return out, lse, pa, pm, dt
    cfg = config(p, num_splits)
    S = cfg.num_splits
    kind = g.kind
    q = cp.ascontiguousarray(p.q)
    ck, cv = p.cache_k, p.cache_v
    item = ck.dtype.itemsize
    if ck.strides[-1] != item or cv.strides[-1] != item or ck.strides != cv.strides:
        ck, cv = cp.ascontiguousarray(ck), cp.ascontiguousarray(cv)
    R_bytes = g.R * item
    cs0, cs1, cs2 = (int(s) for s in ck.strides[:3])
    fp8_mode, qpk, qpv, ws = 0, None, None, (0, 0, 0)
    if kind == "fp8" and g.external:
        fp8_mode = 1
        qpk, qpv = p.qparam_k, p.qparam_v
        if qpk.strides != qpv.strides or any(int(s) % 4 for s in qpk.strides):
            qpk, qpv = cp.ascontiguousarray(qpk), cp.ascontiguousarray(qpv)
        ws = tuple(int(s) // 4 for s in qpk.strides)
    elif kind == "fp8_head":
        fp8_mode = 2
        qpk, qpv = cp.ascontiguousarray(p.qparam_k), cp.ascontiguousarray(p.qparam_v)
    outer = [cs1] + ([] if g.paged else [cs0])
    pk, pv = ck.data.ptr, cv.data.ptr
    copy_w = _pick_copy_width([R_bytes, cfg.pad, cs2, pk, pv] + outer)
    # fast copy: every row of a head sits at the same address mod 16 (and bf16 rows are 16-aligned)
    fast = (all(v % 16 == 0 for v in outer) and all(v % 4 == 0 for v in (R_bytes, cs2, pk, pv))
            and (kind != "bf16" or all(v % 16 == 0 for v in (cs2, pk, pv))))
    # Hopper tensor copies (fast = 3): contiguous quantized caches whose token records are 16-byte
    # aligned; a row sits at its address mod 16 in a slot of one box row (_tma_box)
    tk = tv = _NO_TMAP
    pad, sK, sV, stage_bytes, warp_bytes, smem = cfg.pad, cfg.sK, cfg.sV, cfg.stage_bytes, cfg.warp_bytes, cfg.smem
    # Token records that are not 16-byte aligned (fp8 rows of 132 bytes with 1 or 2 KV heads) are read
    # kpack at a time: a box row is kpack consecutive records (16-byte aligned), the head's kpack rows
    # in it, where that reads at most twice the head's bytes. H100, fp8 B16 T16384 D128, the split
    # schedule: 16/2 heads 159.3 -> 60.6 us, 8/1 85.6 -> 38.9 us (4-byte cp.async pieces before; measured
    # before split ranges were aligned to 16 keys, which the box rows need). Split ranges then start at
    # multiples of 16 keys (every layout alike, so the bytes do not depend on it), except where the
    # partials are returned (gqa_attn_splitk keeps FBGEMM's ranges and kpack = 1).
    kpack = 16 // math.gcd(cs1, 16) if cs1 % 4 == 0 else 0
    T = int(ck.shape[1])
    box_w = _tma_box(R_bytes, nkv, kpack) if kpack else 0
    if (kpack and (kpack == 1 or not partials) and kind != "bf16" and fp8_mode != 1 and not g.paged
            and _TUNE.get("tma", True)
            and _device_info(cp)[3] >= 90 and T % kpack == 0 and R_bytes % 4 == 0 and cs2 == R_bytes
            and all(a.flags.c_contiguous and a.data.ptr % 16 == 0 for a in (ck, cv))
            and (fast if kpack == 1 else box_w <= 2 * kpack * R_bytes)):
        elem = 1 if kpack == 1 else 8
        mk = (_tensor_map(pk, kpack * cs1, T // kpack, B, box_w, elem, 16 // kpack)
              if box_w <= 256 * elem else None)
        mv = _tensor_map(pv, kpack * cs1, T // kpack, B, box_w, elem, 16 // kpack) if mk is not None else None
        if mv is not None:
            tk, tv, fast = mk, mv, 3
            sK = sV = box_w
            stage_bytes, warp_bytes = _ring(box_w, _STAGES[_KIND[kind]], tma=True, kpack=kpack)
            smem = _smem(D, cfg.nw, warp_bytes)
    if fast != 3:
        kpack = 1
    # The stream schedule (fp8 and int4 caches with tensor copies, automatic split counts): one wave of
    # persistent CTAs whose warps form position streams of one warp per item (KV head x head group); each
    # stream takes an equal share of all lanes' 16-key blocks through one pipeline per warp, across
    # lanes, with one partial per (lane, item, stream) and a merge over each lane's partials. With 4 to 8
    # KV heads (at most 16 query heads each) a stream is one CTA of one warp per KV head sharing one ring
    # of whole token records (``records``: two tensor copies of 16 records per stage, K and V, so the
    # DRAM reads are contiguous), one CTA per SM for fp8, two for int4 (twice the arithmetic per byte).
    # H100, 32/8 heads, D128, fp8 (% of copy, split / per-warp stream at 2 CTAs per SM / records): B64
    # T4096 79.5 / 83.1 / 85.7, B16 T16384 81.1 / 84.7 / 86.2, B128 T2048 77.5 / 80.8 / 83.4, B1 T131072
    # 74.8 / 73.2 / 76.1; int4:g4, us (split / records at 1 / 2 CTAs per SM), decode kernel alone (ncu):
    # B64 153.7 / - / 147.0, B16 - / - / 144.5; whole calls: B64 155.5 / 166.5 / 147.5, B16 161.3 /
    # 165.7 / 149.1, B128 151.1 / 171.0 / 150.3, B1 87.2 / 91.3 / 85.5. Records are taken only with 8 KV
    # heads (int4: and >= 24 blocks a stream); H100, B16 T16384 unless noted, split / records, us: int4
    # D64 32/8 100.2 / 97.4, D256 32/8 (T8192) 158.3 / 146.2, 8/8 153.4 / 137.8, g8 B64 T4096 197.3 / 168.2,
    # fp8 8/8 218.5 / 199.8, D64 32/8 136.0 / 128.8; but with 4 KV heads int4 64/4 103.5 / 129.5, g2 32/4
    # 86.6 / 101.9, fp8 64/4 114.1 / 167.7, 32/4 114.5 / 139.9, 16/4 112.5 / 134.3, 32/4 B64 T4096 134.0 /
    # 139.5 (2 CTAs per SM: 140.5, 123.8, -, 122.0), and int4 B1 T65536 (15.5 blocks a stream) 52.0 / 55.3.
    stream = (fast == 3 and kpack == 1 and cfg.auto and not partials and B <= _STREAM_MAX_B
              and _KIND[kind] in (1, 2)
              and _TUNE.get("stream", True))
    nw, records, swz, occ, occ_max = cfg.nw, False, False, 0, 0
    if stream:   # (the launch state changes only once the schedule is certain)
        r = NH // nkv
        n_items = nkv * cfg.n_hg
        n_sm, smem_sm, _, _ = _device_info(cp)
        n_max = B * (-(-g.capacity // 16))                 # blocks of one item at full capacity
        rmaps = None
        # int4:g4 records of whole 128-byte lines: swizzled boxes of those lines (STREAM = 3)
        swz = (kind == "int4" and g.groups == 4 and cs1 % 128 == 0 and cs1 <= 2048
               and _TUNE.get("swizzle", True))
        if cfg.n_hg == 1 and 4 <= nkv <= 8 and _TUNE.get("records", True):
            if swz:   # 16 records as 128-byte lines, CU_TENSOR_MAP_SWIZZLE_128B (else: padded rows)
                mk, mv = (_tensor_map(x, 128, T * (cs1 // 128), B, 128, 1, 16 * cs1 // 128, 3) for x in (pk, pv))
                swz = mk is not None and mv is not None
            if not swz:
                pitch = _record_pitch(cs1)
                mk = _tensor_map(pk, cs1, T, B, pitch, elem=8) if pitch <= 2048 else None
                mv = _tensor_map(pv, cs1, T, B, pitch, elem=8) if mk is not None else None
            else:
                pitch = cs1
            rmaps = (mk, mv) if mk is not None and mv is not None else None
        records = rmaps is not None
        s_nw = nkv if records else cfg.nw
        s_smem = (s_nw * 32 * D + _STAGES_REC * (32 * pitch + 16) if records
                  else _smem(D, s_nw, warp_bytes, stream=True))
        s_kernel = _FAMILY.kernel("decode_attn", _KIND[kind], D, _nt(r), (3 if swz else 2) if records else 1)
        occ_max = _occupancy(s_kernel, s_smem, s_nw, smem_sm)
        occ = min(occ_max, _TUNE.get("stream_occ", 1 if records and kind == "fp8" else 2))
        n_streams = min(n_sm * occ * s_nw // n_items, -(-n_max // 4))   # >= 4 blocks per warp
        # records only with 8 KV heads (and, int4, >= 24 blocks a stream at full capacity); see above
        rule = nkv == 8 and (kind == "fp8" or n_max >= 24 * n_streams) if records else kind == "fp8"
        stream = n_streams >= 1 and _TUNE.get("stream_any", rule)
        records = records and stream
        if stream:
            kernel, smem, nw = s_kernel, s_smem, s_nw
            if records:
                tk, tv = rmaps
                sK = sV = pitch
                stage_bytes = warp_bytes = 32 * pitch
    if stream:
        n_warps, hs = n_streams * n_items, min(16, r)
        n_cta = -(-n_warps // nw)
        slots = (B + n_streams) * n_items
        pa = cp.empty((slots, hs, D), np.float32)
        pm = cp.empty((slots, 2, hs), np.float32)
    use_parts = partials or S > 1
    # split-major grids put the splits of one head next to each other; head-major (the default when
    # there are splits) schedules the KV heads of one key range together, which reads the cache rows
    # of a position range at about the same time (slightly faster at batch 1 on H100).
    hm = int(_TUNE.get("head_major", S > 1)) and S <= 65535
    if not stream:
        pa = cp.empty((B, S, NH, D), np.float32) if use_parts else None
        pm = cp.empty((B, 2, S, NH), np.float32) if use_parts else None
        kernel = cfg.kernel
    dt = cp.zeros((B, NH, g.capacity), np.float32) if dots else None
    bt = cp.ascontiguousarray(p.block_tables) if g.paged else None
    seq = cp.ascontiguousarray(p.seqlens)
    gshift = int(math.log2(D // g.groups)) if kind == "int4" else 0
    i32, i64, f32 = _compile.i32, _compile.i64, _compile.f32
    max_pages = int(bt.shape[1]) if g.paged else 0
    args = (q, ck, cv, qpk, qpv, bt, i32(max_pages), i32(g.page_size), i32(g.n_pages), seq,
            i32(NH), i32(nkv), i32(g.capacity), i64(cs0), i64(cs1), i64(cs2), i64(ws[0]), i64(ws[1]),
            i64(ws[2]), i32(R_bytes), i32(fp8_mode), i32(gshift), f32(p.scale * math.log2(math.e)),
            i32(n_streams if stream else S), i32(copy_w), i32(fast), i32(pad), i32(cfg.hdr), i32(sK), i32(sV),
            i32(stage_bytes), i32(warp_bytes), i32(hm), out, lse, pa, pm, dt,
            i32(g.capacity if dots else 0), i32(B), i32(kpack), i32(1 if partials else 16), tk, tv)
    _LAST.update(schedule=("records" if records else "stream") if stream else "split",
                 ctas=n_cta if stream else None, kpack=kpack, swizzle=bool(records and swz))
    if stream:
        # PDL (the kernel waits for the one before it first) where a wave fills every SM: it then starts
        # as the previous call's merge drains (H100 int4:g4 records, 32/8 D128 B64 / B16 / B128 / B1:
        # 139.9 / 142.0 / 143.2 / 77.4 -> 137.7 / 137.5 / 141.1 / 76.2 us). Not with fewer CTAs an SM
        # than fit (fp8 records, one an SM): CTAs placed beside the draining merge pile up two on an SM
        # (206.7 -> 237.9 us at B64).
        _compile.launch(kernel, (n_cta,), (32 * nw,), args, shared_mem=smem, pdl=occ == occ_max)
        merge, mgrid, mblock = _merge_launch("decode_attn_merge_stream", B * NH, n_streams / B, D)
        _compile.launch(merge, mgrid, mblock, (pa, pm, seq, i32(B), i32(NH), i32(nkv), i32(g.capacity), i32(D),
                                                 i32(n_streams), out, lse), pdl=True)
        return out, lse, None, None, dt
    grid = (nkv * cfg.n_hg, S, B) if hm else (S, nkv * cfg.n_hg, B)
    _compile.launch(kernel, grid, (32 * cfg.nw,), args, shared_mem=smem)
    if use_parts:
        merge, mgrid, mblock = _merge_launch("decode_attn_merge", B * NH, S, D)
        _compile.launch(merge, mgrid, mblock, (pa, pm, i32(B), i32(NH), i32(S), i32(D), out, lse), pdl=True)
    return out, lse, pa, pm, dt


# ------------------------------------------------------------------------------------ public op
@_backend.op("decode_attention",
             arrays=("q", "cache_k", "cache_v", "seqlens", "qparam_k", "qparam_v", "block_tables"))
def decode_attention(q, cache_k, cache_v, seqlens, *, fmt=None, qparam_k=None, qparam_v=None,
                     block_tables=None, page_size=64, softmax_scale=None, num_splits=None,
                     return_lse=False, validate=True, check_finite=False):
    """Attention of one query token per lane over a bf16 / FP8 / INT4 KV cache.

    Parameters
    ----------
    q : bfloat16 ``[B, N_H, D]``
        One query per lane (any strides); ``D`` in {64, 128, 256}. Query head ``h`` reads KV head
        ``h // (N_H / N_KVH)`` (GQA with any ratio; MQA and MHA included).
    cache_k, cache_v : ``[B, MAX_T, N_KVH, R]`` (contiguous) or ``[1, P*S, N_KVH, R]`` (paged)
        bfloat16 for ``"bf16"``, uint8 rows for the quantized formats (SPEC §2). Only read.
    seqlens : int32 ``[B]``
        Number of keys: lane ``b`` attends positions ``[0, seqlens[b])`` (after ``write_kv_decode`` at
        position ``L``, pass ``L + 1``). Positions at or past it are never read.
    fmt : str, optional
        ``"bf16"``, ``"fp8"``, ``"fp8_head"``, ``"int4"`` / ``"int4:g{1,2,4,8}"``; required for uint8
        caches.
    qparam_k, qparam_v : optional
        External ``fp8`` words (int32, ``cache.shape[:3]``) or ``fp8_head`` scales (float32
        ``[B, N_KVH]``).
    block_tables : int32 ``[B, max_pages]``, optional
        Paged cache (SPEC §3) with ``page_size`` rows per page (any integer >= 1).
    softmax_scale : float, optional
        Default ``1/sqrt(D)``.
    num_splits : int, optional
        Split-K count; ``None`` picks one from the shape so the whole GPU is busy (also at batch 1).
        Results agree across split counts within SPEC §11.2.
    return_lse : bool
        Also return ``lse`` (natural log of the softmax denominator, in units of scaled scores).
    validate : bool
        Check ``seqlens`` against the capacity and every attended block-table entry (one sync).
        With ``False``, lengths are clamped and rows behind bad page ids are excluded.
    check_finite : bool
        Reject non-finite ``q`` values.

    Returns
    -------
    out : bfloat16 ``[B, N_H, D]``; with ``return_lse`` also ``lse`` float32 ``[B, N_H]``. A lane with
    no keys gives ``out = 0`` and ``lse = -inf``.

    Raises
    ------
    TypeError
        Wrong dtype or array module (e.g. float16 q, a float32 cache).
    ValueError
        Bad shape, ``fmt``/row size mismatch, ``N_H % N_KVH != 0``, lengths beyond the cache capacity,
        bad page ids (with ``validate``), ``num_splits < 1``.

    Notes
    -----
    ``s_t = scale * <q, k_t>`` (fp32), ``O = sum_t softmax(s)_t v_t`` with ``k_t``, ``v_t`` the
    dequantized bf16 values of SPEC §2; results meet SPEC §11.2 against float64 over them. The kernel
    reads the quantized bytes: K is dequantized exactly in registers (scores, ``lse`` and the FBGEMM
    ``dots`` carry only fp32 accumulation error); for V the dequantization is folded algebraically
    (fp8: ``O = sum_t (p_t scale_t) c_t + sum_t p_t shift_t`` with the exact e4m3 values ``c_t`` as fp16
    tensor-core operands and the scaled probabilities in fp16; int4: the fp16 values before their bf16
    rounding), so ``v_t`` enters without its final bf16 rounding (at most half a bf16 ulp apart;
    tolerances unchanged). The query heads sharing a KV head (up to 16 per CTA) are served by one pass
    over that head's cache; shared memory does not grow with the context. On sm_90 a contiguous
    quantized cache whose token records are 16-byte aligned is read with TMA tensor copies (a 16-key
    block of one head per copy), as is one whose records are 4- or 8-byte aligned (fp8 with 1 or 2 KV
    heads: 4 or 2 records a box row) where that reads at most twice the head's bytes; other layouts use
    ``cp.async``. Both give the same bytes of output (where the partials stay internal, split ranges
    start at multiples of 16 keys for every layout).
    With automatic splits, up to 512 lanes and 16-byte aligned token records, a cache read with tensor
    copies takes the stream schedule instead where it measured faster on the H100 (one wave of
    persistent CTAs, each streaming an equal share of all lanes' keys): fp8 and int4 with 8 KV heads, a
    CTA reading whole token records, every head at once (int4: with at least 24 16-key blocks a stream;
    int4:g4, whose records are whole 128-byte lines, as swizzled lines), and fp8 with fewer than 4 or
    more than 8 KV heads, a warp per head. With a single lane its streams take the 16-key blocks in
    turn. Tensor copies of the cache enter L2 with an evict_first policy (read once a call, the cache
    does not push the partials and other data out). Where its one wave fills every SM (int4) the kernel
    is a programmatic dependent launch: it may be scheduled while the kernel before it drains, and waits
    for it before touching memory. Its output differs from the split schedule's only by fp32 summation
    order.
    **cukv differs** from FBGEMM's split-K kernel: any D in {64, 128, 256}, any GQA ratio, paged
    caches, contexts of any int32 length.

    See Also
    --------
    cukv.ref.attention_decode.decode_attention : the NumPy twin (float64 inside).
    """
    op = "decode_attention"
    p = prepare(op, q, cache_k, cache_v, seqlens, fmt=fmt, qparam_k=qparam_k, qparam_v=qparam_v,
                block_tables=block_tables, page_size=page_size, softmax_scale=softmax_scale,
                num_splits=num_splits, validate=validate, check_finite=check_finite)
    if not _backend.current().gpu:
        return ref.decode_attention(q, cache_k, cache_v, seqlens, fmt=p.geom.fmt, qparam_k=qparam_k,
                                    qparam_v=qparam_v, block_tables=block_tables,
                                    page_size=p.geom.page_size, softmax_scale=p.scale,
                                    return_lse=return_lse)
    out, lse, _, _, _ = run(p)
    return (out, lse) if return_lse else out
