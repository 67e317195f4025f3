"""Position encodings of the cache writes (SPEC §4.1-§4.4): ``RoPE``, ``XPos``, ``Llama31Scaling``.

The frequency and xPos tables are computed here, on the host, in float64; the kernels receive them
and never recompute them (``cuda_src/cache_write.cu``). :mod:`cukv.ref.cache_write` uses the same
tables, so kernel and reference differ only in the last bit of a float64 ``cos``/``sin``/``pow``.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["RoPE", "XPos", "Llama31Scaling", "rope_frequencies", "xpos_zeta", "position_tables"]


def _real(cls: str, arg: str, v, *, positive: bool = False, nonzero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{cls}: {arg}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{cls}: {arg}: expected a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{cls}: {arg}: expected > 0, got {v!r}")
    if nonzero and v == 0:
        raise ValueError(f"{cls}: {arg}: expected a non-zero number, got {v!r}")
    return v


@dataclass(frozen=True)
class Llama31Scaling:
    """Llama-3.1 frequency scaling (SPEC §4.2); the defaults are Llama-3.1's published values.

    Wavelengths ``2*pi/f`` above ``old_context_len / lo_freq_factor`` are divided by
    ``scaling_factor``; those below ``old_context_len / hi_freq_factor`` are unchanged; in between
    the frequency is interpolated. ``cukv.fbgemm`` keeps FBGEMM's defaults 8192 / 16 / 1 / 32.
    """

    old_context_len: float = 8192
    scaling_factor: float = 8.0
    lo_freq_factor: float = 1.0
    hi_freq_factor: float = 4.0

    def __post_init__(self):
        n = "Llama31Scaling"
        for a in ("old_context_len", "scaling_factor", "lo_freq_factor", "hi_freq_factor"):
            _real(n, a, getattr(self, a), positive=True)
        if not self.hi_freq_factor > self.lo_freq_factor:
            raise ValueError(f"{n}: hi_freq_factor: expected > lo_freq_factor={self.lo_freq_factor!r}, "
                             f"got {self.hi_freq_factor!r}")


def _check_scaling(cls: str, scaling):
    if scaling is not None and not isinstance(scaling, Llama31Scaling):
        raise TypeError(f"{cls}: scaling: expected a cukv.Llama31Scaling or None, "
                        f"got {type(scaling).__name__}")


@dataclass(frozen=True)
class RoPE:
    """Rotary position embedding (SPEC §4.3).

    ``interleaved=True`` rotates adjacent pairs ``(2p, 2p+1)`` (Meta Llama / FBGEMM);
    ``interleaved=False`` rotates ``(p, p + D/2)`` (the half-split ``rotate_half`` convention, which
    FBGEMM does not offer).
    """

    theta: float = 10000.0
    interleaved: bool = True
    scaling: Llama31Scaling | None = None

    def __post_init__(self):
        _real("RoPE", "theta", self.theta, positive=True)
        if not isinstance(self.interleaved, (bool, np.bool_)):
            raise TypeError(f"RoPE: interleaved: expected a bool, got {type(self.interleaved).__name__}")
        _check_scaling("RoPE", self.scaling)


@dataclass(frozen=True)
class XPos:
    """xPos: RoPE followed by the per-pair factor ``zeta_p ** e`` (SPEC §4.4).

    ``zeta_p = (2p + gamma*D) / (D + gamma*D)``; ``e = (pos - exponent_offset) / scale_base`` for Q
    and ``(pos - exponent_offset) / (-scale_base)`` for K.
    """

    theta: float
    gamma: float
    scale_base: float
    exponent_offset: float = 0.0
    interleaved: bool = True
    scaling: Llama31Scaling | None = None

    def __post_init__(self):
        _real("XPos", "theta", self.theta, positive=True)
        _real("XPos", "gamma", self.gamma)
        if self.gamma == -1:
            raise ValueError("XPos: gamma: expected a value other than -1 (zeta divides by D*(1+gamma)), "
                             "got -1")
        _real("XPos", "scale_base", self.scale_base, nonzero=True)
        _real("XPos", "exponent_offset", self.exponent_offset)
        if not isinstance(self.interleaved, (bool, np.bool_)):
            raise TypeError(f"XPos: interleaved: expected a bool, got {type(self.interleaved).__name__}")
        _check_scaling("XPos", self.scaling)


def rope_frequencies(D: int, theta: float = 10000.0, scaling: Llama31Scaling | None = None) -> np.ndarray:
    """float64 ``[D/2]`` rotation frequencies ``f_p`` (SPEC §4.2), one rounding per operation.

    ``f_p = theta ** (-(2p) / D)``; with ``scaling`` the Llama-3.1 rule is applied per ``p``.
    """
    if isinstance(D, bool) or not isinstance(D, (int, np.integer)) or D < 2 or D % 2:
        raise ValueError(f"rope_frequencies: D: expected an even integer >= 2, got {D!r}")
    theta = _real("rope_frequencies", "theta", theta, positive=True)
    _check_scaling("rope_frequencies", scaling)
    D = int(D)
    # libm pow per element: NumPy's vectorised power may differ in the last bit between builds
    f = np.array([math.pow(theta, -(2.0 * p) / D) for p in range(D // 2)], dtype=np.float64)
    if scaling is None:
        return f
    old = np.float64(scaling.old_context_len)
    lo, hi = np.float64(scaling.lo_freq_factor), np.float64(scaling.hi_freq_factor)
    sf = np.float64(scaling.scaling_factor)
    lo_wl = old / lo
    hi_wl = old / hi
    wl = np.float64(2.0 * math.pi) / f
    out = f.copy()
    low = (wl >= hi_wl) & (wl > lo_wl)
    mid = (wl >= hi_wl) & ~low
    out[low] = f[low] / sf
    s = (old / wl[mid] - lo) / (hi - lo)
    out[mid] = ((np.float64(1.0) - s) * f[mid]) / sf + s * f[mid]
    return out


def xpos_zeta(D: int, gamma: float) -> np.ndarray:
    """float64 ``[D/2]`` xPos bases ``zeta_p = (2p + gamma*D) / (D + gamma*D)`` (SPEC §4.4)."""
    gD = np.float64(gamma) * np.float64(D)
    return (2.0 * np.arange(D // 2, dtype=np.float64) + gD) / (np.float64(D) + gD)


def position_tables(pos_enc, D: int, op: str = "position_tables"):
    """``(mode, interleaved, freqs, zeta)`` for a position encoding: ``mode`` 0 NoPE, 1 RoPE, 2 xPos.

    ``freqs`` / ``zeta`` are float64 ``[D/2]`` host arrays (read-only, memoized per
    ``(pos_enc, D)``), or ``None`` where unused.
    """
    if pos_enc is None:
        return 0, True, None, None
    if not isinstance(pos_enc, (RoPE, XPos)):
        raise TypeError(f"{op}: pos_enc: expected cukv.RoPE, cukv.XPos or None, got {type(pos_enc).__name__}")
    return _tables(pos_enc, int(D))


@functools.lru_cache(maxsize=64)
def _tables(pos_enc, D):
    f = rope_frequencies(D, pos_enc.theta, pos_enc.scaling)
    f.flags.writeable = False
    if isinstance(pos_enc, XPos):
        z = xpos_zeta(D, pos_enc.gamma)
        z.flags.writeable = False
        return 2, bool(pos_enc.interleaved), f, z
    return 1, bool(pos_enc.interleaved), f, None
