"""cukv._checks: the shared validation helpers and their message format (SPEC §1.4)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cukv import _checks
from helpers import BF16, raises_arg


def test_dtname_and_describe():
    assert _checks.dtname(BF16) == "bfloat16"
    assert _checks.dtname(np.uint8) == "uint8"
    assert _checks.dtname(ml_dtypes.float8_e4m3fn) == "float8_e4m3fn"
    assert _checks.describe(np.zeros((2, 4096, 8, 68), np.uint8)) == "uint8 [2, 4096, 8, 68]"
    assert _checks.describe(np.zeros((), np.float32)) == "float32 []"


def test_fail_format():
    with raises_arg(ValueError, "op", "arg", "expected X, got Y"):
        _checks.fail("op", "arg", "X", "Y")
    with pytest.raises(TypeError, match="^op: arg: expected X, got Y$"):
        _checks.fail("op", "arg", "X", "Y", TypeError)


def test_check_dtype(xp):
    a = xp.zeros(3, np.float16)
    _checks.check_dtype("op", "a", a, (np.float16, np.float32))
    with raises_arg(TypeError, "op", "a", "expected bfloat16 or float32, got float16 [3]"):
        _checks.check_dtype("op", "a", a, (BF16, np.float32))


def test_check_array(xp):
    a = xp.zeros((2, 3, 4), np.uint8)
    _checks.check_array("op", "a", a, np.uint8, (2, None, 4))
    with raises_arg(ValueError, "op", "a", "expected uint8 [B, T, 5], got uint8 [2, 3, 4]"):
        _checks.check_array("op", "a", a, np.uint8, (2, None, 5), "[B, T, 5]")
    with raises_arg(ValueError, "op", "a", "expected uint8 [2, *], got uint8 [2, 3, 4]"):
        _checks.check_array("op", "a", a, np.uint8, (2, None))
    with raises_arg(TypeError, "op", "a", "int32"):
        _checks.check_array("op", "a", a, np.int32, (2, 3, 4))


def test_check_c_contiguous(xp):
    _checks.check_c_contiguous("op", "out", xp.zeros((4, 4)))
    with raises_arg(ValueError, "op", "out", "C-contiguous", "strides"):
        _checks.check_c_contiguous("op", "out", xp.zeros((4, 4))[:, ::2])


def test_check_same_backend(gpu):
    _checks.check_same_backend("op", "out", np.zeros(1), np.zeros(1))
    with raises_arg(TypeError, "op", "out", "same module"):
        _checks.check_same_backend("op", "out", np.zeros(1), gpu.zeros(1))


def test_byte_bounds(xp):
    a = xp.zeros((4, 6), np.float32)
    base = int(a.data.ptr) if xp is not np else a.__array_interface__["data"][0]
    assert _checks.byte_bounds(a) == (base, base + 96)
    assert _checks.byte_bounds(a[1:3, 2:4]) == (base + 24 + 8, base + 48 + 16)
    r = a[::-1, ::-2]
    assert _checks.byte_bounds(r) == (base + 4, base + 96)
    assert _checks.byte_bounds(a[:0]) == (base, base)


def test_check_no_overlap(xp):
    buf = xp.zeros(100, np.uint8)
    _checks.check_no_overlap("op", {"out": buf[:50]}, {"x": buf[50:], "y": None})
    with raises_arg(ValueError, "op", "out", "overlaps no other argument", "overlapping x"):
        _checks.check_no_overlap("op", {"out": buf[:51]}, {"x": buf[50:]})
    with raises_arg(ValueError, "op", "a", "overlapping b"):
        _checks.check_no_overlap("op", {"a": buf[::2], "b": buf[1::2]}, {})
    _checks.check_no_overlap("op", {"out": buf[:0]}, {"x": buf})     # empty arrays never overlap


def test_positive():
    _checks.positive("op", "theta", 1.0)
    _checks.positive("op", "eps", 0.0, strict=False)
    with raises_arg(ValueError, "op", "theta", "> 0", "0"):
        _checks.positive("op", "theta", 0)
    with raises_arg(ValueError, "op", "eps", ">= 0", "-1e-06"):
        _checks.positive("op", "eps", -1e-6, strict=False)
    with raises_arg(ValueError, "op", "eps", "nan"):
        _checks.positive("op", "eps", float("nan"), strict=False)


def test_first_bad_index():
    assert _checks.first_bad_index(np.array([False, False])) == -1
    assert _checks.first_bad_index(np.array([False, True, True])) == 1


def test_check_index_contents(xp):
    a = xp.asarray(np.array([[0, 3], [-1, 5]], np.int32))
    _checks.check_index_contents("op", "lanes", a, 0, 6, allow=(-1,))
    with raises_arg(ValueError, "op", "lanes[1, 0]", "in [0, 6)", "got -1"):
        _checks.check_index_contents("op", "lanes", a, 0, 6)
    with raises_arg(ValueError, "op", "pos[1, 1]", "in [0, 5) or -1", "got 5"):
        _checks.check_index_contents("op", "pos", a, 0, 5, allow=(-1,))
    with raises_arg(ValueError, "op", "pos[0, 1]", "a valid slot", "got 3"):
        _checks.check_index_contents("op", "pos", a, 0, 3, allow=(-1,), what="a valid slot")
    _checks.check_index_contents("op", "pos", a[:0], 0, 1)
