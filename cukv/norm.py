"""RMS norm: ``cukv.rms_norm`` (SPEC §9).

Kernels: ``cuda_src/norm.cu`` (``rms_norm_rows``: a team of lanes per row, the row held in registers;
``rms_norm_stream``: one block per row, two passes, any length). Reference: :mod:`cukv.ref.norm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _backend, _checks, _compile
from .ref import norm as ref

__all__ = ["rms_norm", "Plan", "plan"]

IN_TYPES = {_checks.BF16: "bf16_t", _checks.F16: "f16_t", _checks.F32: "float"}
W_TYPES = {None: "none_t", _checks.BF16: "bf16_t", _checks.F32: "float"}
# (W, V) of rms_norm_rows: small teams for short rows, then whole warps holding 2..16 chunks per lane.
ROW_SHAPES = tuple([(1 << i, 1) for i in range(6)] + [(32, v) for v in (2, 4, 8, 16)])
V_MAX = 4              # default chunks per lane: 32 fp32 registers of row data (fastest on H100)
MAX_WARPS = 16         # warps per row of rms_norm_rows (512 threads: fits any V <= 8 in registers)
_BLOCK = 256           # threads per block of rms_norm_rows when a row needs fewer
_STREAM_BLOCK = 512    # threads per block (= per row) of rms_norm_stream

_NORM = _compile.Family("norm.cu", [
    *(_compile.expression("rms_norm_rows", t, w, W, V)
      for t in IN_TYPES.values() for w in W_TYPES.values() for W, V in ROW_SHAPES),
    *(_compile.expression("rms_norm_stream", t, w) for t in IN_TYPES.values() for w in W_TYPES.values()),
])


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """How rows of ``N`` elements map to the GPU.

    ``kernel="rows"``: teams of ``W * nw`` lanes (``nw`` warps when ``W == 32``) holding ``V`` chunks of 8
    elements each in registers; ``kernel="stream"``: one block of ``block`` threads per row re-reading
    the row for the second pass.
    """

    kernel: str
    W: int = 32
    V: int = 1
    nw: int = 1
    block: int = _BLOCK

    @property
    def rows_per_block(self) -> int:
        return 1 if self.kernel == "stream" else self.block // (self.W * self.nw)


def plan(N: int, v_max: int = V_MAX, kernel: str = "rows", rows_per_block: int | None = None) -> Plan:
    """The launch plan for rows of ``N`` elements (``N % 8 == 0``).

    Rows of up to 32 chunks of 8 use one team of ``W = pow2(N/8)`` lanes, one chunk each; longer rows a
    warp with up to ``v_max`` chunks per lane, then ``nw`` warps per row (shared-memory sum), up to 16
    warps (with 8 chunks per lane if ``v_max`` chunks are not enough); longer rows (more than 32768
    elements) use the streaming kernel. Blocks hold ``rows_per_block`` rows (default: one multi-warp
    row, or 256 threads' worth of single-warp teams). ``scripts/bench_norm.py`` compares plans;
    ``v_max``, ``kernel`` and ``rows_per_block`` exist for it. On an H100, 65536 x 4096 bf16 ran at
    99% of copy with 4 chunks per lane and one row per block (98% with two rows per block, 94% with
    four), 98% with 8 chunks, 95% with 2, 73-74% with 1 or 16 chunks per lane, and 92% with the
    streaming kernel (BENCHMARKS.md).
    """
    n8 = max(1, int(N) // 8)
    if v_max not in (1, 2, 4, 8, 16):
        raise ValueError(f"plan: v_max: expected 1, 2, 4, 8 or 16, got {v_max}")
    if kernel == "stream":
        return Plan("stream", block=_STREAM_BLOCK)
    if kernel != "rows":
        raise ValueError(f"plan: kernel: expected 'rows' or 'stream', got {kernel!r}")
    if n8 <= 32:
        W, V, nw = _pow2(n8), 1, 1
    elif -(-n8 // 32) <= v_max:
        W, V, nw = 32, _pow2(-(-n8 // 32)), 1
    else:
        W = 32
        nw = _pow2(-(-n8 // (32 * v_max)))
        if nw > MAX_WARPS:
            v_max = max(v_max, 8)
            nw = _pow2(-(-n8 // (32 * v_max)))
            if nw > MAX_WARPS:
                return Plan("stream", block=_STREAM_BLOCK)
        V = _pow2(-(-n8 // (32 * nw)))
    L = W * nw
    if rows_per_block is None:     # multi-warp rows: one row per block (no barrier shared by rows)
        rows_per_block = 1 if nw > 1 else max(1, _BLOCK // L)
    return Plan("rows", W, V, nw, L * rows_per_block)


def _row_stride(x) -> int | None:
    """Element stride between rows if ``x`` ``[..., N]`` is a set of unit-stride rows at a constant
    stride (C-contiguous, rows of a wider buffer, reversed or broadcast rows); else ``None``."""
    isz = x.itemsize
    N = int(x.shape[-1])
    if N > 1 and x.strides[-1] != isz:
        return None
    lead = [(int(n), int(s)) for n, s in zip(x.shape[:-1], x.strides[:-1]) if n != 1]
    if not lead:
        return N
    for (_, s_out), (n_in, s_in) in zip(lead[:-1], lead[1:]):
        if s_out != s_in * n_in:
            return None
    rs = lead[-1][1]
    return rs // isz if rs % isz == 0 else None


def _check_eps(op: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        _checks.fail(op, "eps", "a real number >= 0", type(eps).__name__, TypeError)
    if not np.isfinite(eps) or eps < 0:
        _checks.fail(op, "eps", "a finite number >= 0", repr(eps))
    return float(eps)


@_backend.op("rms_norm", arrays=("x", "weight", "out"))
def rms_norm(x, weight=None, eps=1e-6, *, out=None):
    """Root-mean-square norm over the last axis, to bfloat16.

    Parameters
    ----------
    x : bfloat16, float16 or float32 ``[..., N]``
        ``N > 0``, ``N % 8 == 0``; any leading shape and any strides (read only).
    weight : bfloat16 or float32 ``[N]``, optional
        Per-column gain ``w``; ``None`` means ``w = 1``.
    eps : float
        ``>= 0``; used as ``RN_f32(eps)``.
    out : bfloat16 ``x.shape``, optional
        C-contiguous output written in full; it may not overlap ``x`` or ``weight``.

    Returns
    -------
    bfloat16 ``x.shape`` (``out`` if given), same array module as ``x``.

    Raises
    ------
    TypeError
        Wrong dtype or array type, mixed array modules/devices, non-numeric ``eps``.
    ValueError
        ``N % 8 != 0``, wrong ``weight`` or ``out`` shape, non-contiguous or overlapping ``out``,
        negative or non-finite ``eps``.

    Notes
    -----
    In fp32 (SPEC §9): ``ms = RN(sum x_i^2 / N)``, ``r = RN(1 / RN(sqrt(RN(ms + eps))))``,
    ``y_i = RN_bf16(RN(RN(x_i * r) * w_i))``. The kernel sums ``RN_f32(x_i^2)`` in fp32 (the
    reference sums in float64), so bf16 outputs may differ from :func:`cukv.ref.norm.rms_norm` by one
    ulp in at most ``ceil(1e-4 * size)`` elements (SPEC §11.1); squares above fp32 range
    (``|x| > 1.8e19``) overflow the kernel's sum. A NaN or Inf changes only its own row.

    Layout: rows with unit element stride at a constant row stride (e.g. slices of a fused buffer,
    reversed or broadcast rows) are read in place; other layouts are copied to a contiguous buffer
    first. 16-byte loads/stores are used when ``x``, its row stride, ``weight`` and ``out`` are
    16-byte aligned; otherwise every access is element-wise. Rows of up to 32768 elements stay in
    registers (up to 16 warps per row, 4 or 8 chunks of 8 per lane); longer rows use a two-pass kernel
    that re-reads the row.

    FBGEMM has no standalone RMS norm op; its ``k_norm`` is the weightless, ``eps = 0`` case of this
    formula applied inside the KV writers.

    See Also
    --------
    cukv.ref.norm.rms_norm : the NumPy reference.
    """
    op = "rms_norm"
    _checks.check_dtype(op, "x", x, tuple(IN_TYPES))
    if x.ndim < 1:
        _checks.fail(op, "x", "an array [..., N] with at least one axis", _checks.describe(x))
    N = int(x.shape[-1])
    if N <= 0 or N % 8:
        _checks.fail(op, "x", "[..., N] with N > 0 and N % 8 == 0", _checks.describe(x))
    if weight is not None:
        _checks.check_array(op, "weight", weight, (_checks.BF16, _checks.F32), (N,), f"[{N}]")
    eps = _check_eps(op, eps)
    if out is not None:
        _checks.check_array(op, "out", out, _checks.BF16, tuple(x.shape),
                            "[" + ", ".join(str(int(s)) for s in x.shape) + "] (x.shape)")
        _checks.check_c_contiguous(op, "out", out)
        _checks.check_no_overlap(op, {"out": out}, {"x": x, "weight": weight})
    be = _backend.current()
    if not be.gpu:
        y = ref.rms_norm(np.asarray(x), weight, eps)
        if out is None:
            return y
        out[...] = y
        return out
    xp = be.xp
    if out is None:
        out = xp.empty(x.shape, dtype=_checks.BF16)
    run_kernel(x, weight, eps, out)
    return out


def run_kernel(x, weight, eps: float, out, p: Plan | None = None) -> None:
    """Run the kernel on validated CuPy arrays (``out`` C-contiguous bf16 ``x.shape``).

    ``p`` overrides the launch plan (benchmarks compare plans); results do not depend on it beyond
    the fp32 summation order.
    """
    xp = _backend.cupy()
    N = int(x.shape[-1])
    n_rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if n_rows == 0:
        return
    rs = _row_stride(x)
    if rs is None:
        x = xp.ascontiguousarray(x)
        rs = N
    w = xp.ascontiguousarray(weight) if weight is not None else None
    vec = (_checks.aligned(x, 16) and (rs * x.itemsize) % 16 == 0 and _checks.aligned(out, 16)
           and (w is None or _checks.aligned(w, 16)))
    p = p or plan(N)
    t = IN_TYPES[x.dtype]
    wt = W_TYPES[None if w is None else w.dtype]
    args = (x, _compile.i64(n_rows), _compile.i32(N), _compile.i64(rs), w, _compile.f32(eps), out)
    if p.kernel == "stream":
        k = _NORM.kernel("rms_norm_stream", t, wt)
        _compile.launch(k, (n_rows,), (p.block,), (*args, _compile.i32(vec)))
        return
    if p.W * p.V * p.nw * 8 < N:
        raise ValueError(f"rms_norm: plan {p} cannot hold rows of {N} elements")
    if p.block % (p.W * p.nw):
        raise ValueError(f"rms_norm: plan {p}: block must hold whole rows")
    k = _NORM.kernel("rms_norm_rows", t, wt, p.W, p.V)
    if p.block > k.max_threads_per_block:      # too many registers for this block: two-pass kernel
        k = _NORM.kernel("rms_norm_stream", t, wt)
        _compile.launch(k, (n_rows,), (_STREAM_BLOCK,), (*args, _compile.i32(vec)))
        return
    grid = -(-n_rows // p.rows_per_block)
    _compile.launch(k, (grid,), (p.block,), (*args, _compile.i32(p.nw), _compile.i32(vec)))
