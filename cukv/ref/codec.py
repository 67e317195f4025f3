"""NumPy + ml_dtypes truth of the row codec (SPEC §2.3-§2.5, §11.4).

Every function takes already-validated host arrays. ``y`` is float32 ``[..., D]``, the value to
encode (after position encoding and qk_norm in the cache ops). Every operation is one float32 (or,
where the spec says so, float64) rounding, in the spec's order, so the CUDA kernels match these
bytes exactly.
"""
from __future__ import annotations

import numpy as np
import ml_dtypes

F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = ml_dtypes.float8_e4m3fn

S_MIN = F32(1.0 / 229376.0)          # RN_f32(1 / (448 * 512)), the smallest FP8 scale
H_CAP = F32(32750.0)                 # half-range cap: 2 * scale stays finite in fp16
NAN_WORD = np.int32(0x7E007E00)      # fp8 qparam word of a non-finite row (fp16 NaN, NaN)
NAN_HALF = np.uint16(0x7E00)
NAN_CODE = np.uint8(0x7F)


def e4m3_encode(v) -> np.ndarray:
    """float32 -> e4m3fn bytes, round-to-nearest-even, saturating at +-448, NaN -> 0x7F.

    ml_dtypes turns |x| >= 464 into NaN and gives 0xFF for -NaN; CUDA's converter saturates and
    gives 0x7F, which is the convention here.
    """
    v = np.asarray(v, dtype=F32)
    c = np.clip(v, F32(-448.0), F32(448.0)).astype(E4M3).view(np.uint8)
    return np.where(np.isnan(v), NAN_CODE, c).astype(np.uint8)


def e4m3_decode(c) -> np.ndarray:
    """e4m3fn bytes -> float32 values (exact)."""
    return np.asarray(c, dtype=np.uint8).view(E4M3).astype(F32)


def to_bf16(v) -> np.ndarray:
    """float32 -> bfloat16, round-to-nearest-even (one rounding)."""
    return np.asarray(v, dtype=F32).astype(BF16)


def _f16_bits(v) -> np.ndarray:
    return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


# ------------------------------------------------------------------ fp8: per-row asymmetric
def fp8_params(y):
    """Per-row fp32 ``(s, z, finite)`` of SPEC §2.3 for ``y`` float32 ``[..., D]``."""
    y = np.asarray(y, dtype=F32)
    finite = np.isfinite(y).all(axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):
        mn = y.min(axis=-1)
        mx = y.max(axis=-1)
        h = np.minimum((mx - mn) / F32(2.0), H_CAP).astype(F32)
        s = np.maximum((h / F32(448.0)).astype(F32), S_MIN).astype(F32)
        z = (mn + (F32(448.0) * s).astype(F32)).astype(F32)
    return s, z, finite


def quantize_fp8(y):
    """``y`` float32 ``[..., D]`` -> ``(codes uint8 [..., D], words int32 [...])``."""
    y = np.asarray(y, dtype=F32)
    s, z, finite = fp8_params(y)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        inv = (F32(1.0) / s).astype(F32)
        d = (y - z[..., None]).astype(F32)
        v = np.clip((d * inv[..., None]).astype(F32), F32(-448.0), F32(448.0))
    codes = e4m3_encode(v)
    codes = np.where(finite[..., None], codes, NAN_CODE).astype(np.uint8)
    words = (_f16_bits(s).astype(np.uint32) | (_f16_bits(z).astype(np.uint32) << 16)).view(np.int32)
    words = np.where(finite, words, NAN_WORD).astype(np.int32)
    return codes, words


def dequantize_fp8(codes, words):
    """``codes`` uint8 ``[..., D]``, ``words`` int32 ``[...]`` -> bfloat16 ``[..., D]``."""
    w = np.asarray(words, dtype=np.int32).view(np.uint32)
    scale = (w & 0xFFFF).astype(np.uint16).view(np.float16).astype(F32)
    shift = (w >> 16).astype(np.uint16).view(np.float16).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = (e4m3_decode(codes) * scale[..., None]).astype(F32)   # exact product
        v = (v + shift[..., None]).astype(F32)                    # one rounding
    return to_bf16(v)


def words_to_bytes(words) -> np.ndarray:
    """int32 ``[...]`` -> uint8 ``[..., 4]`` (the little-endian inline prefix)."""
    return np.ascontiguousarray(np.asarray(words, dtype="<i4")).view(np.uint8).reshape(
        np.shape(words) + (4,))


def bytes_to_words(b) -> np.ndarray:
    """uint8 ``[..., 4]`` -> int32 ``[...]``."""
    return np.ascontiguousarray(b).view("<i4")[..., 0].astype(np.int32)


# ------------------------------------------------------------------ fp8_head: symmetric
def quantize_fp8_head(y, s):
    """``y`` float32 ``[..., D]``, ``s`` float32 broadcastable to ``y.shape[:-1]`` -> uint8 codes."""
    y = np.asarray(y, dtype=F32)
    s = np.asarray(s, dtype=F32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        inv = (F32(1.0) / s).astype(F32)
        v = (y * np.broadcast_to(inv, y.shape[:-1])[..., None]).astype(F32)
    return e4m3_encode(np.clip(v, F32(-448.0), F32(448.0)))


def dequantize_fp8_head(codes, s):
    s = np.asarray(s, dtype=F32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = (e4m3_decode(codes) * np.broadcast_to(s, codes.shape[:-1])[..., None]).astype(F32)
    return to_bf16(v)


# ------------------------------------------------------------------ int4: grouped asymmetric
def int4_params(y, G):
    """Per-group fp32 ``(s, mn, finite)`` for ``y`` float32 ``[..., D]``; each ``[..., G]``."""
    y = np.asarray(y, dtype=F32)
    g = y.reshape(y.shape[:-1] + (G, y.shape[-1] // G))
    finite = np.isfinite(g).all(axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):
        mn = g.min(axis=-1)
        mx = g.max(axis=-1)
        s = ((mx - mn).astype(F32) / F32(15.0)).astype(F32)
    return s, mn.astype(F32), finite


def quantize_int4(y, G):
    """``y`` float32 ``[..., D]`` -> uint8 rows ``[..., D/2 + 4G]`` (SPEC §2.5)."""
    y = np.asarray(y, dtype=F32)
    D = y.shape[-1]
    s, mn, finite = int4_params(y, G)
    g = y.reshape(y.shape[:-1] + (G, D // G))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        inv = np.float64(15.0) / ((np.float64(15.0) * s.astype(np.float64)) + np.float64(1e-8))
        d = (g - mn[..., None]).astype(F32).astype(np.float64)
        v = (d * inv[..., None]).astype(F32)
        q = np.rint(np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)).astype(np.int64) & 0xF
    q = np.where(finite[..., None], q, 0).astype(np.uint8).reshape(y.shape)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    sb = np.where(finite, _f16_bits(s), NAN_HALF).astype(np.uint16)
    zb = np.where(finite, _f16_bits(mn + F32(0.0)), NAN_HALF).astype(np.uint16)   # a zero minimum: +0
    words = (sb.astype(np.uint32) | (zb.astype(np.uint32) << 16)).view(np.int32)
    return np.concatenate([words_to_bytes(words).reshape(y.shape[:-1] + (4 * G,)), packed], axis=-1)


def dequantize_int4(rows, G):
    """uint8 rows ``[..., D/2 + 4G]`` -> bfloat16 ``[..., D]``: ``RN_bf16(RN_f16(q*scale + shift))``."""
    rows = np.asarray(rows, dtype=np.uint8)
    D = 2 * (rows.shape[-1] - 4 * G)
    words = bytes_to_words(rows[..., : 4 * G].reshape(rows.shape[:-1] + (G, 4)))
    w = words.view(np.uint32)
    scale = (w & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    shift = (w >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
    p = rows[..., 4 * G:]
    q = np.empty(rows.shape[:-1] + (D,), dtype=np.float64)
    q[..., 0::2] = p & 0xF
    q[..., 1::2] = p >> 4
    q = q.reshape(rows.shape[:-1] + (G, D // G))
    with np.errstate(invalid="ignore", over="ignore"):
        v = (q * scale[..., None] + shift[..., None]).astype(np.float16)   # exact, then one RN_f16
    return v.astype(F32).astype(BF16).reshape(rows.shape[:-1] + (D,))


# ------------------------------------------------------------------ row codec (SPEC §2.7)
def quantize(y, fmt: str, *, external_qparams: bool = False, scale=None):
    """Reference row quantizer over float32 ``y``; see :func:`cukv.quantize`."""
    from ..formats import parse_format  # noqa: PLC0415

    kind, G = parse_format(fmt, "quantize")
    y = np.asarray(y, dtype=F32)
    if kind == "bf16":
        return to_bf16(y)
    if kind == "fp8":
        codes, words = quantize_fp8(y)
        if external_qparams:
            return codes, words
        return np.concatenate([words_to_bytes(words), codes], axis=-1)
    if kind == "fp8_head":
        return quantize_fp8_head(y, scale)
    return quantize_int4(y, G)


def dequantize(rows, fmt: str, *, qparams=None, scale=None):
    """Reference row dequantizer; see :func:`cukv.dequantize`."""
    from ..formats import parse_format  # noqa: PLC0415

    kind, G = parse_format(fmt, "dequantize")
    if kind == "bf16":
        return np.asarray(rows).astype(BF16)
    if kind == "fp8":
        if qparams is not None:
            return dequantize_fp8(rows, qparams)
        return dequantize_fp8(rows[..., 4:], bytes_to_words(rows[..., :4]))
    if kind == "fp8_head":
        return dequantize_fp8_head(rows, scale)
    return dequantize_int4(rows, G)
