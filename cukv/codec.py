"""The row codec: ``cukv.quantize`` / ``cukv.dequantize`` (SPEC §2.7).

Kernels: ``cuda_src/codec.cu`` (one team of lanes per row, rows.cuh encoders/decoders).
Reference: :mod:`cukv.ref.codec`.
"""
from __future__ import annotations

import numpy as np

from . import _backend, _checks, _compile
from .formats import check_head_dim, head_dim_from_row, parse_format, row_bytes
from .ref import codec as ref

__all__ = ["quantize", "dequantize"]

FMT_CODE = {"bf16": 0, "fp8": 1, "fp8_head": 2, "int4": 3}
IN_TYPES = {_checks.BF16: "bf16_t", _checks.F16: "f16_t", _checks.F32: "float"}
_FMT_G = [(0, 1), (1, 1), (2, 1), (3, 1), (3, 2), (3, 4), (3, 8)]

# Team shapes. Most formats use _compile.team_shape (one chunk of 8 elements per lane, one row per
# team at a time). INT4 with one group per row is faster with 4 chunks per lane (the per-row
# reduction and scale division are shared by fewer lanes): on the H100 (D = 128, 16-byte inputs),
# 80% vs 66% of copy for int4:g1, while fp8 prefers one chunk per lane (92%). Grouped INT4 with
# groups of 16 or 32 elements goes to quantize_int4_owned (OWNED below).
# Tried on the H100 for int4:g1 (D = 128, 4 lanes x 4 chunks: 78.7% of copy at 78 registers): a
# minimum of 4 or 6 resident blocks changes nothing, 8 (64 registers) gives 66%; two rows per team
# (CUKV_CODEC_ROWS) 66%; teams of 2 lanes x 8 chunks or 1 x 16 give 13% / 11% (loops over more than
# 4 chunks are not unrolled, so the row goes to local memory). Bytes were equal in every variant.
WIDE_SHAPES = ((1, 1), (1, 2), (1, 4), (2, 4), (4, 4), (8, 4), (16, 4), (32, 4), (32, 8), (32, 16),
               (32, 32))


def wide_team_shape(D: int) -> tuple[int, int]:
    """``(W, V)`` with V = 4 chunks per lane (fewer for rows under 32 elements) and W lanes enough to
    cover the row, up to a warp; beyond 1024 elements V grows (up to 8192 elements)."""
    n = max(1, D // 8)
    if n <= 4:
        return 1, 1 << (n - 1).bit_length()
    w = -(-n // 4)
    if w <= 32:
        return 1 << (w - 1).bit_length(), 4
    v = 1 << (-(-n // 32) - 1).bit_length()
    if v > 32:
        raise ValueError(f"row of {D} elements exceeds the GPU codec's limit of 8192")
    return 32, v


def quantize_team_shape(fmt: str, D: int) -> tuple[int, int]:
    return wide_team_shape(D) if fmt in ("int4", "int4:g1") else _compile.team_shape(D)


FIT_DIMS = (64, 128, 256)   # head sizes with a compile-time-D quantize kernel (D == 8*W*V)


# (G, V) of codec.cu's quantize_int4_owned: INT4 groups of 8V elements, one group per lane. On the
# H100 (int4:g4, D = 128) it reaches 87% of copy against 71% for the sub-team encoder of rows.cuh,
# which spends a team shuffle chain and a scale division on every 8 elements.
OWNED = ((2, 4), (4, 2), (4, 4), (8, 2), (8, 4))


# int4:g1 rows with D in FIT_DIMS (teams of W <= 8 lanes) go to codec.cu's quantize_int4_staged when x
# and the output are 16-byte aligned: a warp's rows leave through shared memory as one 16-byte aligned
# span (D = 128: 8 rows = 34 x 16 bytes) instead of 4-byte stores into 68-byte rows, and min / max run
# on packed bf16x2 / f16x2 words. On the H100 (bf16 [2^19, 128]): 85% of copy against 80% for
# quantize_rows (same bytes); D = 64: 85% vs 64%, D = 256: 86% vs 83%.
STAGED = {D: wide_team_shape(D) for D in FIT_DIMS}   # D -> (W, V)


def _quantize_shapes(f, g):
    return WIDE_SHAPES if (f, g) == (3, 1) else _compile.TEAM_SHAPES


_CODEC = _compile.Family("codec.cu", [
    *(_compile.expression("quantize_rows", t, f, g, w, v, fit)
      for t in IN_TYPES.values() for f, g in _FMT_G
      for w, v in _quantize_shapes(f, g)
      for fit in ((False, True) if 8 * w * v in FIT_DIMS else (False,))),
    *(_compile.expression("quantize_int4_owned", t, g, v) for t in IN_TYPES.values() for g, v in OWNED),
    *(_compile.expression("quantize_int4_staged", t, w, v) for t in IN_TYPES.values()
      for w, v in STAGED.values()),
    *(_compile.expression("dequantize_rows", f, g, w, v)
      for f, g in _FMT_G for w, v in _compile.TEAM_SHAPES),
])
_BLOCK = 128   # quantize_rows' __launch_bounds__; on the H100 128 beat 256 for every format
_DQ_BLOCK = 256
_SMS: dict = {}


def sm_count() -> int:
    """Multiprocessors of the current device (cached per device)."""
    cp = _backend.cupy()
    dev = cp.cuda.Device().id
    n = _SMS.get(dev)
    if n is None:
        n = _SMS[dev] = int(cp.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"])
    return n


def resident_blocks(kernel, block: int, smem: int = 0) -> int:
    """Blocks of ``block`` threads one SM holds at once (registers, shared memory, 2048 threads)."""
    regs = max(1, int(getattr(kernel, "num_regs", 64) or 64))
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (per_warp * (block // 32))
    static = int(getattr(kernel, "shared_size_bytes", 0) or 0)
    by_smem = (227 * 1024) // (static + smem + 1024) if static + smem else 32
    return max(1, min(2048 // block, 32, by_regs, by_smem))


def _one_wave(kernel, threads: int) -> int:
    """Blocks of ``_BLOCK`` threads for ``threads`` threads of work, at most one wave of resident
    blocks (the kernels stride over the rest)."""
    return min(-(-threads // _BLOCK), sm_count() * resident_blocks(kernel, _BLOCK))


def fmt_targs(fmt: str) -> tuple[int, int]:
    """``(FMT code, G)`` template arguments of a format (G = 1 for non-INT4 formats)."""
    kind, g = parse_format(fmt)
    return FMT_CODE[kind], max(g, 1)


def _row_scale(op, scale, lead, xp):
    """fp8_head ``scale`` (float32, broadcastable to ``lead``) -> contiguous float32 ``[prod(lead)]``."""
    if scale is None:
        raise ValueError(f"{op}: scale: expected a float32 array broadcastable to {list(lead)} for "
                         "fmt 'fp8_head', got None")
    _checks.check_dtype(op, "scale", scale, _checks.F32)
    try:
        b = xp.broadcast_to(scale, lead)
    except ValueError:
        _checks.fail(op, "scale", f"float32 broadcastable to [{', '.join(map(str, lead))}]",
                     _checks.describe(scale))
    return b


@_backend.op("quantize", arrays=("x", "scale"))
def quantize(x, fmt, *, external_qparams=False, scale=None):
    """Quantize rows of ``D`` values into cache rows of format ``fmt``.

    Parameters
    ----------
    x : bfloat16, float16 or float32 ``[..., D]``
        Any leading shape and strides; ``D % 8 == 0`` (``int4:gG``: ``D % (2G) == 0``). Values are
        converted exactly to float32 first.
    fmt : str
        ``"bf16"``, ``"fp8"``, ``"fp8_head"``, ``"int4"`` or ``"int4:g{1,2,4,8}"``.
    external_qparams : bool
        ``fmt="fp8"`` only: return ``(codes, words)`` instead of inline rows.
    scale : float32 array broadcastable to ``x.shape[:-1]``
        ``fmt="fp8_head"`` only (required there): the symmetric scale ``s``.

    Returns
    -------
    ``fp8``: uint8 ``[..., D+4]`` (fp16 scale, fp16 shift, D e4m3fn codes), or with external qparams
    ``(uint8 [..., D], int32 [...])``; ``int4:gG``: uint8 ``[..., D/2 + 4G]``; ``fp8_head``: uint8
    ``[..., D]``; ``bf16``: bfloat16 ``[..., D]``. Same array module as ``x``.

    Raises
    ------
    TypeError
        Wrong dtype or array module (FP8 ``ml_dtypes`` arrays must be passed as ``.view(np.uint8)``).
    ValueError
        Bad ``fmt``, ``D``, ``scale`` shape, or an option that does not apply to ``fmt``.

    Notes
    -----
    Bit-exact with :func:`cukv.ref.codec.quantize` (SPEC §2.3-§2.5). A row (fp8) or group (int4) with a
    non-finite value encodes as NaN qparams (SPEC §11.4). An int4 group whose minimum is zero stores
    its shift as +0, also when the group holds -0 (the spec leaves that sign open; fixing it keeps the
    bytes independent of reduction order; codes are the same either way). The GPU path handles rows of
    up to 8192 elements; longer rows raise ``ValueError`` (the NumPy path has no limit).
    """
    op = "quantize"
    kind, _ = parse_format(fmt, op)
    _checks.check_dtype(op, "x", x, (_checks.BF16, _checks.F16, _checks.F32))
    if x.ndim < 1:
        _checks.fail(op, "x", "an array [..., D] with at least one axis", _checks.describe(x))
    D = int(x.shape[-1])
    check_head_dim(fmt, D, op, "x.shape[-1]")
    if external_qparams and kind != "fp8":
        _checks.fail(op, "external_qparams", f"False for fmt {fmt!r} (only 'fp8' has external qparams)",
                     "True")
    if scale is not None and kind != "fp8_head":
        _checks.fail(op, "scale", f"None for fmt {fmt!r} (only 'fp8_head' takes a scale)",
                     _checks.describe(scale))
    be = _backend.current()
    xp = be.xp
    lead = tuple(int(s) for s in x.shape[:-1])
    s_b = _row_scale(op, scale, lead, xp) if kind == "fp8_head" else None
    if not be.gpu:
        r = ref.quantize(np.asarray(x).astype(np.float32), fmt, external_qparams=external_qparams,
                         scale=s_b)
        return _mark_codes(r, kind, external_qparams)
    W, V = quantize_team_shape(fmt, D)
    fcode, G = fmt_targs(fmt)
    x = xp.ascontiguousarray(x)
    n = int(np.prod(lead, dtype=np.int64))
    R = row_bytes(fmt, D, external_qparams)
    out = xp.empty(lead + (R,), dtype=_checks.BF16 if kind == "bf16" else np.uint8)
    words = xp.empty(lead, dtype=np.int32) if external_qparams else None
    srow = xp.ascontiguousarray(s_b.reshape(-1)) if s_b is not None else None
    gv = (G, D // (8 * G)) if kind == "int4" and D % (8 * G) == 0 else None
    fast = None   # int4 kernels for 16-byte aligned x and out: (kernel, threads per row)
    if kind == "int4" and _checks.aligned(x, 16) and _checks.aligned(out, 16):
        if gv in OWNED:
            fast = _CODEC.kernel("quantize_int4_owned", IN_TYPES[x.dtype], *gv), G
        elif G == 1 and D in STAGED:
            fast = _CODEC.kernel("quantize_int4_staged", IN_TYPES[x.dtype], *STAGED[D]), STAGED[D][0]
    if fast is not None:
        k, per_row = fast
        _compile.launch(k, (_one_wave(k, n * per_row),), (_BLOCK,), (x, _compile.i64(n), out))
        return out
    k = _CODEC.kernel("quantize_rows", IN_TYPES[x.dtype], fcode, G, W, V, D == 8 * W * V and D in FIT_DIMS)
    vec = _checks.aligned(x, 16) and _checks.aligned(out, 16 if kind == "bf16" else 4)
    row_stride = out.itemsize * R   # bytes per output row
    rows_per_team = 1                          # CUKV_CODEC_ROWS(V) in codec.cu
    teams = -(-n // rows_per_team)
    _compile.launch(k, (_one_wave(k, teams * W),), (_BLOCK,),
                    (x, _compile.i64(n), _compile.i32(D), out, _compile.i32(row_stride), words, srow,
                     _compile.i32(vec)))
    return _mark_codes((out, words) if external_qparams else out, kind, external_qparams)


def _mark_codes(r, kind, external_qparams):
    """Pure e4m3fn code arrays (fp8_head rows, external fp8 codes) come back to torch callers as
    ``float8_e4m3fn``; rows with inline qparams stay uint8."""
    if kind == "fp8_head":
        return _backend.fp8_result(r)
    if kind == "fp8" and external_qparams:
        return _backend.fp8_result(r[0]), r[1]
    return r


@_backend.op("dequantize", arrays=("rows", "qparams", "scale"))
def dequantize(rows, fmt, *, qparams=None, scale=None):
    """Dequantize cache rows of format ``fmt`` to bfloat16.

    Parameters
    ----------
    rows : uint8 ``[..., R]`` (bfloat16 ``[..., D]`` for ``fmt="bf16"``)
        ``D`` is inferred from ``R`` and ``fmt``: ``fp8`` ``R = D+4`` (``D`` with ``qparams``),
        ``int4:gG`` ``R = D/2 + 4G``, ``fp8_head`` ``R = D``.
    fmt : str
        As for :func:`quantize`.
    qparams : int32 ``rows.shape[:-1]``, optional
        External fp8 qparam words (bits 0-15 scale, 16-31 shift, both fp16).
    scale : float32 broadcastable to ``rows.shape[:-1]``
        ``fp8_head`` only (required).

    Returns
    -------
    bfloat16 ``[..., D]``, same module as ``rows``.

    Notes
    -----
    ``fp8``: ``RN_bf16(RN_f32(E4M3^-1(q)*scale + shift))``; ``int4``: ``RN_bf16(RN_f16(q*scale + shift))``;
    ``fp8_head``: ``RN_bf16(RN_f32(E4M3^-1(q)*s))``. NaN codes or qparams give NaN only in their row or
    group. Bit-exact with :func:`cukv.ref.codec.dequantize`.
    """
    op = "dequantize"
    kind, _ = parse_format(fmt, op)
    _checks.check_dtype(op, "rows", rows, _checks.BF16 if kind == "bf16" else _checks.U8)
    if rows.ndim < 1:
        _checks.fail(op, "rows", "an array [..., R] with at least one axis", _checks.describe(rows))
    if qparams is not None and kind != "fp8":
        _checks.fail(op, "qparams", f"None for fmt {fmt!r} (only 'fp8' has external qparams)",
                     _checks.describe(qparams))
    if scale is not None and kind != "fp8_head":
        _checks.fail(op, "scale", f"None for fmt {fmt!r} (only 'fp8_head' takes a scale)",
                     _checks.describe(scale))
    R = int(rows.shape[-1])
    D = head_dim_from_row(fmt, R, qparams is not None)
    lead = tuple(int(s) for s in rows.shape[:-1])
    if D <= 0 or D % 8 or (kind == "int4" and D % (2 * parse_format(fmt)[1])):
        _checks.fail(op, "rows", f"a last axis R that is a valid {fmt!r} row size "
                     f"(D % 8 == 0{', D/2 + 4G' if kind == 'int4' else ''})", _checks.describe(rows))
    if qparams is not None:
        _checks.check_array(op, "qparams", qparams, _checks.I32, lead, f"[{', '.join(map(str, lead))}]")
    be = _backend.current()
    xp = be.xp
    s_b = _row_scale(op, scale, lead, xp) if kind == "fp8_head" else None
    if not be.gpu:
        return ref.dequantize(np.asarray(rows), fmt, qparams=qparams, scale=s_b)
    if kind == "bf16":
        return rows.copy()
    W, V = _compile.team_shape(D)   # one chunk per lane: wide contiguous accesses per row
    fcode, G = fmt_targs(fmt)
    rows = xp.ascontiguousarray(rows)
    words = xp.ascontiguousarray(qparams) if qparams is not None else None
    srow = xp.ascontiguousarray(s_b.reshape(-1)) if s_b is not None else None
    n = int(np.prod(lead, dtype=np.int64))
    out = xp.empty(lead + (D,), dtype=_checks.BF16)
    k = _CODEC.kernel("dequantize_rows", fcode, G, W, V)
    vec = _checks.aligned(rows, 4) and _checks.aligned(out, 16)
    _compile.launch(k, (-(-n * W // _DQ_BLOCK),), (_DQ_BLOCK,),
                    (rows, _compile.i64(n), _compile.i32(D), _compile.i32(R), words, srow, out,
                     _compile.i32(vec)))
    return out
