"""cukv.rms_norm (cukv/norm.py): reference vs float64, kernel vs reference, layouts, non-finite, errors.

Tolerances (SPEC §11): the kernel sums squares in fp32 (the reference in float64), so bf16 outputs may
differ from the reference by one-step flips (one bf16 ulp) in at most ceil(1e-4 * size) values
(§11.1); every bf16 output, reference or kernel, is within 2^-7 |y64| of the float64 formula (§11.2).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import cukv
from cukv import norm as norm_mod
from cukv.ref import norm as ref
from helpers import (BF16, F16, F32, activations, assert_bytes_equal, assert_flips, assert_fully_written,
                     assert_within_rel, check_guard, flip_budget, guarded, misaligned_copy, poisoned,
                     raises_arg, strided_copy, to_device, to_host)

REL = 2.0 ** -7
X_DTYPES = [BF16, F16, F32]
W_DTYPES = [None, BF16, F32]


def y64(x, weight=None, eps=1e-6):
    """SPEC §9 evaluated entirely in float64."""
    x = np.asarray(x).astype(np.float64)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    y = x * r
    if weight is not None:
        y = y * np.asarray(weight).astype(np.float64)
    return y


def weight_for(rng, N, dtype):
    if dtype is None:
        return None
    return (1.0 + 0.5 * rng.standard_normal(N)).astype(np.float32).astype(dtype)


def check_vs_ref(got, x, w, eps, what):
    """Kernel output vs the reference (one-step flip budget) and vs float64 (2^-7 relative)."""
    want = ref.rms_norm(to_host(x), to_host(w), eps)
    assert_flips(got, want, "bf16", flip_budget(want.size, 1e-4), what=what)
    assert_within_rel(to_host(got).astype(np.float64), y64(to_host(x), to_host(w), eps), REL, what=what)


# ------------------------------------------------------------------------------ reference (CPU)
@pytest.mark.parametrize("xdt", X_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("wdt", W_DTYPES, ids=lambda d: "w=None" if d is None else f"w={np.dtype(d).name}")
@pytest.mark.parametrize("N", [8, 64, 136, 4096])
def test_reference_within_float64(rng, xdt, wdt, N):
    """SPEC §11.2: |y - y64| <= 2^-7 |y64| for bf16 N(0,1) rows with x100 / x1e-3 outlier rows."""
    x = activations(rng, (111, N), xdt)
    w = weight_for(rng, N, wdt)
    y = cukv.rms_norm(x, w, 1e-6)
    assert y.dtype == BF16 and y.shape == x.shape and isinstance(y, np.ndarray)
    assert_within_rel(y, y64(x, w, 1e-6), REL, what="reference rms_norm")


def test_reference_formula_rounding():
    """The reference rounds in SPEC §9's order: r in fp32, RN(x*r) in fp32, then the weight."""
    x = np.array([[3.0, 4.0] * 4], np.float32)
    w = np.full(8, 3.0, np.float32)
    ms = np.float32(np.sum(x.astype(np.float64) ** 2) / 8)
    r = np.float32(1) / np.sqrt(np.float32(ms + np.float32(0.25)))
    want = ((x * r).astype(np.float32) * w).astype(np.float32).astype(BF16)
    assert_bytes_equal(ref.rms_norm(x, w, 0.25), want)


def test_numpy_out_and_eps(rng):
    x = activations(rng, (7, 64))
    out = poisoned(np, x.shape, BF16, "nan")
    res = cukv.rms_norm(x, eps=0.5, out=out)
    assert res is out
    assert_bytes_equal(out, ref.rms_norm(x, None, 0.5))
    # eps = 0 is allowed (FBGEMM's k_norm); an all-zero row then gives NaN (0 * inf)
    z = np.zeros((1, 8), BF16)
    assert np.isnan(cukv.rms_norm(z, eps=0).astype(np.float32)).all()


# ------------------------------------------------------------------------------ both backends
def test_non_finite_confined_to_row(xp, rng):
    """SPEC §11.4: a NaN / Inf changes only its own row; other rows are bit-identical to the run with
    that value replaced by 0."""
    N = 256
    x = activations(rng, (9, N))
    w = weight_for(rng, N, BF16)
    bad = x.copy()
    bad[2, 17] = np.nan
    bad[5, 0] = np.inf
    bad[7, N - 1] = -np.inf
    clean = bad.copy()
    for r, c in ((2, 17), (5, 0), (7, N - 1)):
        clean[r, c] = 0
    yb = to_host(cukv.rms_norm(to_device(xp, bad), to_device(xp, w)))
    yc = to_host(cukv.rms_norm(to_device(xp, clean), to_device(xp, w)))
    others = [0, 1, 3, 4, 6, 8]
    assert_bytes_equal(yb[others], yc[others], what="rows without a non-finite value")
    assert np.isnan(yb[2].astype(np.float32)).all()
    # an Inf makes r = 0: the Inf element gives NaN (inf*0) and the rest of its row +-0
    for r, c in ((5, 0), (7, N - 1)):
        row = yb[r].astype(np.float32)
        assert np.isnan(row[c]) and (row[np.arange(N) != c] == 0).all()
    assert_bytes_equal(yb, ref.rms_norm(bad, w), what="non-finite rows vs reference")


def test_out_poisoned_and_guarded(xp, rng):
    """Every element of out is written, nothing around it changes, and x / weight are not modified."""
    x = activations(rng, (7, 1000))
    w = weight_for(rng, 1000, F32)
    xd, wd = to_device(xp, x), to_device(xp, w)

    def run(out):
        return cukv.rms_norm(xd, wd, 1e-5, out=out)

    got = assert_fully_written(run, lambda fill: poisoned(xp, x.shape, BF16, fill))
    assert_flips(got, ref.rms_norm(x, w, 1e-5), "bf16", flip_budget(x.size, 1e-4))
    buf, view = guarded(xp, x.shape, BF16, fill="nan")
    run(view)
    check_guard(buf, view, fill="nan")
    assert_bytes_equal(xd, x, what="x after the call", nan_equal=False)
    assert_bytes_equal(wd, w, what="weight after the call", nan_equal=False)


@pytest.mark.parametrize("shape", [(1, 64), (7, 128), (111, 1024), (64,), (3, 5, 24), (0, 64), (2, 0, 8)],
                         ids=str)
def test_edge_shapes(xp, rng, shape):
    x = activations(rng, shape)
    y = cukv.rms_norm(to_device(xp, x))
    assert y.shape == x.shape and y.dtype == BF16
    if x.size:
        check_vs_ref(y, x, None, 1e-6, f"rms_norm {shape}")


@pytest.mark.parametrize("how", ["pad", "step", "transpose", "reversed", "broadcast", "misaligned"])
def test_layouts(xp, rng, how):
    """Strided, reversed, broadcast (stride 0) and misaligned x; same bytes as on a contiguous copy."""
    N = 512
    x = activations(rng, (111, N))
    if how == "reversed":
        xd = to_device(xp, x[::-1].copy())[::-1]
    elif how == "broadcast":
        x = np.broadcast_to(x[:1], (111, N))
        xd = xp.broadcast_to(to_device(xp, x[:1].copy()), (111, N))
    elif how == "misaligned":
        xd = misaligned_copy(xp, x)
    else:
        xd = strided_copy(xp, x, how=how)
    w = weight_for(rng, N, BF16)
    y = cukv.rms_norm(xd, to_device(xp, w))
    y_c = cukv.rms_norm(to_device(xp, np.ascontiguousarray(x)), to_device(xp, w))
    assert_bytes_equal(y, y_c, what=f"rms_norm on a {how} x vs contiguous x")
    if xp is not np:
        check_vs_ref(y, x, w, 1e-6, f"rms_norm ({how})")


def test_misaligned_out_and_strided_weight(xp, rng):
    N = 256
    x = activations(rng, (33, N))
    wbuf = weight_for(rng, 2 * N, BF16)
    w = to_device(xp, wbuf)[::2]
    out = misaligned_copy(xp, np.zeros(x.shape, BF16))
    y = cukv.rms_norm(to_device(xp, x), w, out=out)
    assert y is out
    assert_bytes_equal(y, cukv.rms_norm(to_device(xp, x), to_device(xp, wbuf[::2].copy())))


# ------------------------------------------------------------------------------ kernels (GPU)
@pytest.mark.parametrize("xdt", X_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("wdt", W_DTYPES, ids=lambda d: "w=None" if d is None else f"w={np.dtype(d).name}")
def test_kernel_dtypes(gpu, rng, xdt, wdt):
    N = 4096
    x = activations(rng, (111, N), xdt)
    w = weight_for(rng, N, wdt)
    y = cukv.rms_norm(gpu.asarray(x), None if w is None else gpu.asarray(w), 1e-6)
    assert isinstance(y, gpu.ndarray) and y.dtype == BF16
    check_vs_ref(y, x, w, 1e-6, f"rms_norm x={np.dtype(xdt).name} w={wdt}")


@pytest.mark.parametrize("N", [8, 24, 64, 128, 256, 1000, 2048, 4096, 8192, 16384, 32768, 40000])
def test_kernel_row_lengths(gpu, rng, N):
    """Every plan shape: small teams, one warp with 1-4 chunks per lane, 2-16 warps, the stream kernel."""
    rows = 7 if N > 8192 else 111
    x = activations(rng, (rows, N))
    w = weight_for(rng, N, BF16)
    y = cukv.rms_norm(gpu.asarray(x), gpu.asarray(w), 1e-6)
    check_vs_ref(y, x, w, 1e-6, f"rms_norm N={N} ({norm_mod.plan(N)})")


@pytest.mark.parametrize("kw", [dict(v_max=1), dict(v_max=2), dict(v_max=8), dict(v_max=16),
                                dict(rows_per_block=1), dict(rows_per_block=4), dict(kernel="stream")],
                         ids=str)
@pytest.mark.parametrize("N", [1000, 4096])
def test_kernel_plans(gpu, rng, kw, N):
    """Every launch plan the benchmark compares gives the reference's bytes (within the budget)."""
    x = activations(rng, (37, N))
    w = weight_for(rng, N, F32)
    xd, wd = gpu.asarray(x), gpu.asarray(w)
    out = poisoned(gpu, x.shape, BF16, "nan")
    norm_mod.run_kernel(xd, wd, 1e-6, out, norm_mod.plan(N, **kw))
    check_vs_ref(out, x, w, 1e-6, f"plan {norm_mod.plan(N, **kw)}")


def test_kernel_deterministic(gpu, rng):
    x = gpu.asarray(activations(rng, (300, 4096)))
    assert_bytes_equal(cukv.rms_norm(x), cukv.rms_norm(x), nan_equal=False)


# ------------------------------------------------------------------------------ bad input
def test_bad_x(xp):
    with raises_arg(TypeError, "rms_norm", "x", "expected", "got int32"):
        cukv.rms_norm(xp.zeros((2, 8), np.int32))
    with raises_arg(TypeError, "rms_norm", "x", "float64"):
        cukv.rms_norm(xp.zeros((2, 8), np.float64))
    with raises_arg(ValueError, "rms_norm", "x", "N % 8 == 0", "[2, 12]"):
        cukv.rms_norm(xp.zeros((2, 12), BF16))
    with raises_arg(ValueError, "rms_norm", "x", "N > 0"):
        cukv.rms_norm(xp.zeros((2, 0), BF16))
    with raises_arg(ValueError, "rms_norm", "x", "at least one axis"):
        cukv.rms_norm(xp.zeros((), BF16))


def test_bad_x_float8():
    x = np.zeros((2, 8), ml_dtypes.float8_e4m3fn)
    with raises_arg(TypeError, "rms_norm", "x", "view(np.uint8)"):
        cukv.rms_norm(x)
    with raises_arg(TypeError, "rms_norm", "x", "numpy.ndarray or cupy.ndarray"):
        cukv.rms_norm([[1.0] * 8])


def test_bad_weight(xp):
    x = xp.zeros((2, 16), BF16)
    with raises_arg(ValueError, "rms_norm", "weight", "[16]", "[24]"):
        cukv.rms_norm(x, xp.zeros(24, BF16))
    with raises_arg(ValueError, "rms_norm", "weight", "[16]", "[1, 16]"):
        cukv.rms_norm(x, xp.zeros((1, 16), BF16))
    with raises_arg(TypeError, "rms_norm", "weight", "bfloat16 or float32", "float16"):
        cukv.rms_norm(x, xp.zeros(16, np.float16))


def test_bad_out_and_eps(xp):
    x = xp.ones((2, 16), BF16)
    with raises_arg(TypeError, "rms_norm", "out", "bfloat16", "float32"):
        cukv.rms_norm(x, out=xp.zeros((2, 16), np.float32))
    with raises_arg(ValueError, "rms_norm", "out", "[2, 16]", "[2, 8]"):
        cukv.rms_norm(x, out=xp.zeros((2, 8), BF16))
    with raises_arg(ValueError, "rms_norm", "out", "C-contiguous"):
        cukv.rms_norm(x, out=xp.zeros((2, 32), BF16)[:, ::2])
    with raises_arg(ValueError, "rms_norm", "out", "overlaps"):
        cukv.rms_norm(x, out=x)
    with raises_arg(ValueError, "rms_norm", "eps", ">= 0", "-1"):
        cukv.rms_norm(x, eps=-1.0)
    with raises_arg(ValueError, "rms_norm", "eps", "nan"):
        cukv.rms_norm(x, eps=float("nan"))
    with raises_arg(TypeError, "rms_norm", "eps", "str"):
        cukv.rms_norm(x, eps="1e-6")


def test_module_mix(gpu):
    x = np.ones((2, 16), BF16)
    with raises_arg(TypeError, "rms_norm", "weight", "cupy array", "numpy array"):
        cukv.rms_norm(x, gpu.ones(16, BF16))
    with raises_arg(TypeError, "rms_norm", "out", "numpy array", "cupy array"):
        cukv.rms_norm(gpu.asarray(x), out=np.zeros((2, 16), BF16))
