"""cukv.rope: frequency / xPos tables (SPEC §4.1-§4.4) and the reference position encoding."""
import math

import numpy as np
import pytest

import cukv
from cukv.ref.cache_write import encode_positions
from cukv.rope import position_tables, xpos_zeta


@pytest.mark.parametrize("D", [64, 128, 256])
def test_frequencies_plain(D):
    f = cukv.rope_frequencies(D, 10000.0)
    assert f.dtype == np.float64 and f.shape == (D // 2,)
    for p in (0, 1, D // 4, D // 2 - 1):
        assert f[p] == np.float64(10000.0) ** (-(2.0 * p) / D)
    assert f[0] == 1.0 and np.all(np.diff(f) < 0)


def _llama31_scalar(f, old, sf, lo, hi):
    """Independent scalar form of Llama-3.1's apply_scaling (Meta's reference code)."""
    low_wl, high_wl = old / lo, old / hi
    out = []
    for fr in f:
        wl = 2 * math.pi / fr
        if wl < high_wl:
            out.append(fr)
        elif wl > low_wl:
            out.append(fr / sf)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append((1 - s) * fr / sf + s * fr)
    return np.array(out)


@pytest.mark.parametrize("params", [(8192, 8.0, 1.0, 4.0), (8192, 16, 1, 32), (4096, 4.0, 2.0, 8.0)])
def test_frequencies_llama31(params):
    sc = cukv.Llama31Scaling(*params)
    f0 = cukv.rope_frequencies(128, 500000.0)
    f = cukv.rope_frequencies(128, 500000.0, sc)
    want = _llama31_scalar(f0, *[float(v) for v in params])
    np.testing.assert_allclose(f, want, rtol=1e-15, atol=0)
    assert f[0] == f0[0]                                   # highest frequency unchanged
    assert f[-1] == f0[-1] / np.float64(params[1])         # lowest divided by the factor
    assert np.all(f <= f0)


def test_defaults_and_validation():
    assert cukv.Llama31Scaling() == cukv.Llama31Scaling(8192, 8.0, 1.0, 4.0)
    assert cukv.RoPE() == cukv.RoPE(10000.0, True, None)
    with pytest.raises(ValueError, match="^RoPE: theta"):
        cukv.RoPE(theta=0.0)
    with pytest.raises(ValueError, match="^XPos: scale_base"):
        cukv.XPos(10000.0, 0.4, 0.0)
    with pytest.raises(ValueError, match="^Llama31Scaling: hi_freq_factor"):
        cukv.Llama31Scaling(hi_freq_factor=1.0)
    with pytest.raises(TypeError, match="^RoPE: scaling"):
        cukv.RoPE(scaling=8.0)
    with pytest.raises(ValueError, match="^rope_frequencies: D"):
        cukv.rope_frequencies(7)
    with pytest.raises(TypeError, match="^write_kv_prefill: pos_enc"):
        position_tables("rope", 128, "write_kv_prefill")


def test_xpos_zeta():
    z = xpos_zeta(128, 0.4)
    assert z[0] == (0.4 * 128) / (128 + 0.4 * 128)
    assert np.all(np.diff(z) > 0) and z[-1] < 1.0


def _tables(pe, D):
    mode, inter, f, z = position_tables(pe, D)
    off = pe.exponent_offset if mode == 2 else 0.0
    base = pe.scale_base if mode == 2 else 1.0
    return mode, inter, f, z, off, base


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotation_properties(rng, interleaved):
    D = 128
    x = rng.standard_normal((6, 3, D)).astype(np.float32)
    pos = np.array([0, 1, 7, 1000, 65535, 131071])
    mode, inter, f, z, off, base = _tables(cukv.RoPE(10000.0, interleaved), D)
    y = encode_positions(x, pos, mode, inter, f)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y[0], x[0])                            # position 0: identity
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6)
    # the two conventions are the same rotation up to a permutation of the elements
    perm = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])    # interleaved -> half-split
    other = encode_positions(x[..., perm] if interleaved else x[..., np.argsort(perm)], pos, mode,
                             not inter, f)
    back = other[..., np.argsort(perm)] if interleaved else other[..., perm]
    np.testing.assert_array_equal(back, y)
    # float64 truth (angle in float64; the spec's order of operations)
    a = pos[:, None].astype(np.float64) * f[None, :]
    x64 = x.astype(np.float64)
    xi, xj = (x64[..., 0::2], x64[..., 1::2]) if interleaved else (x64[..., :D // 2], x64[..., D // 2:])
    yi = xi * np.cos(a)[:, None] - xj * np.sin(a)[:, None]
    got_i = y[..., 0::2] if interleaved else y[..., :D // 2]
    np.testing.assert_array_equal(got_i, yi.astype(np.float32))


def test_xpos_scaling(rng):
    D = 64
    pe = cukv.XPos(10000.0, 0.4, 512.0, exponent_offset=5.0)
    mode, inter, f, z, off, base = _tables(pe, D)
    x = rng.standard_normal((3, 2, D)).astype(np.float32)
    pos = np.array([5, 100, 4000])
    q = encode_positions(x, pos, mode, inter, f, z, off, base, is_q=True)
    k = encode_positions(x, pos, mode, inter, f, z, off, base, is_q=False)
    r = encode_positions(x, pos, 1, inter, f)
    np.testing.assert_array_equal(q[0], r[0])       # e = 0 at pos == exponent_offset
    np.testing.assert_array_equal(k[0], r[0])
    e = (pos - 5.0) / 512.0
    zz = np.repeat(z[None, :] ** e[:, None], 2, axis=1)[:, None, :]
    np.testing.assert_allclose(q, r * zz, rtol=2e-7)
    np.testing.assert_allclose(k, r / zz, rtol=2e-7)
    assert np.all(np.abs(q[2]) <= np.abs(r[2]) * 1.0000001)   # zeta < 1, e > 0: Q decays
