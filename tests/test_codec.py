"""cukv.quantize / cukv.dequantize (cukv/codec.py): reference vs float64 bounds, kernels vs reference.

Tolerances (SPEC §11): the codec path is bit-exact (0 mismatches, the spec fixes every rounding); the
reference is checked against the float64 error bounds of §11.2, which also catch partial reductions.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import cukv
from cukv.ref import codec as ref
from helpers import (BF16, activations, assert_bytes_equal, misaligned_copy, raises_arg, strided_copy,
                     to_device, to_host)

FORMATS = ["fp8", "fp8_head", "int4", "int4:g2", "int4:g4", "int4:g8"]
F32 = np.float32


def u16(a):
    """SPEC §1.1: max(2^-11 |a|, 2^-25), the error of rounding a to fp16."""
    return np.maximum(np.abs(a) * 2.0 ** -11, 2.0 ** -25)


def head_scale(x32):
    """A per-row fp8_head scale that covers the row: s = absmax / 448 (>= S_MIN)."""
    return np.maximum(np.abs(x32).max(axis=-1) / F32(448), ref.S_MIN).astype(F32)


def roundtrip(x, fmt, xp=np):
    kw = {}
    if fmt == "fp8_head":
        kw["scale"] = to_device(xp, head_scale(to_host(x).astype(F32)))
    q = cukv.quantize(x, fmt, **kw)
    return q, cukv.dequantize(q, fmt, **kw), kw


# ------------------------------------------------------------------------------ reference (CPU)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D", [8, 64, 128, 256])
def test_reference_error_bounds(rng, fmt, D):
    """SPEC §11.2 per-element bounds, for every row and group, on bf16 N(0,1) with outlier rows."""
    if fmt.startswith("int4") and D % (2 * cukv.parse_format(fmt)[1]):
        pytest.skip("int4:gG needs D % 2G == 0")
    x = activations(rng, (200, D))
    x64 = x.astype(np.float64)
    q, xh, kw = roundtrip(x, fmt)
    err = np.abs(xh.astype(np.float64) - x64)
    y = x.astype(F32)
    if fmt == "fp8":
        s, z, _ = ref.fp8_params(y)
        s, z = s.astype(np.float64)[:, None], z.astype(np.float64)[:, None]
        bound = 1.01 * (2.0 ** -4 * np.abs(x64 - z) + 2.0 ** -10 * s + 448 * u16(s) + u16(z)) \
            + 2.0 ** -8 * np.abs(x64)
    elif fmt == "fp8_head":
        s = kw["scale"].astype(np.float64)[:, None]
        bound = 1.01 * (2.0 ** -4 * np.abs(x64) + 2.0 ** -10 * s) + 2.0 ** -8 * np.abs(x64)
    else:
        G = cukv.parse_format(fmt)[1]
        s, mn, _ = ref.int4_params(y, G)
        s = np.repeat(s.astype(np.float64), D // G, axis=-1)
        mn = np.repeat(mn.astype(np.float64), D // G, axis=-1)
        bound = 1.01 * (s / 2 + 1e-8 + 15 * u16(s) + u16(mn) + u16(x64)) + 2.0 ** -8 * np.abs(x64)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"{fmt}: error {err[worst]} > bound {bound[worst]} at {worst}"


def test_reference_fp8_layout_and_params(rng):
    """Inline rows are [scale f16][shift f16][codes], the same bytes as the external words."""
    x = activations(rng, (33, 64))
    rows = cukv.quantize(x, "fp8")
    codes, words = cukv.quantize(x, "fp8", external_qparams=True)
    assert rows.shape == (33, 68) and codes.shape == (33, 64) and words.shape == (33,)
    assert_bytes_equal(rows[:, 4:], codes)
    assert_bytes_equal(rows[:, :4], words.astype("<i4").view(np.uint8).reshape(33, 4))
    scale, shift = cukv.unpack_qparams(words)
    y = x.astype(np.float64)
    mn, mx = y.min(-1), y.max(-1)
    # float64 formula of SPEC §2.3 (uncapped rows): s = (mx - mn) / 2 / 448, z = mn + 448 s
    np.testing.assert_allclose(scale.astype(np.float64), (mx - mn) / 896, rtol=2 ** -10)
    np.testing.assert_allclose(shift.astype(np.float64), (mx + mn) / 2, rtol=2 ** -10,
                               atol=2 ** -10 * (mx - mn).max())
    assert_bytes_equal(cukv.pack_qparams(scale, shift), words)


def test_reference_int4_layout(rng):
    """Group words at the front, element 2k in the low nibble of byte 4G + k."""
    x = activations(rng, (5, 32), outliers=False)
    rows = cukv.quantize(x, "int4:g2")
    assert rows.shape == (5, 16 + 8)
    w = rows[:, :8].copy().view("<i4")
    scale, shift = cukv.unpack_qparams(w)
    y = x.astype(F32).reshape(5, 2, 16)
    assert_bytes_equal(shift, y.min(-1).astype(np.float16))
    q = np.empty((5, 32), np.int64)
    q[:, 0::2], q[:, 1::2] = rows[:, 8:] & 0xF, rows[:, 8:] >> 4
    approx = (y - y.min(-1, keepdims=True)) / ((y.max(-1) - y.min(-1)) / 15)[..., None]
    assert np.abs(q.reshape(5, 2, 16) - approx).max() <= 0.5 + 1e-3


def test_reference_fp8_half_range_cap():
    """Rows whose half range exceeds 32750 are capped so 2*scale stays finite in fp16."""
    x = np.array([[-60000.0, 60000.0] + [0.0] * 6], dtype=F32)
    c, w = cukv.quantize(x, "fp8", external_qparams=True)
    s, z = cukv.unpack_qparams(w)
    assert np.isfinite(2 * s.astype(np.float16)).all() and float(s[0]) == pytest.approx(32750 / 448, 1e-3)


def test_e4m3_helpers_match_ml_dtypes():
    """The reference encoder saturates (CUDA convention) where ml_dtypes would give NaN."""
    v = np.array([0.0, -0.0, 2 ** -10, 2 ** -9, 447.9, 448.0, 460.0, 1e6, -np.inf, np.nan], F32)
    c = ref.e4m3_encode(v)
    assert list(c[[5, 6, 7]]) == [0x7E, 0x7E, 0x7E] and c[8] == 0xFE and c[9] == 0x7F
    assert ref.e4m3_decode(np.arange(256, dtype=np.uint8)[:0x7F]).max() == 448


# ------------------------------------------------------------------------------ non-finite (both)
@pytest.mark.parametrize("fmt", ["fp8", "int4:g4", "fp8_head"])
def test_nonfinite_confined(xp, rng, fmt):
    """SPEC §11.4: a NaN/Inf changes nothing outside its row (fp8) or group (int4) or element."""
    x = activations(rng, (6, 64)).astype(F32)
    bad = x.copy()
    bad[2, 5] = np.nan
    bad[4, 40] = np.inf
    kw = {"scale": to_device(xp, head_scale(x))} if fmt == "fp8_head" else {}
    got = to_host(cukv.quantize(to_device(xp, bad), fmt, **kw))
    clean = bad.copy()
    clean[2, 5] = clean[4, 40] = 0
    base = to_host(cukv.quantize(to_device(xp, clean), fmt, **kw))
    if fmt == "fp8":
        for r in (2, 4):
            assert got[r, :4].view("<u4")[0] == 0x7E007E00 and (got[r, 4:] == 0x7F).all()
        keep = [0, 1, 3, 5]
        assert_bytes_equal(got[keep], base[keep])
    elif fmt == "int4:g4":
        w = got[:, :16].copy().view("<u4")
        assert w[2, 0] == 0x7E007E00 and w[4, 2] == 0x7E007E00
        nib = got[:, 16:]
        assert (nib[2, 0:8] == 0).all() and (nib[4, 16:24] == 0).all()
        mask = np.ones(got.shape, bool)
        mask[2, [0, 1, 2, 3]] = False
        mask[2, 16:24] = False
        mask[4, 8:12] = False
        mask[4, 32:40] = False
        assert_bytes_equal(got[mask], base[mask])
    else:
        assert got[2, 5] == 0x7F and got[4, 40] == 0x7E
        mask = np.ones(got.shape, bool)
        mask[2, 5] = mask[4, 40] = False
        assert_bytes_equal(got[mask], base[mask])
    # NaN qparams / codes dequantize to NaN in their row/group only
    deq = to_host(cukv.dequantize(to_device(xp, got), fmt, **kw)).astype(np.float64)
    if fmt == "fp8":
        assert np.isnan(deq[[2, 4]]).all() and not np.isnan(deq[[0, 1, 3, 5]]).any()
    elif fmt == "int4:g4":
        assert np.isnan(deq[2, :16]).all() and not np.isnan(deq[2, 16:]).any()


# ------------------------------------------------------------------------------ kernels (GPU)
@pytest.mark.parametrize("fmt", FORMATS + ["bf16"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("D", [8, 16, 24, 64, 128, 256, 320, 1024, 2048])
def test_kernel_matches_reference(gpu, rng, fmt, dtype, D):
    """Kernel bytes == reference bytes (0 budget) for every format, input dtype and team shape
    (teams of 1..32 lanes with one chunk each, D=320/1024/2048 several chunks per lane and the looped
    long-row path; int4:g1 teams with 1/2/4 chunks per lane; INT4 groups aligned or not to chunks)."""
    if fmt.startswith("int4") and D % (2 * cukv.parse_format(fmt)[1]):
        pytest.skip("D not divisible by 2G")
    dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    for n in (1, 7, 111):
        x = activations(rng, (n, D), dt)
        kw = {"scale": head_scale(x.astype(F32))} if fmt == "fp8_head" else {}
        want = cukv.quantize(x, fmt, **kw)
        # poison the pool block the kernel's output will reuse: an unwritten byte would show
        nb = want.nbytes
        gpu.full(nb, 0xA5, dtype=np.uint8)
        got = cukv.quantize(gpu.asarray(x), fmt, **{k: gpu.asarray(v) for k, v in kw.items()})
        assert_bytes_equal(got, want, what=f"quantize {fmt} {dtype} D={D} n={n}")
        back_want = cukv.dequantize(want, fmt, **kw)
        gpu.full(back_want.nbytes, 0xA5, dtype=np.uint8)
        back = cukv.dequantize(got, fmt, **{k: gpu.asarray(v) for k, v in kw.items()})
        assert_bytes_equal(back, back_want, what=f"dequantize {fmt} D={D} n={n}")


def signed_zero_rows(rng, n, D):
    """Rows of positive values whose minimum is zero, met as +0 and -0 in random places and orders."""
    x = np.abs(activations(rng, (n, D))).astype(F32) + F32(0.5)
    for i in range(n):
        idx = rng.choice(D, size=4, replace=False)
        x[i, idx] = np.array([0.0, -0.0, -0.0, 0.0] if i % 2 else [-0.0, 0.0, 0.0, -0.0], F32)
    return x.astype(BF16)


@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_reference_int4_zero_minimum_is_plus_zero(rng, G):
    """A group minimum met as both +0 and -0 is stored as +0, whatever the order (SPEC §2.5 leaves the
    sign of a zero minimum open; cukv fixes it so that bytes do not depend on the reduction order)."""
    x = signed_zero_rows(rng, 16, 64)
    rows = cukv.quantize(x, f"int4:g{G}")
    _, shift = cukv.unpack_qparams(rows[:, : 4 * G].copy().view("<i4"))
    zero = x.astype(F32).reshape(16, G, -1).min(-1) == 0
    assert zero.any()
    assert not np.signbit(shift[zero]).any()


@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_kernel_int4_zero_minimum(gpu, rng, G, D):
    """Kernels store a zero minimum as +0 like the reference (every int4 path: staged g1, lane-owned
    groups, sub-team groups), bytes equal."""
    x = signed_zero_rows(rng, 300, D)
    want = cukv.quantize(x, f"int4:g{G}")
    got = cukv.quantize(gpu.asarray(x), f"int4:g{G}")
    assert_bytes_equal(got, want, what=f"int4:g{G} D={D} signed-zero minima")


@pytest.mark.parametrize("D", [64, 128, 256])
def test_kernel_int4_g1_staged_many_waves(gpu, rng, D):
    """int4:g1 rows written through shared memory (codec.cu quantize_int4_staged): with more rows than
    one wave of teams every team loops and prefetches, and the last warp's span of rows is partial
    (2 waves + 5 rows). Bytes == reference; the output's pool block is poisoned first."""
    from cukv import codec

    W, V = codec.STAGED[D]
    k = codec._CODEC.kernel("quantize_int4_staged", "bf16_t", W, V)
    teams = codec.sm_count() * codec.resident_blocks(k, codec._BLOCK) * codec._BLOCK // W
    n = 2 * teams + 5
    x = activations(rng, (n, D))
    want = cukv.quantize(x, "int4:g1")
    gpu.full(want.nbytes, 0xA5, dtype=np.uint8)
    got = cukv.quantize(gpu.asarray(x), "int4:g1")
    assert_bytes_equal(got, want, what=f"quantize int4:g1 D={D} n={n}")


@pytest.mark.parametrize("fmt", ["fp8", "int4", "int4:g8", "fp8_head"])
def test_kernel_dequantize_arbitrary_bytes(gpu, rng, fmt):
    """Every byte pattern (NaN codes, subnormals, random fp16 qparams) decodes like the reference."""
    D = 128
    R = cukv.row_bytes(fmt, D)
    rows = rng.integers(0, 256, (257, R), dtype=np.uint8)
    kw = {"scale": rng.uniform(1e-3, 10, 257).astype(F32)} if fmt == "fp8_head" else {}
    want = cukv.dequantize(rows, fmt, **kw)
    got = cukv.dequantize(gpu.asarray(rows), fmt, **{k: gpu.asarray(v) for k, v in kw.items()})
    assert_bytes_equal(got, want)


def test_kernel_external_qparams(gpu, rng):
    x = activations(rng, (3, 17, 128))
    c, w = cukv.quantize(gpu.asarray(x), "fp8", external_qparams=True)
    rc, rw = cukv.quantize(x, "fp8", external_qparams=True)
    assert_bytes_equal(c, rc)
    assert_bytes_equal(w, rw)
    assert_bytes_equal(cukv.dequantize(c, "fp8", qparams=w), cukv.dequantize(rc, "fp8", qparams=rw))


@pytest.mark.parametrize("how", ["pad", "step", "transpose", "misaligned"])
def test_kernel_noncontiguous_and_misaligned(gpu, rng, how):
    """Strided inputs behave as ascontiguousarray(x); a misaligned base takes the scalar path."""
    x = activations(rng, (9, 128))
    xd = misaligned_copy(gpu, x) if how == "misaligned" else strided_copy(gpu, x, how=how)
    for fmt in ("fp8", "int4:g4", "int4:g1"):
        assert_bytes_equal(cukv.quantize(xd, fmt), cukv.quantize(x, fmt))
    rows = cukv.quantize(x, "int4:g4")
    rd = misaligned_copy(gpu, rows, 2) if how == "misaligned" else strided_copy(gpu, rows, how="pad")
    assert_bytes_equal(cukv.dequantize(rd, "int4:g4"), cukv.dequantize(rows, "int4:g4"))


def test_kernel_leading_shapes_and_empty(gpu, rng):
    x = activations(rng, (2, 3, 5, 64))
    assert_bytes_equal(cukv.quantize(gpu.asarray(x), "fp8"), cukv.quantize(x, "fp8"))
    e = cukv.quantize(gpu.zeros((0, 64), dtype=BF16), "int4")
    assert e.shape == (0, 36) and cukv.dequantize(e, "int4").shape == (0, 64)


def test_input_not_modified(xp, rng):
    x = to_device(xp, activations(rng, (4, 64)))
    before = to_host(x).copy()
    cukv.quantize(x, "fp8")
    assert_bytes_equal(x, before)


# ------------------------------------------------------------------------------ bad input (both)
def test_bad_input(xp, rng):
    x = to_device(xp, activations(rng, (4, 64)))
    with raises_arg(TypeError, "quantize", "x", "expected", "got"):
        cukv.quantize(x.astype(np.int32), "fp8")
    with raises_arg(ValueError, "quantize", "fmt", "expected"):
        cukv.quantize(x, "fp4")
    with raises_arg(ValueError, "quantize", "fmt"):
        cukv.quantize(x, "INT4")
    with raises_arg(ValueError, "quantize", "x.shape[-1]", "D % 8"):
        cukv.quantize(x[:, :60], "fp8")
    with raises_arg(ValueError, "quantize", "x.shape[-1]", "D % 16"):
        cukv.quantize(x[:, :8], "int4:g8")
    with raises_arg(ValueError, "quantize", "scale", "float32"):
        cukv.quantize(x, "fp8_head")
    with raises_arg(TypeError, "quantize", "scale", "float32"):
        cukv.quantize(x, "fp8_head", scale=to_device(xp, np.ones(4, np.float64)))
    with raises_arg(ValueError, "quantize", "scale", "broadcastable"):
        cukv.quantize(x, "fp8_head", scale=to_device(xp, np.ones(3, F32)))
    with raises_arg(ValueError, "quantize", "external_qparams"):
        cukv.quantize(x, "int4", external_qparams=True)
    rows = cukv.quantize(x, "fp8")
    with raises_arg(ValueError, "dequantize", "rows", "valid 'int4:g8' row size"):
        cukv.dequantize(rows[:, :66], "int4:g8")
    with raises_arg(TypeError, "dequantize", "rows", "uint8"):
        cukv.dequantize(x, "fp8")
    with raises_arg(ValueError, "dequantize", "qparams", "int32 [4]"):
        cukv.dequantize(rows[:, 4:], "fp8", qparams=to_device(xp, np.zeros(3, np.int32)))
    with raises_arg(TypeError, "quantize", "x", "view(np.uint8)"):
        cukv.quantize(np.zeros((2, 8), ml_dtypes.float8_e4m3fn), "fp8")


def test_module_mix(gpu, rng):
    x = activations(rng, (4, 64))
    with raises_arg(TypeError, "quantize", "scale", "numpy"):
        cukv.quantize(gpu.asarray(x), "fp8_head", scale=np.ones(4, F32))
