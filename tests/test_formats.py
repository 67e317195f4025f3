"""cukv.formats: format strings, row sizes (SPEC §2.1) and qparam words (SPEC §2.3, §2.5)."""
from __future__ import annotations

import re

import numpy as np
import pytest

import cukv
from cukv import formats

# SPEC §2.1 table, D = 128, plus D = 64 / 256
ROW_BYTES = [
    ("bf16", 128, False, 128), ("fp8", 128, False, 132), ("fp8", 128, True, 128),
    ("fp8_head", 128, False, 128), ("int4", 128, False, 68), ("int4:g1", 128, False, 68),
    ("int4:g2", 128, False, 72), ("int4:g4", 128, False, 80), ("int4:g8", 128, False, 96),
    ("fp8", 64, False, 68), ("int4:g8", 64, False, 64), ("fp8", 256, False, 260), ("int4:g4", 256, False, 144),
    ("fp8", 8, False, 12), ("int4:g4", 8, False, 20),
]


@pytest.mark.parametrize("fmt,D,ext,R", ROW_BYTES)
def test_row_bytes_table(fmt, D, ext, R):
    assert cukv.row_bytes(fmt, D, ext) == R
    assert formats.head_dim_from_row(fmt, R, ext) == D
    assert formats.as_format(fmt).row_bytes(D, ext) == R


def test_ambiguous_row_sizes_need_fmt():
    """68 bytes is fp8 with D=64 and int4:g1 with D=128 (SPEC §2.1)."""
    assert cukv.row_bytes("fp8", 64) == cukv.row_bytes("int4", 128) == 68


@pytest.mark.parametrize("fmt,want", [("bf16", ("bf16", 0)), ("fp8", ("fp8", 0)), ("fp8_head", ("fp8_head", 0)),
                                      ("int4", ("int4", 1)), ("int4:g1", ("int4", 1)), ("int4:g2", ("int4", 2)),
                                      ("int4:g4", ("int4", 4)), ("int4:g8", ("int4", 8))])
def test_parse_format(fmt, want):
    assert cukv.parse_format(fmt) == want
    assert fmt in cukv.FORMATS


@pytest.mark.parametrize("bad", ["INT4", "fp8 ", " fp8", "int4:g16", "int4:g3", "int4:G2", "int8", "", "e4m3"])
def test_parse_format_errors(bad):
    with pytest.raises(ValueError, match=r"^parse_format: fmt: expected one of bf16, fp8, .*got " + repr(bad).replace("\\", "\\\\")):
        cukv.parse_format(bad)


def test_parse_format_type_and_op_name():
    with pytest.raises(TypeError, match="^parse_format: fmt: expected a format string"):
        cukv.parse_format(4)
    with pytest.raises(ValueError, match="^quantize: fmt: "):
        formats.parse_format("int5", "quantize")


@pytest.mark.parametrize("fmt,D,msg", [("fp8", 12, "D % 8 == 0"), ("fp8", 0, "D > 0"), ("bf16", -8, "D > 0"),
                                       ("int4:g8", 8, "D % 16 == 0"), ("int4:g8", 24, "D % 16 == 0 for 'int4:g8', got D=24")])
def test_row_bytes_bad_head_dim(fmt, D, msg):
    with pytest.raises(ValueError, match=r"^row_bytes: D: expected .*" + re.escape(msg)):
        cukv.row_bytes(fmt, D)


@pytest.mark.parametrize("fmt", ["bf16", "fp8_head", "int4", "int4:g2"])
def test_external_qparams_only_fp8(fmt):
    with pytest.raises(ValueError, match="^row_bytes: external_qparams: expected False"):
        cukv.row_bytes(fmt, 128, True)


def test_pack_qparams_layout():
    """bits 0-15 scale, bits 16-31 shift, both fp16: the same 4 little-endian bytes as the row prefix."""
    scale = np.array([1.0, 2.0 ** -14, 65504.0, np.nan], np.float16)
    shift = np.array([-2.5, 0.0, -0.0, np.inf], np.float16)
    w = cukv.pack_qparams(scale, shift)
    assert w.dtype == np.int32 and w.shape == (4,)
    u = w.view(np.uint32)
    assert (u & 0xFFFF).astype(np.uint16).tolist() == scale.view(np.uint16).tolist()
    assert (u >> 16).astype(np.uint16).tolist() == shift.view(np.uint16).tolist()
    assert w.astype("<i4").view(np.uint8).reshape(4, 4)[0].tolist() == [0x00, 0x3C, 0x00, 0xC1]
    s, z = cukv.unpack_qparams(w)
    assert s.dtype == z.dtype == np.float16
    assert s.view(np.uint16).tolist() == scale.view(np.uint16).tolist()
    assert z.view(np.uint16).tolist() == shift.view(np.uint16).tolist()


def test_pack_qparams_rounds_float32_to_fp16(rng):
    s = rng.standard_normal(100).astype(np.float32)
    z = rng.standard_normal(100).astype(np.float32)
    a, b = cukv.unpack_qparams(cukv.pack_qparams(s, z))
    assert (a == s.astype(np.float16)).all() and (b == z.astype(np.float16)).all()


def test_pack_qparams_cupy(gpu, rng):
    s = rng.standard_normal((3, 5)).astype(np.float16)
    z = rng.standard_normal((3, 5)).astype(np.float16)
    w = cukv.pack_qparams(gpu.asarray(s), gpu.asarray(z))
    assert isinstance(w, gpu.ndarray)
    assert (w.get() == cukv.pack_qparams(s, z)).all()


def test_nan_word_matches_spec():
    """SPEC §11.4: a non-finite fp8 row has the qparam word 0x7E007E00 (fp16 NaN scale and shift)."""
    from cukv.ref import codec  # noqa: PLC0415

    s, z = cukv.unpack_qparams(np.array([codec.NAN_WORD], np.int32))
    assert np.isnan(s[0]) and np.isnan(z[0])
