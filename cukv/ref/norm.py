"""NumPy truth of the RMS norms: ``rms_norm`` (SPEC §9) and the fp32 ``qk_norm`` (SPEC §4.5)."""
from __future__ import annotations

import numpy as np

from .codec import to_bf16

F32 = np.float32


def rms_factor(y, eps) -> np.ndarray:
    """``r = RN(1 / RN(sqrt(RN(ms + eps))))`` with ``ms = RN_f32(sum(y^2) / N)`` (float64 sum)."""
    y = np.asarray(y, dtype=F32)
    n = y.shape[-1]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        ms = (np.square(y.astype(np.float64)).sum(axis=-1) / np.float64(n)).astype(F32)
        t = (ms + F32(eps)).astype(F32)
        return (F32(1.0) / np.sqrt(t).astype(F32)).astype(F32)


def qk_norm(y, eps: float = 0.0) -> np.ndarray:
    """fp32 ``y`` ``[..., D]`` -> fp32 ``RN(y_i * r)`` (no weight)."""
    y = np.asarray(y, dtype=F32)
    with np.errstate(invalid="ignore", over="ignore"):
        return (y * rms_factor(y, eps)[..., None]).astype(F32)


def rms_norm(x, weight=None, eps: float = 1e-6) -> np.ndarray:
    """bf16/f16/f32 ``x`` ``[..., N]`` -> bfloat16 ``RN_bf16(RN(RN(x_i*r) * w_i))``."""
    y = np.asarray(x).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = (y * rms_factor(y, eps)[..., None]).astype(F32)
        if weight is not None:
            v = (v * np.asarray(weight).astype(F32)).astype(F32)
    return to_bf16(v)
