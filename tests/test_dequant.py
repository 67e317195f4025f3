"""cukv.dequantize_cache and the FBGEMM dequantizers (cukv/dequant.py, cukv/fbgemm.py).

The expected output is built independently of ``cukv.ref.dequant``: the logical rows are quantized
with the row codec and dequantized row by row with ``cukv.dequantize`` (the reference codec), then
padded with zeros. Rows past ``seqlens`` (and unused pages) hold random garbage bytes, and block-table
entries past a lane's last used page are -1, so a kernel that reads them fails. The path is bit-exact
(SPEC §11.1, 0 budget): comparisons are by bytes.
"""
from __future__ import annotations

import numpy as np
import pytest

import cukv
from cukv import fbgemm
from cukv.ref import codec as rcodec
from helpers import (BF16, activations, assert_bytes_equal, misaligned_copy, poison, raises_arg,
                     to_device, to_host)

F32 = np.float32
FORMATS = ["fp8", "fp8:ext", "fp8_head", "int4:g1", "int4:g2", "int4:g4", "int4:g8", "bf16"]
OP = "dequantize_cache"


class Case:
    """A random K/V cache pair with ragged lengths, contiguous or paged, plus the expected output."""

    def __init__(self, rng, fmt, D, *, paged, B=4, n_kv=2, S=16, max_pages=5, seqlens=None):
        self.fmt = "fp8" if fmt == "fp8:ext" else fmt
        self.external = fmt == "fp8:ext"
        kind = self.fmt.split(":")[0]
        self.D, self.B, self.n_kv, self.S = D, B, n_kv, S
        cap = max_pages * S
        self.capacity = cap
        # 0 rows, 1 row, the whole capacity, a last page partly filled (2 pages + 5 rows)
        base = [0, 1, cap, 2 * S + 5]
        self.seqlens = np.array(seqlens if seqlens is not None else (base * B)[:B], np.int32)
        self.qk = self.qv = None
        rows, words, scales = [], [], []
        for _ in range(2):
            xx = activations(rng, (B, cap, n_kv, D))
            if kind == "fp8_head":
                s = (np.abs(xx.astype(F32)).max(axis=(1, 3)) / F32(448)).astype(F32) * F32(1.5)
                r = cukv.quantize(xx, "fp8_head", scale=s[:, None, :])
                scales.append(s)
            elif self.external:
                r, w = cukv.quantize(xx, "fp8", external_qparams=True)
                words.append(w)
            else:
                r = cukv.quantize(xx, self.fmt)
            rows.append(r)
        # expected logical output, zero padded
        self.want = []
        for j in range(2):
            kw = {}
            if kind == "fp8_head":
                kw["scale"] = np.broadcast_to(scales[j][:, None, :], (B, cap, n_kv))
            elif self.external:
                kw["qparams"] = words[j]
            deq = cukv.dequantize(rows[j], self.fmt, **kw)
            t = np.arange(cap)[None, :, None, None]
            self.want.append(np.where(t < self.seqlens[:, None, None, None], deq, np.zeros((), BF16)))
        # garbage past the lengths: kernels must not read it
        R = rows[0].shape[-1]
        for j in range(2):
            for b in range(B):
                n = int(self.seqlens[b])
                g = rng.integers(0, 256, (cap - n, n_kv, R * rows[j].itemsize), dtype=np.uint8)
                rows[j][b, n:] = g.view(rows[j].dtype).reshape(cap - n, n_kv, R)
                if self.external:
                    words[j][b, n:] = rng.integers(-2**31, 2**31, (cap - n, n_kv), dtype=np.int64)
        self.block_tables = None
        if paged:
            P = B * max_pages + 3
            perm = rng.permutation(P)[:B * max_pages].astype(np.int32).reshape(B, max_pages)
            bt = np.full((B, max_pages), -1, np.int32)
            phys = [rng.integers(0, 256, (1, P * S, n_kv, R * rows[0].itemsize), dtype=np.uint8)
                    .view(rows[0].dtype).reshape(1, P * S, n_kv, R) for _ in range(2)]
            pw = [rng.integers(-2**31, 2**31, (1, P * S, n_kv), dtype=np.int64).astype(np.int32)
                  for _ in range(2)]
            for b in range(B):
                used = -(-int(self.seqlens[b]) // S)
                bt[b, :used] = perm[b, :used]
                for p in range(used):
                    dst = slice(perm[b, p] * S, (perm[b, p] + 1) * S)
                    for j in range(2):
                        phys[j][0, dst] = rows[j][b, p * S:(p + 1) * S]
                        if self.external:
                            pw[j][0, dst] = words[j][b, p * S:(p + 1) * S]
            rows = phys
            if self.external:
                words = pw
            self.block_tables = bt
        self.k, self.v = rows
        if kind == "fp8_head":
            self.qk, self.qv = scales
        elif self.external:
            self.qk, self.qv = words

    def args(self, xp, seqlens=None, block_tables=None):
        d = lambda a: None if a is None else to_device(xp, a)  # noqa: E731
        kw = {"qparam_k": d(self.qk), "qparam_v": d(self.qv), "page_size": self.S}
        bt = self.block_tables if block_tables is None else block_tables
        if bt is not None:
            kw["block_tables"] = d(bt)
        sl = self.seqlens if seqlens is None else seqlens
        return (d(self.k), d(self.v), d(np.asarray(sl, np.int32)), self.fmt), kw


def _run(xp, case, **kw):
    a, k = case.args(xp)
    k.update(kw)
    return cukv.dequantize_cache(*a, **k)


def _assert_padding_zero(out, seqlens, max_len):
    """Rows t >= seqlens[b] are +0.0 (bits 0) and there is no NaN anywhere."""
    h = to_host(out)
    bits = h.view(np.uint16)
    t = np.arange(max_len)[None, :, None, None]
    pad = np.broadcast_to(t >= np.asarray(seqlens)[:, None, None, None], bits.shape)
    assert (bits[pad] == 0).all(), "padding is not exactly +0.0"
    assert not np.isnan(h.astype(np.float32)).any(), "NaN in the output"


# ------------------------------------------------------------------------------ numpy + cupy grid
@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_rowwise_dequantize(xp, rng, fmt, D, paged):
    """Every format x D x layout, ragged lengths (0, 1, capacity, partial last page): bytes equal the
    row codec's dequantize; padding exactly +0; poisoned (NaN) ``out`` buffers fully overwritten."""
    case = Case(rng, fmt, D, paged=paged)
    got = _run(xp, case)
    for j in range(2):
        assert_bytes_equal(got[j], case.want[j], what=f"{'kv'[j]} {fmt} D={D} paged={paged}")
        _assert_padding_zero(got[j], case.seqlens, case.capacity)
    shape = (case.B, case.capacity, case.n_kv, D)
    out = (poison(xp.empty(shape, BF16), "nan"), poison(xp.empty(shape, BF16), "nan"))
    res = _run(xp, case, out=out)
    assert res[0] is out[0] and res[1] is out[1]
    for j in range(2):
        assert_bytes_equal(out[j], case.want[j], what=f"out= {'kv'[j]}")
        _assert_padding_zero(out[j], case.seqlens, case.capacity)


@pytest.mark.parametrize("max_len", [0, 1, 20, 200])
def test_max_len(xp, rng, max_len):
    """Shorter output (lengths must fit), longer output (rows past the capacity are zero)."""
    case = Case(rng, "int4:g4", 64, paged=True, seqlens=np.minimum([0, 1, 80, 17], max_len))
    got = _run(xp, case, max_len=max_len)
    for j in range(2):
        want = np.zeros((case.B, max_len, case.n_kv, 64), BF16)
        n = min(max_len, case.capacity)
        want[:, :n] = case.want[j][:, :n]
        assert_bytes_equal(got[j], want)
        _assert_padding_zero(got[j], case.seqlens, max_len)


def test_paged_equals_contiguous(xp, rng):
    """Paged and contiguous caches with the same logical rows give byte-equal outputs (SPEC §11.1)."""
    for fmt in ("fp8", "fp8_head", "int4:g2"):
        c = Case(np.random.default_rng(7), fmt, 128, paged=False)
        p = Case(np.random.default_rng(7), fmt, 128, paged=True)
        a, b = _run(xp, c), _run(xp, p)
        for j in range(2):
            assert_bytes_equal(a[j], b[j])


def test_empty(xp, rng):
    case = Case(rng, "fp8", 64, paged=False, B=2, seqlens=[0, 0])
    for j, o in enumerate(_run(xp, case)):
        assert_bytes_equal(o, np.zeros((2, case.capacity, 2, 64), BF16))
    k = to_device(xp, np.zeros((0, 8, 2, 68), np.uint8))
    got = cukv.dequantize_cache(k, k.copy(), to_device(xp, np.zeros(0, np.int32)), "fp8")
    assert got[0].shape == (0, 8, 2, 64) and got[1].shape == (0, 8, 2, 64)


def test_shared_pages(xp, rng):
    """Two lanes reading the same physical pages (prefix sharing) both see the rows."""
    case = Case(rng, "fp8", 64, paged=True, seqlens=[40, 40, 0, 1])
    bt = case.block_tables.copy()
    bt[1] = bt[0]
    a, kw = case.args(xp, block_tables=bt)
    got = cukv.dequantize_cache(*a, **kw)
    for j in range(2):
        h = to_host(got[j])
        assert_bytes_equal(h[1], h[0])
        assert_bytes_equal(h[0], case.want[j][0])


def test_nonfinite_confined(xp, rng):
    """A NaN code / qparam gives NaN in its row (fp8) or group (int4) only; padding stays +0."""
    case = Case(rng, "int4:g4", 64, paged=False, seqlens=[3, 5, 0, 2])
    case.k[1, 2, 0, 8:12] = 0xFF           # group 2's word: scale/shift NaN
    case.k[1, 2, 0, 10:12] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    case.k[1, 2, 0, 8:10] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    got = to_host(_run(xp, case)[0]).astype(np.float32)
    assert np.isnan(got[1, 2, 0, 32:48]).all()
    nan = np.isnan(got)
    nan[1, 2, 0, 32:48] = False
    assert not nan.any()
    _assert_padding_zero(_run(xp, case)[1], case.seqlens, case.capacity)


# ------------------------------------------------------------------------------ validate=False guards
def test_unvalidated_clamps_and_guards(xp, rng):
    """Lengths are clamped to [0, capacity]; a row behind an out-of-range page id reads as zeros."""
    case = Case(rng, "fp8_head", 64, paged=True, seqlens=[80, 1, 80, 37])
    bt = case.block_tables.copy()
    bt[0, 1] = 10 ** 6
    bt[2, 3] = -5
    sl = np.array([10 ** 6, -3, 80, 37], np.int32)
    a, kw = case.args(xp, seqlens=sl, block_tables=bt)
    got = cukv.dequantize_cache(*a, validate=False, **kw)
    for j in range(2):
        want = case.want[j].copy()
        want[0, 16:32] = 0
        want[1] = 0
        want[2, 48:64] = 0
        assert_bytes_equal(got[j], want)
    with raises_arg(ValueError, OP, "seqlens[0]", "[0, 80]", "1000000"):
        cukv.dequantize_cache(*a, **kw)
    a, kw = case.args(xp, block_tables=bt)
    with raises_arg(ValueError, OP, "block_tables[0, 1]", "[0, 23)", "1000000"):
        cukv.dequantize_cache(*a, **kw)


def test_unused_table_entries_not_checked(xp, rng):
    """Entries past a lane's last used page may hold anything (the Case puts -1 there)."""
    case = Case(rng, "int4:g1", 64, paged=True)
    assert (case.block_tables == -1).any()
    _run(xp, case)   # validate=True accepts


# ------------------------------------------------------------------------------ kernels only
@pytest.mark.parametrize("fmt", ["fp8", "fp8_head", "int4:g1", "int4:g8", "bf16"])
def test_kernel_arbitrary_bytes(gpu, rng, fmt):
    """Every byte pattern (all 256 e4m3 codes incl. NaN and subnormals, random fp16 qparam words incl.
    NaN/Inf/subnormal) decodes exactly like the row codec reference."""
    D, B, T, H = 128, 2, 64, 2
    R = cukv.row_bytes(fmt, D)
    nbytes = B * T * H * R * (2 if fmt == "bf16" else 1)
    raw = rng.integers(0, 256, nbytes, dtype=np.uint8)
    if fmt in ("fp8", "fp8_head"):
        raw = raw.reshape(B * T * H, R)
        raw[:, R - D:] = np.arange(B * T * H * D, dtype=np.int64).reshape(-1, D) % 256
    cache = raw.reshape(-1).view(BF16 if fmt == "bf16" else np.uint8).reshape(B, T, H, R)
    kw = {}
    if fmt == "fp8_head":
        kw = {"qparam_k": rng.uniform(1e-4, 30, (B, H)).astype(F32)}
        kw["qparam_v"] = kw["qparam_k"]
        want = cukv.dequantize(cache, fmt, scale=np.broadcast_to(kw["qparam_k"][:, None, :], (B, T, H)))
    else:
        want = cukv.dequantize(cache, fmt)
    sl = np.array([T, T - 5], np.int32)
    want = want.copy()
    want[1, T - 5:] = 0
    got = cukv.dequantize_cache(gpu.asarray(cache), gpu.asarray(cache), gpu.asarray(sl), fmt,
                                **{k: gpu.asarray(v) for k, v in kw.items()})
    assert_bytes_equal(got[0], want)
    assert_bytes_equal(got[1], want)


@pytest.mark.parametrize("iters", [1, 3, 8])
def test_kernel_rows_per_thread(gpu, rng, iters, monkeypatch):
    """Every rows-per-thread setting (the bench sweeps it) writes the same bytes."""
    from cukv import dequant

    monkeypatch.setattr(dequant, "ITERS", iters)
    for fmt, paged in (("fp8", True), ("int4:g4", False)):
        case = Case(rng, fmt, 64, paged=paged, n_kv=3)
        got = _run(gpu, case)
        for j in range(2):
            assert_bytes_equal(got[j], case.want[j])


@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
@pytest.mark.parametrize("fmt,D", [("int4:g2", 24), ("int4:g4", 40), ("int4:g8", 16), ("fp8", 24)])
def test_groups_split_chunks_and_odd_pages(xp, rng, fmt, D, paged):
    """int4 groups that are not a multiple of 8 elements (the kernel's general row path), small D and
    a page size that is not a power of two (a division instead of a shift)."""
    case = Case(rng, fmt, D, paged=paged, n_kv=3, S=12, max_pages=4)
    got = _run(xp, case)
    for j in range(2):
        assert_bytes_equal(got[j], case.want[j], what=f"{'kv'[j]} {fmt} D={D} paged={paged}")


def test_kernel_scalar_paths(gpu, rng):
    """Misaligned caches and outputs take the scalar (non-vector) path, same bytes."""
    for fmt in ("fp8", "int4:g2", "fp8_head", "bf16"):
        case = Case(rng, fmt, 64, paged=False)
        a, kw = case.args(gpu)
        k = misaligned_copy(gpu, case.k, 2)
        v = misaligned_copy(gpu, case.v, 2)
        shape = (case.B, case.capacity, case.n_kv, 64)
        out = tuple(misaligned_copy(gpu, np.full(shape, np.nan, BF16), 2) for _ in range(2))
        cukv.dequantize_cache(k, v, a[2], a[3], out=out, **kw)
        for j in range(2):
            assert_bytes_equal(out[j], case.want[j], what=f"scalar path {fmt}")


def test_kernel_strided_cache(gpu, rng):
    """Read-only caches may be strided views (they behave as ascontiguousarray)."""
    case = Case(rng, "fp8", 128, paged=False)
    big = np.zeros((case.B, case.capacity, case.n_kv + 1, case.k.shape[-1]), np.uint8)
    bigv = big.copy()
    big[:, :, :2], bigv[:, :, :2] = case.k, case.v
    a, kw = case.args(gpu)
    got = cukv.dequantize_cache(gpu.asarray(big)[:, :, :2], gpu.asarray(bigv)[:, :, :2], a[2], "fp8")
    for j in range(2):
        assert_bytes_equal(got[j], case.want[j])


def test_kernel_large_lane_count(gpu, rng):
    """Many lanes with random lengths (0..capacity) and one KV head."""
    B = 300
    sl = rng.integers(0, 9, B).astype(np.int32)
    case = Case(rng, "int4:g8", 64, paged=False, B=B, max_pages=1, S=8, seqlens=sl, n_kv=1)
    got = _run(gpu, case)
    for j in range(2):
        assert_bytes_equal(got[j], case.want[j])


# ------------------------------------------------------------------------------ FBGEMM layer
@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
@pytest.mark.parametrize("fmt", ["fp8", "fp8:ext", "fp8_head", "int4:g1", "int4:g4"])
def test_fbgemm_dequantizers(xp, rng, fmt, paged):
    """SPEC §10.2: output in the cache's own layout; contiguous lanes past len(kv_seqlen) are zero;
    paged output is physical, a row holds data iff a (b, t < len) maps to it."""
    case = Case(rng, fmt, 128, paged=paged)
    n = 3                                   # kv_seqlen shorter than the lanes
    sl = to_device(xp, case.seqlens[:n])
    d = lambda a: None if a is None else to_device(xp, a)  # noqa: E731
    k, v = d(case.k), d(case.v)
    kw = {"block_tables": d(case.block_tables), "page_size": case.S}
    if case.fmt == "fp8" or case.fmt == "fp8_head":
        got = fbgemm.dequantize_fp8_cache(k, v, sl, d(case.qk), d(case.qv), **kw)
    else:
        G = cukv.parse_format(case.fmt)[1]
        got = fbgemm.dequantize_int4_cache(k, v, sl, G, **kw)
    for j in range(2):
        want = case.want[j].copy()
        want[n:] = 0
        if paged:
            phys = np.zeros(case.k.shape[:3] + (128,), BF16)
            for b in range(n):
                for t in range(int(case.seqlens[b])):
                    p = case.block_tables[b, t // case.S] * case.S + t % case.S
                    phys[0, p] = want[b, t]
            want = phys
        assert got[j].shape == want.shape
        assert_bytes_equal(got[j], want, what=f"fbgemm {fmt} paged={paged}")


def test_fbgemm_bad_input(xp, rng):
    case = Case(rng, "int4:g2", 64, paged=False)
    k, v, sl = to_device(xp, case.k), to_device(xp, case.v), to_device(xp, case.seqlens)
    with raises_arg(ValueError, "dequantize_int4_cache", "qparam_k", "None"):
        fbgemm.dequantize_int4_cache(k, v, sl, 2, to_device(xp, np.zeros((4, 80, 2), np.int32)))
    with raises_arg(ValueError, "dequantize_int4_cache", "num_groups", "1, 2, 4 or 8"):
        fbgemm.dequantize_int4_cache(k, v, sl, 16)
    with raises_arg(ValueError, "dequantize_int4_cache", "kv_seqlen", "n <= 4"):
        fbgemm.dequantize_int4_cache(k, v, to_device(xp, np.zeros(5, np.int32)), 2)
    with raises_arg(TypeError, "dequantize_fp8_cache", "qparam_k"):
        fbgemm.dequantize_fp8_cache(k, v, sl, to_device(xp, np.zeros((4, 80, 2), np.int64)))


# ------------------------------------------------------------------------------ bad input
def test_bad_input(xp, rng):
    case = Case(rng, "fp8", 64, paged=True)
    (k, v, sl, fmt), kw = case.args(xp)
    with raises_arg(ValueError, OP, "fmt", "expected one of"):
        cukv.dequantize_cache(k, v, sl, "fp9", **kw)
    with raises_arg(TypeError, OP, "cache_k", "bfloat16"):
        cukv.dequantize_cache(k, v, sl, "bf16", **kw)
    with raises_arg(ValueError, OP, "fmt", "uint8 cache"):
        cukv.dequantize_cache(k, v, sl, None, **kw)
    with raises_arg(ValueError, OP, "cache_k", "int4:g8"):
        cukv.dequantize_cache(k[..., :60], v[..., :60], sl, "int4:g8", **kw)
    with raises_arg(ValueError, OP, "cache_v", "shape of cache_k"):
        cukv.dequantize_cache(k, v[:, :16], sl, fmt, **kw)
    with raises_arg(TypeError, OP, "seqlens", "int32"):
        cukv.dequantize_cache(k, v, sl.astype(np.int64), fmt, **kw)
    with raises_arg(ValueError, OP, "seqlens", "[B=4]"):
        cukv.dequantize_cache(k, v, sl[:3], fmt, **kw)
    with raises_arg(ValueError, OP, "page_size", ">= 1"):
        cukv.dequantize_cache(k, v, sl, fmt, block_tables=kw["block_tables"], page_size=0)
    with raises_arg(ValueError, OP, "cache_k", "multiple of page_size=48"):
        cukv.dequantize_cache(k, v, sl, fmt, block_tables=kw["block_tables"], page_size=48)
    with raises_arg(ValueError, OP, "max_len", ">= 0"):
        cukv.dequantize_cache(k, v, sl, fmt, max_len=-1, **kw)
    with raises_arg(ValueError, OP, "seqlens[2]", "[0, 40]"):
        cukv.dequantize_cache(k, v, sl, fmt, max_len=40, **kw)
    with raises_arg(ValueError, OP, "qparam_k", "None for fmt 'int4'"):
        cukv.dequantize_cache(k, v, sl, "int4", qparam_k=to_device(xp, np.ones((4, 2), F32)),
                              block_tables=kw["block_tables"], page_size=16)
    shape = (4, 80, 2, 64)
    o = xp.zeros(shape, BF16)
    with raises_arg(ValueError, OP, "out[1]", "bfloat16 [B=4, max_len=80"):
        cukv.dequantize_cache(k, v, sl, fmt, out=(o, xp.zeros((4, 79, 2, 64), BF16)), **kw)
    with raises_arg(ValueError, OP, "out[0]", "overlaps"):
        cukv.dequantize_cache(k, v, sl, fmt, out=(o, o), **kw)
    with raises_arg(ValueError, OP, "out[0]", "C-contiguous"):
        big = xp.zeros((4, 80, 2, 128), BF16)
        cukv.dequantize_cache(k, v, sl, fmt, out=(big[..., :64], o), **kw)
    hc = case.k.copy()
    cukv.dequantize_cache(k, v, sl, fmt, **kw)
    assert_bytes_equal(k, hc)                      # inputs untouched
    fp8h = Case(rng, "fp8_head", 64, paged=False)
    (k2, v2, sl2, _), kw2 = fp8h.args(xp)
    with raises_arg(ValueError, OP, "qparam_v", "float32 [B=4, N_KVH=2]"):
        cukv.dequantize_cache(k2, v2, sl2, "fp8_head", qparam_k=kw2["qparam_k"])


def test_module_mix(gpu, rng):
    case = Case(rng, "fp8", 64, paged=False)
    (k, v, sl, fmt), _ = case.args(gpu)
    with raises_arg(TypeError, OP, "seqlens", "numpy"):
        cukv.dequantize_cache(k, v, case.seqlens, fmt)
