"""cukv.decode_attention and cukv.fbgemm.mqa_attn / gqa_attn_splitk (SPEC §8.1, §10.4, §11.2).

GPU results are compared with the float64 reference over the dequantized cache
(:mod:`cukv.ref.attention_decode`) with the bounds of SPEC §11.2. Every row a kernel must not read
(positions at or past a length, unused pages, block-table entries past the attended pages) holds
NaN bytes, so a stray read shows up as a NaN output. Outputs are allocated from a memory pool that
was filled with NaN just before the call, so an unwritten element shows up too.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import cukv
from cukv import fbgemm
from cukv.ref import attention_decode as ref
from helpers import BF16, activations, misaligned_copy, raises_arg, strided_copy, to_device, to_host

FMTS = ("bf16", "fp8", "fp8_ext", "fp8_head", "int4:g1", "int4:g2", "int4:g4", "int4:g8")
DS = (64, 128, 256)
RATIOS = (1, 2, 4, 8, 16)
LENS = (0, 1, 7, 129, 4096)
SPLITS = (None, 1, 3, 16)
PAGE_SIZES = (16, 64, 7)


# ------------------------------------------------------------------------------------ data
def native_fmt(fmt):
    return "fp8" if fmt == "fp8_ext" else fmt


class Case:
    """Host (NumPy) inputs of one decode-attention call; ``args(xp)`` moves them to ``xp``."""

    def __init__(self, rng, fmt, D, ratio, lens, *, paged=False, page_size=16, n_kv=2, q_scale=1.0):
        self.fmt, self.D, self.paged, self.page_size = fmt, D, paged, page_size
        lens = np.asarray(lens, dtype=np.int32)
        B = len(lens)
        T = max(1, int(lens.max()))
        self.seqlens = lens
        self.q = activations(rng, (B, n_kv * ratio, D), outliers=False, scale=q_scale)
        kind = native_fmt(fmt)
        ext = fmt == "fp8_ext"
        R = cukv.row_bytes(kind, D, ext)
        dt = BF16 if fmt == "bf16" else np.uint8
        poison = np.array(np.nan, dtype=BF16) if fmt == "bf16" else np.uint8(0xFF)
        caches, words, scales = [], [], []
        for _ in range(2):
            rows = np.full((B, T, n_kv, R), poison, dtype=dt)
            w = np.full((B, T, n_kv), -1, dtype=np.int32)
            x = [activations(rng, (int(n), n_kv, D), outliers=False) for n in lens]
            s = np.array([[max(float(np.abs(xb[:, h].astype(np.float32)).max(initial=0.0)), 1e-3) / 400.0
                           for h in range(n_kv)] for xb in x], dtype=np.float32)
            for b, xb in enumerate(x):
                if not len(xb):
                    continue
                if fmt == "fp8_ext":
                    rows[b, :len(xb)], w[b, :len(xb)] = cukv.quantize(xb, "fp8", external_qparams=True)
                elif fmt == "fp8_head":
                    rows[b, :len(xb)] = cukv.quantize(xb, "fp8_head", scale=s[b][None, :])
                else:
                    rows[b, :len(xb)] = cukv.quantize(xb, fmt)
            caches.append(rows)
            words.append(w)
            scales.append(s)
        self.block_tables = None
        if paged:
            S = page_size
            per = -(-T // S)
            P = B * per + 3
            perm = rng.permutation(P)[:B * per].reshape(B, per).astype(np.int32)
            bt = np.full((B, per + 1), 10 ** 6, dtype=np.int32)        # entries past the length: junk
            bt[:, :per] = perm
            for b, n in enumerate(lens):                                # untouched entries: junk
                bt[b, -(-int(n) // S):per] = rng.integers(-5, 10 ** 6, per - (-(-int(n) // S)))
            phys = []
            pw = []
            for rows, w in zip(caches, words):
                c = np.full((1, P * S, n_kv, R), poison, dtype=dt)
                ww = np.full((1, P * S, n_kv), -1, dtype=np.int32)
                for b in range(B):
                    for j in range(-(-int(lens[b]) // S)):
                        lo, hi = j * S, min((j + 1) * S, T)
                        pid = int(bt[b, j])
                        c[0, pid * S:pid * S + hi - lo] = rows[b, lo:hi]
                        ww[0, pid * S:pid * S + hi - lo] = w[b, lo:hi]
                phys.append(c)
                pw.append(ww)
            caches, words = phys, pw
            self.block_tables = bt
        self.cache_k, self.cache_v = caches
        self.qparam_k = self.qparam_v = None
        if fmt == "fp8_ext":
            self.qparam_k, self.qparam_v = words
        elif fmt == "fp8_head":
            self.qparam_k, self.qparam_v = scales

    def kw(self, xp):
        d = lambda a: None if a is None else to_device(xp, a)   # noqa: E731
        kw = dict(fmt=native_fmt(self.fmt), qparam_k=d(self.qparam_k), qparam_v=d(self.qparam_v))
        if self.paged:
            kw.update(block_tables=d(self.block_tables), page_size=self.page_size)
        return kw

    def args(self, xp):
        return (to_device(xp, self.q), to_device(xp, self.cache_k), to_device(xp, self.cache_v),
                to_device(xp, self.seqlens))

    def ref_kw(self):
        kw = dict(fmt=native_fmt(self.fmt), qparam_k=self.qparam_k, qparam_v=self.qparam_v)
        if self.paged:
            kw.update(block_tables=self.block_tables, page_size=self.page_size)
        return kw

    def exact(self, q=None, seqlens=None, **extra):
        kw = {**self.ref_kw(), **extra}
        return ref.attention_f64(self.q if q is None else q, self.cache_k, self.cache_v,
                                 self.seqlens if seqlens is None else seqlens, **kw)


def dirty_pool(xp, *shapes):
    """Fill CuPy pool blocks of these float32 sizes with NaN and free them, so the op's outputs start
    as NaN (an element the op does not write stays NaN)."""
    if xp is np:
        return
    for shp in shapes:
        a = xp.empty(int(np.prod(shp)) + 64, dtype=np.float32)
        a.fill(np.nan)
        del a


def check_attention(out, lse, O64, lse64, what=""):
    """SPEC §11.2 bounds, plus zero output / -inf lse for empty lanes."""
    o = to_host(out).astype(np.float64)
    assert o.shape == O64.shape, what
    assert np.isfinite(o).all(), f"{what}: non-finite output (unwritten or stray read)"
    err = np.abs(o - O64)
    bound = 2e-2 + 6e-3 * np.abs(O64)
    assert (err <= bound).all(), f"{what}: max excess {np.max(err - bound):.3g} at {np.unravel_index(np.argmax(err - bound), err.shape)}"
    assert np.linalg.norm(o - O64) <= 2 ** -7 * np.linalg.norm(O64) + 1e-12, what
    if lse is not None:
        lh = to_host(lse).astype(np.float64)
        inf = np.isinf(lse64)
        assert (np.isinf(lh) == inf).all() and (lh[inf] < 0).all(), f"{what}: lse -inf mismatch"
        fin = ~inf
        assert (np.abs(lh[fin] - lse64[fin]) <= 2e-3 * np.maximum(1.0, np.abs(lse64[fin]))).all(), what
    empty = np.isinf(lse64)
    assert (o[empty] == 0).all(), f"{what}: empty lane not zero"


# ------------------------------------------------------------------------------------ the grid
def grid_cases():
    """Covers every value of every axis (format, D, GQA ratio, layout, splits; every case holds all
    five lengths), sampling the cross product."""
    out = []
    for i in range(24):
        out.append((FMTS[i % 8], DS[(i + i // 8) % 3], RATIOS[i % 5], bool((i + i // 8) % 2),
                    SPLITS[(i // 2) % 4], PAGE_SIZES[i % 3]))
    return out


@pytest.mark.parametrize("fmt,D,ratio,paged,splits,page_size", grid_cases(),
                         ids=lambda v: str(v))
def test_grid_vs_float64(gpu, rng, fmt, D, ratio, paged, splits, page_size):
    c = Case(rng, fmt, D, ratio, LENS, paged=paged, page_size=page_size)
    q, ck, cv, sl = c.args(gpu)
    dirty_pool(gpu, c.q.shape, c.q.shape[:2])
    out, lse = cukv.decode_attention(q, ck, cv, sl, num_splits=splits, return_lse=True, **c.kw(gpu))
    assert out.dtype == BF16 and lse.dtype == np.float32
    O64, lse64 = c.exact()
    check_attention(out, lse, O64, lse64, f"{fmt} D={D} r={ratio} paged={paged} splits={splits}")


@pytest.mark.parametrize("fmt,D,paged", [("fp8", 128, False), ("fp8", 64, True), ("int4:g1", 128, True),
                                         ("int4:g2", 64, False), ("fp8_ext", 256, False)])
def test_unaligned_rows_fast_copy(gpu, rng, fmt, D, paged):
    """Four KV heads of 4-byte-aligned rows: every row of a head sits at the same address mod 16,
    so the kernel copies whole 16-byte blocks plus 4-byte edges (heads at offsets 0, 4, 8, 12)."""
    c = Case(rng, fmt, D, 2, (1, 129, 700), paged=paged, page_size=16, n_kv=4)
    out, lse = cukv.decode_attention(*c.args(gpu), return_lse=True, **c.kw(gpu))
    O64, lse64 = c.exact()
    check_attention(out, lse, O64, lse64, f"{fmt} D={D} paged={paged}")


@pytest.mark.parametrize("fmt,D,n_kv,r", [
    ("bf16", 128, 8, 4), ("fp8", 128, 8, 4), ("int4:g4", 128, 8, 4), ("fp8_head", 64, 4, 2), ("int4:g1", 64, 2, 1),
    ("bf16", 256, 2, 3), ("fp8", 256, 1, 4), ("int4:g8", 256, 4, 2),
])
def test_half_tile_matches_full_tile(gpu, rng, fmt, D, n_kv, r):
    """With <= 4 query heads a KV head the kernel runs the HALF head tile (both d halves of the heads in
    one n-tile, permuted score rows); it must meet the float64 bounds and agree with the full 8-head
    tile for split (1, 3) and automatic (stream / records) schedules."""
    import cupy as cp  # noqa: PLC0415

    from cukv import attention_decode as ad  # noqa: PLC0415

    c = Case(rng, fmt, D, r, (0, 1, 17, 700, 2053), n_kv=n_kv)
    O64, lse64 = c.exact()
    try:
        for S in (1, 3, None):
            res = []
            for half in (True, False):
                ad._TUNE["half"] = half
                dirty_pool(gpu, c.q.shape, c.q.shape[:2])
                res.append(cukv.decode_attention(*c.args(gpu), return_lse=True, num_splits=S, **c.kw(gpu)))
                check_attention(*res[-1], O64, lse64, f"{fmt} D={D} n_kv={n_kv} r={r} S={S} half={half}")
            (o1, l1), (o2, l2) = res
            d = cp.abs(o1.astype(cp.float32) - o2.astype(cp.float32))
            assert float(d.max()) <= 2e-2, (fmt, S, float(d.max()))
            assert float(cp.nanmax(cp.abs(l1 - l2)[cp.isfinite(l2)])) <= 1e-3, (fmt, S)
            assert cp.array_equal(cp.isfinite(l1), cp.isfinite(l2)), (fmt, S)
    finally:
        ad._TUNE.pop("half", None)


@pytest.mark.parametrize("fmt,D,n_kv,kpack", [
    ("fp8", 128, 8, 1), ("fp8", 64, 4, 1), ("fp8_head", 128, 2, 1), ("int4:g4", 128, 8, 1), ("int4:g1", 64, 4, 1),
    ("int4:g8", 256, 1, 1),
    ("fp8", 128, 1, 4), ("fp8", 128, 2, 2), ("fp8", 64, 2, 2), ("fp8", 256, 1, 4), ("int4:g1", 128, 1, 4),
    ("int4:g2", 64, 1, 2),
])
def test_tensor_copy_matches_cp_async(gpu, rng, fmt, D, n_kv, kpack):
    """On sm_90 contiguous quantized caches are loaded with TMA boxes (rows at every 4-byte offset of
    their 16-byte line, boxes past the record end zero-filled, ragged last blocks); the cp.async copy
    must give the very same bytes for a given split count. Token records that are not 16-byte aligned
    (fp8 rows of D + 4 bytes with 1 or 2 KV heads; the capacity a multiple of ``kpack``) are read
    ``kpack`` records a box row, also with automatic splits. (Automatic splits over aligned records run
    the stream schedule with TMA: see test_stream_schedule.)"""
    import cupy as cp  # noqa: PLC0415

    from cukv import attention_decode as ad  # noqa: PLC0415

    if ad._device_info(cp)[3] < 90:
        pytest.skip("TMA copies need sm_90")
    packed = kpack > 1
    c = Case(rng, fmt, D, 4 if packed else 2 * n_kv, (0, 1, 17, 700, 2052 if packed else 2053), n_kv=n_kv)
    try:
        for S in (1, 3, None) if packed else (1, 3):
            res = []
            for tma in (True, False):
                ad._TUNE["tma"] = tma
                dirty_pool(gpu, c.q.shape, c.q.shape[:2])
                res.append(cukv.decode_attention(*c.args(gpu), return_lse=True, num_splits=S, **c.kw(gpu)))
                assert ad._LAST["kpack"] == (kpack if tma else 1), (ad._LAST, tma)
            (o1, l1), (o2, l2) = res
            assert (o1.view(cp.uint16) == o2.view(cp.uint16)).all(), (fmt, S)
            assert cp.array_equal(l1, l2, equal_nan=True), (fmt, S)
    finally:
        ad._TUNE.pop("tma", None)
    O64, lse64 = c.exact()
    check_attention(o1, l1, O64, lse64, f"{fmt} D={D} n_kv={n_kv} kpack={kpack} tma")


@pytest.mark.parametrize("fmt,D,n_kv,ratio,lens,occ,records", [
    ("fp8", 128, 8, 4, (0, 1, 17, 700, 0, 2053, 16, 0), None, True),
    ("fp8", 128, 8, 4, (0, 1, 17, 700, 0, 2053, 16, 0), None, False),
    ("fp8", 64, 4, 2, (2053, 0, 33, 4096, 5), 2, True),
    ("fp8", 64, 8, 16, (3000, 0, 45, 1), None, True),
    ("fp8_head", 128, 6, 3, (0, 0, 300, 1, 1500), None, True),
    ("fp8_head", 128, 2, 8, (0, 0, 300, 1, 1500), None, False),
    ("fp8_head", 64, 1, 32, (77, 0, 1000), 3, False),
    ("fp8_head", 128, 1, 8, (5, 300, 0, 1), None, False),
    ("fp8_head", 128, 2, 1, (0, 640, 2049), 3, False),
    ("int4:g4", 128, 8, 4, (0, 1, 17, 700, 0, 2053, 16, 0), None, True),
    ("int4:g8", 64, 4, 2, (2053, 0, 33, 4096, 5), 1, True),
    ("int4:g1", 256, 4, 8, (3000, 0, 45, 1), None, True),
    ("int4:g2", 128, 2, 8, (0, 0, 300, 1, 1500), None, False),
    ("int4:g4", 64, 1, 32, (77, 0, 1000), 3, False),
    ("int4:g4", 128, 8, 4, (5000,), None, True),      # one lane: the streams take its blocks in turn
    ("int4:g4", 128, 8, 4, (1,), None, True),
    ("fp8", 128, 8, 4, (40000,), None, True),
    ("fp8_head", 128, 8, 2, (2049,), 1, True),
    ("fp8", 64, 4, 2, (3001,), 2, False),
])
def test_stream_schedule(gpu, rng, fmt, D, n_kv, ratio, lens, occ, records):
    """Automatic splits over a contiguous fp8 or int4 cache (rows of at most 256 bytes) on sm_90 run a stream
    schedule: persistent position streams (one warp per KV head x head group) each take an
    equal share of all lanes' 16-key blocks across lane boundaries, and the merge combines a varying
    number of partials per lane. With 4-8 KV heads of at most 16 query heads a stream is one CTA
    sharing a ring of whole token records (``records``); otherwise (or with records turned off) each
    warp has its own ring. Ragged lanes, lanes of length 0 at either end and in the middle, more
    streams than blocks, two head groups (32 query heads per KV head), one item only, and CTA counts
    of 1-3 per SM (different stream boundaries) must all meet the float64 bounds, with every output
    written (poisoned pool) and deterministic bytes."""
    import cupy as cp  # noqa: PLC0415

    from cukv import attention_decode as ad  # noqa: PLC0415

    if ad._device_info(cp)[3] < 90:
        pytest.skip("the stream schedule needs TMA copies (sm_90)")
    c = Case(rng, fmt, D, ratio, lens, n_kv=n_kv)
    O64, lse64 = c.exact()
    try:
        if occ is not None:
            ad._TUNE["stream_occ"] = occ
        ad._TUNE["records"] = records
        ad._TUNE["stream_any"] = True   # (records are taken by themselves only with 8 KV heads)
        dirty_pool(gpu, (1 << 22,), c.q.shape, c.q.shape[:2])   # the partials too
        out, lse = cukv.decode_attention(*c.args(gpu), return_lse=True, **c.kw(gpu))
        assert ad._LAST["schedule"] == ("records" if records else "stream")
        again = cukv.decode_attention(*c.args(gpu), **c.kw(gpu))
    finally:
        ad._TUNE.pop("stream_occ", None)
        ad._TUNE.pop("records", None)
        ad._TUNE.pop("stream_any", None)
    check_attention(out, lse, O64, lse64, f"{ad._LAST['schedule']} {fmt} D={D} r={ratio} occ={occ}")
    assert (to_host(again).view(np.uint16) == to_host(out).view(np.uint16)).all(), "not deterministic"
    ref1, _ = cukv.decode_attention(*c.args(gpu), return_lse=True, num_splits=1, **c.kw(gpu))
    assert ad._LAST["schedule"] == "split"
    assert np.abs(to_host(out).astype(np.float64) - to_host(ref1).astype(np.float64)).max() <= 2e-2


@pytest.mark.parametrize("D,ratio,lens", [
    (128, 4, (0, 1, 17, 700, 0, 2053, 16, 0)), (128, 4, (5000,)), (64, 4, (33, 0, 4096, 5)),
    (256, 2, (3000, 0, 45, 1)), (128, 1, (700, 2053)), (128, 8, (17, 1500)), (64, 16, (1, 0, 999)),
])
def test_swizzled_records_match_padded(gpu, rng, D, ratio, lens):
    """int4:g4 with 8 KV heads: token records are whole 128-byte lines, so the records ring loads them
    as 128-byte-swizzled lines (contiguous, unpadded, every shared read through the swizzle XOR). The
    result must meet the float64 bounds and equal, bit for bit, the padded records ring (the same
    arithmetic on the same values), also for a single lane (streams taking its blocks in turn), the
    full head tile (r 8, 16) and D 64 / 256."""
    import cupy as cp  # noqa: PLC0415

    from cukv import attention_decode as ad  # noqa: PLC0415

    if ad._device_info(cp)[3] < 90:
        pytest.skip("the records ring needs TMA copies (sm_90)")
    c = Case(rng, "int4:g4", D, ratio, lens, n_kv=8)
    O64, lse64 = c.exact()
    res = []
    try:
        ad._TUNE["stream_any"] = True
        for sw in (True, False):
            ad._TUNE["swizzle"] = sw
            dirty_pool(gpu, (1 << 22,), c.q.shape, c.q.shape[:2])
            res.append(cukv.decode_attention(*c.args(gpu), return_lse=True, **c.kw(gpu)))
            assert ad._LAST["schedule"] == "records" and ad._LAST["swizzle"] == sw
            check_attention(*res[-1], O64, lse64, f"records D={D} r={ratio} swizzle={sw}")
    finally:
        ad._TUNE.pop("stream_any", None)
        ad._TUNE.pop("swizzle", None)
    (o1, l1), (o2, l2) = res
    assert (to_host(o1).view(np.uint16) == to_host(o2).view(np.uint16)).all()
    assert (to_host(l1).view(np.uint32) == to_host(l2).view(np.uint32)).all()


@pytest.mark.parametrize("fmt", ["bf16", "int4:g8"])
def test_more_than_16_heads_per_kv_head(gpu, rng, fmt):
    """MQA with 32 query heads: two head groups of 16 read the single KV head."""
    c = Case(rng, fmt, 64, 32, (0, 77, 300), n_kv=1)
    out, lse = cukv.decode_attention(*c.args(gpu), return_lse=True, num_splits=2, **c.kw(gpu))
    O64, lse64 = c.exact()
    check_attention(out, lse, O64, lse64, f"MQA-32 {fmt}")


def test_packed_tensor_copy_layout():
    """Host side of the tensor copies (no GPU): a box row of ``kpack`` records covers each head's
    ``kpack`` rows from a 16-byte boundary; a stage holds the K box, then the V box at the 128-byte
    aligned offset the kernel uses (``vofs``), and every stage keeps the ring 128-byte aligned."""
    from cukv import attention_decode as ad  # noqa: PLC0415

    for R in (36, 40, 68, 72, 132, 260):
        for n_kv in (1, 2, 3):
            for kpack in (1, 2, 4):
                box = ad._tma_box(R, n_kv, kpack)
                assert box % 16 == 0
                for h in range(n_kv):   # head h's last row ends inside the box started at its boundary
                    assert (h * R) % 16 + (kpack - 1) * n_kv * R + R <= box, (R, n_kv, kpack, h)
                stage, ring = ad._ring(box, 2, tma=True, kpack=kpack)
                vofs = -(-(16 // kpack * box) // 128) * 128
                assert stage % 128 == 0 and ring % 128 == 0 and vofs + 16 // kpack * box <= stage - 128
    assert ad._ring(80, 2, tma=True) == ad._ring(80, 2, tma=True, kpack=1) == (32 * 80 + 128, 5760)


def test_numpy_path_matches_reference(rng):
    c = Case(rng, "int4:g2", 64, 4, (0, 3, 50), paged=True, page_size=7)
    out, lse = cukv.decode_attention(*c.args(np), return_lse=True, **c.kw(np))
    assert isinstance(out, np.ndarray) and out.dtype == BF16 and out.shape == c.q.shape
    O64, lse64 = c.exact()
    np.testing.assert_array_equal(out, O64.astype(np.float32).astype(BF16))
    np.testing.assert_array_equal(lse, lse64.astype(np.float32))
    assert (out[0].astype(np.float32) == 0).all() and np.isneginf(lse[0]).all()


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int4:g4"])
def test_splits_independent_and_deterministic(gpu, rng, fmt):
    c = Case(rng, fmt, 128, 4, (1, 300, 2000, 64))
    args = c.args(gpu)
    O64, lse64 = c.exact()
    outs = {}
    for s in (None, 1, 2, 3, 7, 16, 64, 1000, 1500):   # 1000, 1500: one merge block per task, many chunks of rows
        out, lse = cukv.decode_attention(*args, num_splits=s, return_lse=True, **c.kw(gpu))
        check_attention(out, lse, O64, lse64, f"splits={s}")
        outs[s] = to_host(out).astype(np.float64)
        again = cukv.decode_attention(*args, num_splits=s, **c.kw(gpu))
        assert (to_host(again).view(np.uint16) == to_host(out).view(np.uint16)).all(), "not deterministic"
    for s, o in outs.items():
        assert np.abs(o - outs[1]).max() <= 2e-2, s


@pytest.mark.parametrize("fmt", ["bf16", "fp8_head", "int4:g1"])
def test_large_logit(xp, rng, fmt):
    c = Case(rng, fmt, 128, 4, (5, 700, 129))
    c.q[0, 0, 0] = 1000.0
    c.q[2, 3, 5] = -1000.0
    out, lse = cukv.decode_attention(*c.args(xp), return_lse=True, num_splits=3, **c.kw(xp))
    O64, lse64 = c.exact()
    assert np.abs(lse64).max() > 50
    check_attention(out, lse, O64, lse64, "large logit")


def test_noncontiguous_inputs(gpu, rng):
    c = Case(rng, "fp8", 128, 8, (33, 1000))
    q, ck, cv, sl = c.args(gpu)
    base = cukv.decode_attention(q, ck, cv, sl, **c.kw(gpu))
    qs = strided_copy(gpu, c.q, how="pad")
    got = cukv.decode_attention(qs, ck, cv, sl, **c.kw(gpu))
    assert (to_host(got).view(np.uint16) == to_host(base).view(np.uint16)).all()
    # caches as head slices of a wider buffer (outer strides only): same bytes, no copy needed
    wide_k = np.concatenate([c.cache_k, c.cache_k], axis=2)
    wide_v = np.concatenate([c.cache_v, c.cache_v], axis=2)
    sk, sv = to_device(gpu, wide_k)[:, :, 2:], to_device(gpu, wide_v)[:, :, 2:]
    assert not sk.flags.c_contiguous
    got = cukv.decode_attention(q, sk, sv, sl, **c.kw(gpu))
    assert (to_host(got).view(np.uint16) == to_host(base).view(np.uint16)).all()
    # a last axis with stride 2 (copied internally)
    step = strided_copy(gpu, c.cache_k.reshape(-1, c.cache_k.shape[-1]), how="step").reshape(c.cache_k.shape)
    got = cukv.decode_attention(q, step, cv, sl, **c.kw(gpu))
    assert (to_host(got).view(np.uint16) == to_host(base).view(np.uint16)).all()


@pytest.mark.parametrize("fmt,off", [("bf16", 2), ("fp8", 1), ("int4:g2", 4), ("int4:g4", 8)])
def test_misaligned_cache(gpu, rng, fmt, off):
    """Base addresses off a 16-byte boundary take the narrow copy paths; results are identical."""
    c = Case(rng, fmt, 64, 2, (70, 5), paged=True, page_size=16)
    q, ck, cv, sl = c.args(gpu)
    base = cukv.decode_attention(q, ck, cv, sl, **c.kw(gpu))
    mk, mv = misaligned_copy(gpu, c.cache_k, off), misaligned_copy(gpu, c.cache_v, off)
    got = cukv.decode_attention(q, mk, mv, sl, **c.kw(gpu))
    assert (to_host(got).view(np.uint16) == to_host(base).view(np.uint16)).all()


def test_validate_false_guards(xp, rng):
    """Lengths beyond the capacity are clamped, negative ones give empty lanes, and rows behind
    out-of-range page ids are excluded; no out-of-bounds reads (unused memory is NaN)."""
    c = Case(rng, "fp8", 64, 2, (40, 40, 40, 40), paged=True, page_size=8)
    bt = c.block_tables.copy()
    bt[1, 2] = -3              # one bad page in lane 1
    bt[2, 0] = 10 ** 7         # lane 2 loses its first page
    c.block_tables = bt
    seq = np.array([40, 40, 40, -5], dtype=np.int32)
    seq_big = np.array([10 ** 6, 40, 40, -5], dtype=np.int32)   # lane 0 clamped to capacity 48
    q, ck, cv, _ = c.args(xp)
    for s in (seq, seq_big):
        out, lse = cukv.decode_attention(q, ck, cv, to_device(xp, s), return_lse=True, validate=False,
                                         num_splits=2, **c.kw(xp))
        O64, lse64 = c.exact(seqlens=s)
        if s is seq_big:   # positions 40..47 of lane 0 hold NaN bytes: lane 0 is unspecified there
            out, lse, O64, lse64 = out[1:], lse[1:], O64[1:], lse64[1:]
        check_attention(out, lse, O64, lse64, "validate=False")
        assert np.isneginf(to_host(lse)[-1]).all()


# ------------------------------------------------------------------------------------ bad input
def small(xp, rng, fmt="int4:g2", paged=False):
    c = Case(rng, fmt, 64, 2, (3, 9), paged=paged, page_size=4)
    return c, c.args(xp), c.kw(xp)


def test_bad_input(xp, rng):
    op = "decode_attention"
    c, (q, ck, cv, sl), kw = small(xp, rng)
    with raises_arg(ValueError, op, "seqlens[1]", "expected", "got 10"):
        cukv.decode_attention(q, ck, cv, to_device(xp, np.array([3, 10], np.int32)), **kw)
    with raises_arg(ValueError, op, "seqlens[0]", "got -1"):
        cukv.decode_attention(q, ck, cv, to_device(xp, np.array([-1, 2], np.int32)), **kw)
    q3 = to_device(xp, activations(rng, (2, 3, 64)))
    with raises_arg(ValueError, op, "q", "divisible by N_KVH=2", "N_H=3"):
        cukv.decode_attention(q3, ck, cv, sl, **kw)
    with raises_arg(TypeError, op, "q", "bfloat16", "float32"):
        cukv.decode_attention(q.astype(np.float32), ck, cv, sl, **kw)
    with raises_arg(TypeError, op, "seqlens", "int32", "int64"):
        cukv.decode_attention(q, ck, cv, sl.astype(np.int64), **kw)
    with raises_arg(ValueError, op, "seqlens", "int32 [B=2]"):
        cukv.decode_attention(q, ck, cv, sl[:1], **kw)
    with raises_arg(ValueError, op, "fmt", "format string"):
        cukv.decode_attention(q, ck, cv, sl)
    with raises_arg(ValueError, op, "cache_k", "36 bytes per row"):     # int4:g2 rows read as g1
        cukv.decode_attention(q, ck, cv, sl, fmt="int4:g1")
    with raises_arg(TypeError, op, "cache_v"):
        cukv.decode_attention(q, ck, cv.view(np.int8), sl, **kw)
    with raises_arg(ValueError, op, "q", "D in {64, 128, 256}"):
        cukv.decode_attention(to_device(xp, activations(rng, (2, 4, 32))), ck, cv, sl, **kw)
    with raises_arg(ValueError, op, "q", "B=2"):
        cukv.decode_attention(q[:1], ck, cv, sl[:1], **kw)
    with raises_arg(ValueError, op, "num_splits", ">= 1", "0"):
        cukv.decode_attention(q, ck, cv, sl, num_splits=0, **kw)
    with raises_arg(ValueError, op, "softmax_scale", "finite"):
        cukv.decode_attention(q, ck, cv, sl, softmax_scale=float("inf"), **kw)
    qn = q.copy()
    qn[1, 2, 3] = np.nan
    with raises_arg(ValueError, op, "q[1, 2, 3]", "finite", "nan"):
        cukv.decode_attention(qn, ck, cv, sl, check_finite=True, **kw)
    with raises_arg(TypeError, op, "fmt"):
        cukv.decode_attention(q, ck, cv, sl, fmt=4)


def test_bad_input_paged_and_qparams(xp, rng):
    op = "decode_attention"
    c, (q, ck, cv, sl), kw = small(xp, rng, paged=True)
    bt = to_host(kw["block_tables"]).copy()
    bt[1, 1] = 999                                        # lane 1 attends 9 rows: pages 0..2
    with raises_arg(ValueError, op, "block_tables[1, 1]", "page ids in [0,", "got 999"):
        cukv.decode_attention(q, ck, cv, sl, **{**kw, "block_tables": to_device(xp, bt)})
    bt = to_host(kw["block_tables"]).copy()
    bt[0, 3] = -1                                         # not attended: never read, never checked
    cukv.decode_attention(q, ck, cv, sl, **{**kw, "block_tables": to_device(xp, bt)})
    with raises_arg(ValueError, op, "page_size", ">= 1"):
        cukv.decode_attention(q, ck, cv, sl, **{**kw, "page_size": 0})
    with raises_arg(ValueError, op, "seqlens[0]", "got 17"):   # capacity = 4 pages * 4
        cukv.decode_attention(q, ck, cv, to_device(xp, np.array([17, 1], np.int32)), **kw)
    c2, (q2, ck2, cv2, sl2), kw2 = small(xp, rng, fmt="fp8_head")
    with raises_arg(ValueError, op, "qparam_k", "scales for fmt 'fp8_head'", "None"):
        cukv.decode_attention(q2, ck2, cv2, sl2, fmt="fp8_head")
    with raises_arg(ValueError, op, "qparam_v", "float32 [B=2, N_KVH=2]"):
        cukv.decode_attention(q2, ck2, cv2, sl2, fmt="fp8_head", qparam_k=kw2["qparam_k"],
                              qparam_v=kw2["qparam_v"][:1])


def test_empty_batch(xp):
    q = to_device(xp, np.zeros((0, 4, 64), BF16))
    ck = to_device(xp, np.zeros((0, 8, 2, 64), BF16))
    out, lse = cukv.decode_attention(q, ck, ck.copy(), to_device(xp, np.zeros(0, np.int32)), return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


# ------------------------------------------------------------------------------------ FBGEMM layer
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp8_ext", "fp8_head", "int4:g4"])
def test_mqa_attn(xp, rng, fmt):
    c = Case(rng, fmt, 128, 4, (0, 1, 130))
    q, ck, cv, sl = c.args(xp)
    kw = c.kw(xp)
    cdt = 0 if fmt == "bf16" else (1 if fmt.startswith("fp8") else 2)
    ng = int(fmt.split("g")[-1]) if fmt.startswith("int4") else 1
    O = fbgemm.mqa_attn(q[:, None], ck, cv, sl - np.int32(1), 1 / math.sqrt(128), num_groups=ng,
                        cache_logical_dtype_int=cdt, qparam_k=kw["qparam_k"], qparam_v=kw["qparam_v"])
    assert O.shape == (3, 1, 8, 128) and O.dtype == BF16
    O64, lse64 = c.exact()
    check_attention(O[:, 0], None, O64, lse64, f"mqa_attn {fmt}")
    with raises_arg(ValueError, "mqa_attn", "seq_positions[2]", "in [-1, 4095]", "got 4096"):
        bad = to_device(xp, np.array([0, 1, 4096], np.int32))
        big = Case(rng, "bf16", 128, 4, (0, 1, 4096))
        _, bk, bv, _ = big.args(xp)
        fbgemm.mqa_attn(q[:, None], bk, bv, bad, 0.1)
    with raises_arg(ValueError, "mqa_attn", "XQ", "[B, 1, N_H, D]"):
        fbgemm.mqa_attn(q, ck, cv, sl, 0.1, cache_logical_dtype_int=cdt, num_groups=ng,
                        qparam_k=kw["qparam_k"], qparam_v=kw["qparam_v"])


@pytest.mark.parametrize("fmt,S", [("bf16", 1), ("fp8", 3), ("int4:g2", 16)])
def test_gqa_attn_splitk(xp, rng, fmt, S):
    c = Case(rng, fmt, 128, 8, (0, 1, 7, 300))
    q, ck, cv, sl = c.args(xp)
    cdt = 0 if fmt == "bf16" else (1 if fmt.startswith("fp8") else 2)
    ng = int(fmt.split("g")[-1]) if fmt.startswith("int4") else 1
    scale = 1 / math.sqrt(128)
    pos = sl - np.int32(1)
    O, a, ml = fbgemm.gqa_attn_splitk(q[:, None], ck, cv, pos, scale, S, ng, True, cdt)
    B, NH = c.q.shape[:2]
    assert a.shape == (B, S, NH, 128) and ml.shape == (B, 2, S, NH)
    assert a.dtype == np.float32 and ml.dtype == np.float32
    O64, lse64 = c.exact()
    check_attention(O[:, 0], None, O64, lse64, "gqa_attn_splitk O")
    A64, M64, L64 = ref.split_partials(c.q, c.cache_k, c.cache_v, c.seqlens, S, **c.ref_kw())
    a, ml = to_host(a).astype(np.float64), to_host(ml).astype(np.float64)
    m, l = ml[:, 0], ml[:, 1]
    empty = np.isinf(M64)
    assert (np.isneginf(m) == empty).all() and (l[empty] == 0).all() and (a[empty] == 0).all()
    fin = ~empty
    assert (np.abs(m[fin] - M64[fin]) <= 1e-3 * np.maximum(1, np.abs(M64[fin]))).all()
    on, on64 = a[fin] / l[fin][:, None], A64[fin] / L64[fin][:, None]
    assert (np.abs(on - on64) <= 2e-2 + 6e-3 * np.abs(on64)).all()
    # use_tensor_cores=False: probabilities and raw dots over the capacity
    O2, probs, dots = fbgemm.gqa_attn_splitk(q[:, None], ck, cv, pos, scale, S, ng, False, cdt)
    P64, D64 = ref.scores(c.q, c.cache_k, c.cache_v, c.seqlens, **c.ref_kw())
    assert probs.shape == (B, NH, c.cache_k.shape[1]) and dots.shape == probs.shape
    assert np.abs(to_host(probs) - P64).max() <= 1e-3
    qn = np.linalg.norm(c.q.astype(np.float64), axis=-1)[..., None]
    assert (np.abs(to_host(dots) - D64) <= 1e-4 * qn * 20 + 1e-4).all()
    assert (to_host(O2).view(np.uint16) == to_host(O).view(np.uint16)).all() or xp is not np


def test_gqa_attn_splitk_bad_input(xp, rng):
    c = Case(rng, "bf16", 64, 2, (3, 5))
    q, ck, cv, sl = c.args(xp)
    with raises_arg(ValueError, "gqa_attn_splitk", "num_split_ks", ">= 1"):
        fbgemm.gqa_attn_splitk(q[:, None], ck, cv, sl, 0.1, 0)
    with raises_arg(TypeError, "gqa_attn_splitk", "seq_positions", "int32"):
        fbgemm.gqa_attn_splitk(q[:, None], ck, cv, sl.astype(np.int64), 0.1, 2)
