"""Tests of the shared test helpers (tests/helpers.py): a wrong comparator would hide kernel bugs."""
import numpy as np
import pytest

from helpers import (BF16, activations, assert_bytes_equal, assert_flips, assert_fully_written,
                     assert_within_rel, check_guard, compare_flips, flip_budget, guarded, misaligned_copy,
                     poison, poisoned, raises_arg, strided_copy, to_host)


def test_flip_budget():
    assert flip_budget(0, 1e-4) == 0
    assert flip_budget(1, 1e-4) == 1
    assert flip_budget(10000, 1e-4) == 1
    assert flip_budget(10001, 1e-4) == 2
    assert flip_budget(1 << 20, 2.0 ** -20) == 1


def test_e4m3_flips():
    want = np.array([0x00, 0x00, 0x80, 0x01, 0x7E, 0x3F, 0x7F, 0x7F, 0x10], np.uint8)
    got = np.array([0x01, 0x80, 0x81, 0x00, 0x7D, 0x40, 0xFF, 0x7E, 0x12], np.uint8)
    nmis, nbad, mask = compare_flips(got, want, "e4m3")
    # +0->2^-9, +0->-0, -0->-2^-9, 2^-9->+0, 448->416, 0x3F->0x40 are one step; NaN==NaN; NaN->448 and
    # a two-code jump are not.
    assert mask.tolist() == [True, True, True, True, True, True, False, True, True]
    assert (nmis, nbad) == (8, 2)
    with pytest.raises(AssertionError, match="larger than one step"):
        assert_flips(got, want, "e4m3", 100)
    assert assert_flips(got[:6], want[:6], "e4m3", 6) == 6
    with pytest.raises(AssertionError, match="budget 5"):
        assert_flips(got[:6], want[:6], "e4m3", 5)
    # sign changes of non-zero codes are not flips
    assert compare_flips(np.array([0x81], np.uint8), np.array([0x01], np.uint8), "e4m3")[1] == 1


def test_int4_flips_per_nibble():
    want = np.array([[0x21, 0xF0]], np.uint8)
    got = np.array([[0x22, 0xF0]], np.uint8)           # low nibble 1 -> 2
    assert compare_flips(got, want, "int4")[:2] == (1, 0)
    got = np.array([[0x31, 0xE1]], np.uint8)           # three nibbles off by one
    assert compare_flips(got, want, "int4")[:2] == (3, 0)
    got = np.array([[0x21, 0x0F]], np.uint8)           # 0 <-> 15 is no flip
    assert compare_flips(got, want, "int4")[:2] == (2, 2)


@pytest.mark.parametrize("kind,dtype", [("bf16", BF16), ("f16", np.float16)])
def test_float_flips(kind, dtype):
    w = np.array([1.0, 1.0, -2.0, 0.0, np.nan, np.nan, 3.0], dtype)
    bits = w.view(np.uint16).copy()
    bits[0] += 1            # +1 ulp
    bits[1] -= 1            # -1 ulp
    bits[2] += 2            # 2 ulp: bad
    bits[3] = 0x8000        # -0 == +0 as values
    bits[4] = 0xFFC1 if kind == "bf16" else 0xFE01      # another NaN: equal
    bits[5] = np.float16(1).view(np.uint16) if kind == "f16" else np.array(1, BF16).view(np.uint16)
    g = bits.view(dtype)
    nmis, nbad, mask = compare_flips(g, w, kind)
    assert mask.tolist() == [True, True, True, False, False, True, False]
    assert (nmis, nbad) == (4, 2)


def test_assert_bytes_equal_nan_rule():
    a = np.array([np.nan, 1.0], np.float32)
    b = np.array([-np.nan, 1.0], np.float32)
    assert_bytes_equal(a, b)
    with pytest.raises(AssertionError, match="1 of 2"):
        assert_bytes_equal(a, b, nan_equal=False)
    with pytest.raises(AssertionError, match="dtype"):
        assert_bytes_equal(a, a.astype(np.float64))


def test_poison_and_guard(xp):
    buf, view = guarded(xp, (3, 5), np.uint8)
    assert int(to_host(view).min()) == 0xA5
    view[...] = 1
    check_guard(buf, view)
    buf[2] = 0
    with pytest.raises(AssertionError, match="guard band before"):
        check_guard(buf, view)
    f = poisoned(xp, (4,), BF16, "nan")
    assert np.isnan(to_host(f).astype(np.float32)).all()
    assert (to_host(poison(xp.zeros(3, np.float32))).view(np.uint32) == 0xA5A5A5A5).all()


def test_assert_fully_written(xp):
    def make(fill):
        return poisoned(xp, (8,), np.uint8, fill)

    def full(out):
        out[...] = 3
        return out

    def partial(out):
        out[:7] = 3
        return out

    assert to_host(assert_fully_written(full, make)).tolist() == [3] * 8
    with pytest.raises(AssertionError, match="unwritten"):
        assert_fully_written(partial, make)


def test_layout_helpers(xp, rng):
    a = activations(rng, (5, 16))
    for how in ("pad", "step", "transpose"):
        v = strided_copy(xp, a, how=how)
        assert not v.flags.c_contiguous
        assert_bytes_equal(xp.ascontiguousarray(v), a)
    m = misaligned_copy(xp, a)
    ptr = int(m.data.ptr) if xp is not np else m.__array_interface__["data"][0]
    assert ptr % 16 == a.itemsize and m.flags.c_contiguous
    assert_bytes_equal(m, a)


def test_activations_have_outliers(rng):
    a = activations(rng, (64, 32)).astype(np.float32)
    assert (a != 0).mean() > 0.99
    rms = np.sqrt((a.astype(np.float64) ** 2).mean(axis=1))
    assert rms.max() > 50 and rms.min() < 0.1


def test_within_rel_and_raises_arg():
    assert_within_rel(np.array([1.0, np.nan, np.inf]), np.array([1.0 + 1e-3, np.nan, np.inf]), 2e-3)
    with pytest.raises(AssertionError, match="outside"):
        assert_within_rel(np.array([1.1]), np.array([1.0]), 1e-2)
    with pytest.raises(AssertionError, match="NaN mismatch"):
        assert_within_rel(np.array([np.nan]), np.array([1.0]), 1e-2)
    with raises_arg(ValueError, "op", "x", "expected", "got"):
        raise ValueError("op: x: expected 1, got 2")
    with pytest.raises(AssertionError):
        with raises_arg(ValueError, "op", "y"):
            raise ValueError("op: x: expected 1, got 2")
