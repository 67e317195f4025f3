"""cukv.write_kv_prefill / write_kv_decode (cukv/cache_write.py, SPEC §4-§5).

* GPU kernels vs the NumPy reference over every fmt x position encoding x D, GQA 1/4/8, contiguous and
  paged caches (shuffled block tables, page sizes 16 and 64, partly filled last pages), ragged lanes
  with 0 and 1 tokens, fused strided inputs; budgets of SPEC §11.1 (0 for NoPE without norm, for V rows
  and bf16 caches of those; one-step flips after RoPE/xPos or qk_norm).
* Semantics in both modules, checked without the reference: paged == contiguous, bf16 run and quantized
  run give the same xq_out, skipped tokens == tokens left out, Q-only, write-back, decode == prefill,
  amax, non-finite confinement, float64 bounds (SPEC §11.2), bad input, adversarial indices.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

import cukv
from cukv.ref import codec as rcodec
from cukv.ref.layout import gather_logical
from helpers import (BF16, POISON_BYTE, activations, assert_bytes_equal, assert_flips,
                     assert_within_rel, check_guard, flip_budget, raises_arg, to_device, to_host)

F32 = np.float32
POS_ENCS = {
    "nope": None,
    "rope": cukv.RoPE(10000.0),
    "rope_half": cukv.RoPE(500000.0, interleaved=False),
    "rope_l31": cukv.RoPE(500000.0, scaling=cukv.Llama31Scaling()),
    "xpos": cukv.XPos(10000.0, 0.4, 512.0, exponent_offset=3.0),
    "xpos_half": cukv.XPos(10000.0, 0.4, 256.0, interleaved=False),
}
# "fp8_ext": fp8 with external int32 qparam words
FMTS = ["bf16", "fp8", "fp8_ext", "fp8_head", "int4", "int4:g2", "int4:g4", "int4:g8"]


def fmt_of(name):
    return "fp8" if name == "fp8_ext" else name


# ------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """Host data of one write call; :meth:`args` makes fresh arrays in a module."""

    fmt: str                      # FMTS name
    D: int
    n_h: int
    n_kv: int
    B: int
    buf: np.ndarray               # bf16 [n, HH, D]: the fused xq | xk | xv
    lane: np.ndarray
    pos: np.ndarray
    cache: np.ndarray             # poisoned cache (one, copied for K and V)
    cpos: np.ndarray | None = None
    bt: np.ndarray | None = None
    page_size: int = 64
    qp: tuple | None = None       # host qparams (k, v): external words (poison) or fp8_head scales
    amax: np.ndarray | None = None
    pre: np.ndarray | None = None
    fused: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def n(self):
        return int(self.buf.shape[0])

    @property
    def hh(self):
        return self.n_h + 2 * self.n_kv

    def args(self, xp, *, q_only=False):
        """(positional args, keyword args) of write_kv_prefill in module ``xp`` (fresh copies)."""
        n_h, n_kv = self.n_h, self.n_kv
        if self.fused:
            b = to_device(xp, self.buf)
            xq, xk, xv = b[:, :n_h], b[:, n_h:n_h + n_kv], b[:, n_h + n_kv:]
        else:
            xq, xk, xv = (to_device(xp, np.ascontiguousarray(self.buf[:, s]))
                          for s in (slice(0, n_h), slice(n_h, n_h + n_kv), slice(n_h + n_kv, None)))
        kw = dict(fmt=fmt_of(self.fmt), cache_pos=None if self.cpos is None else to_device(xp, self.cpos),
                  block_tables=None if self.bt is None else to_device(xp, self.bt), page_size=self.page_size)
        if self.qp is not None:
            kw["qparam_k"], kw["qparam_v"] = (to_device(xp, q) for q in self.qp)
        if self.amax is not None:
            kw["amax"] = to_device(xp, self.amax)
        if self.pre is not None:
            kw["scale_precomputed"] = to_device(xp, self.pre)
        ck, cv = to_device(xp, self.cache), to_device(xp, self.cache)
        if q_only:
            xk = xv = None
        return [xq, xk, xv, ck, cv, to_device(xp, self.lane), to_device(xp, self.pos)], kw

    def kept(self, valid_tokens=None):
        """Kept-token mask for in-range data (the tests' own rule, SPEC §5.2)."""
        k = self.pos >= 0
        if self.cpos is not None:
            k &= self.cpos >= 0
        if valid_tokens is not None:
            k &= np.arange(self.n) < valid_tokens
        return k


def make_case(rng, *, fmt="fp8", D=128, n_h=4, n_kv=2, lens=(3, 0, 1, 9), layout="contig",
              fused=True, skips=False, shuffle=True, amax="zeros", pre="random", max_start=6,
              trim_tables=True):
    """A ragged prefill: lane b gets lens[b] tokens at positions start_b.. (cache slots equal, or
    shifted through cache_pos when ``skips``); tokens shuffled; caches poisoned."""
    B = len(lens)
    starts = rng.integers(0, max_start + 1, B)
    lane = np.repeat(np.arange(B), lens).astype(np.int32)
    pos = np.concatenate([np.arange(s, s + l) for s, l in zip(starts, lens)] or [[]]).astype(np.int32)
    cpos = None
    if skips and lane.size:
        cpos = pos.copy()
        extra = [(b, -1, 0) for b in range(B)] + [(0, 3, -1), (B - 1, 0, -1)]
        lane = np.concatenate([lane, [e[0] for e in extra]]).astype(np.int32)
        pos = np.concatenate([pos, [e[1] for e in extra]]).astype(np.int32)
        cpos = np.concatenate([cpos, [e[2] for e in extra]]).astype(np.int32)
    n = lane.size
    if shuffle and n:
        p = rng.permutation(n)
        lane, pos = lane[p], pos[p]
        cpos = None if cpos is None else cpos[p]
    need = int(max([s + l for s, l in zip(starts, lens)] + [1]))
    kind = fmt_of(fmt)
    R = cukv.row_bytes(kind, D, fmt == "fp8_ext")
    dt = BF16 if kind == "bf16" else np.uint8
    bt = None
    S = 64
    if layout == "contig":
        cap = need + 5
        cache = np.empty((B, cap, n_kv, R), dt)
    else:
        S = int(layout)
        max_pages = -(-need // S) + 1
        P = B * max_pages + 3
        ids = rng.permutation(P)[:B * max_pages].reshape(B, max_pages).astype(np.int32)
        used = -(-(starts + np.asarray(lens)) // S)        # pages a lane's tokens reach
        for b in range(B):            # untouched entries of odd lanes hold -1 (never read)
            if trim_tables and b % 2:
                ids[b, int(used[b]):] = -1
        bt = ids
        cache = np.empty((1, P * S, n_kv, R), dt)
    cache.reshape(-1).view(np.uint8)[...] = POISON_BYTE
    qp = None
    am = None
    pr = None
    cap_rows = cache.shape[:3]
    if fmt == "fp8_ext":
        w = np.empty(cap_rows, np.int32)
        w.view(np.uint8)[...] = POISON_BYTE
        qp = (w, w.copy())
    if kind == "fp8_head":
        qp = tuple((rng.uniform(0.2, 2.0, (B, n_kv)) / 448 * 8).astype(F32) for _ in range(2))
        am = np.zeros((B, n_h + 2 * n_kv), F32) if amax == "zeros" else \
            rng.uniform(0, 3, (B, n_h + 2 * n_kv)).astype(F32)
        if pre == "random":
            pr = rng.random(n) < 0.5
        elif pre == "all":
            pr = np.ones(n, bool)
    buf = activations(rng, (n, n_h + 2 * n_kv, D))
    return Case(fmt=fmt, D=D, n_h=n_h, n_kv=n_kv, B=B, buf=buf, lane=lane, pos=pos, cache=cache, cpos=cpos,
                bt=bt, page_size=S, qp=qp, amax=am, pre=pr, fused=fused)


def run(case, xp, *, decode=False, q_only=False, pos_enc=None, **kw):
    """Run the op on fresh copies; return host results (out, ck, cv, qk, qv, amax, xq, xk)."""
    a, k = case.args(xp, q_only=q_only)
    k.update(kw)
    if decode:
        k.pop("scale_precomputed", None)
        xq, xk, xv, ck, cv, lane, pos = a
        out = cukv.write_kv_decode(xq, xk, xv, ck, cv, pos, lanes=lane, pos_enc=pos_enc, **k)
    else:
        out = cukv.write_kv_prefill(*a, pos_enc=pos_enc, **k)
    xq, xk, xv, ck, cv = a[:5]
    res = dict(out=out, ck=ck, cv=cv, xq=xq, xk=xk, qk=k.get("qparam_k"), qv=k.get("qparam_v"),
               amax=k.get("amax"))
    return {n: to_host(v) for n, v in res.items()}


# ------------------------------------------------------------------------------------ comparison
def _parts(fmt, cache, qp):
    """[(kind, values, per-row count)] of what a cache holds, split by encoding."""
    kind, G = cukv.parse_format(fmt_of(fmt))
    D = cache.shape[-1] if kind in ("bf16", "fp8_head") or fmt == "fp8_ext" else None
    if kind == "bf16":
        return [("bf16", cache, D)]
    if kind == "fp8_head":
        return [("e4m3", cache, D)]
    if kind == "fp8":
        if fmt == "fp8_ext":
            return [("e4m3", cache, D), ("f16", np.ascontiguousarray(qp).view(np.float16), 2)]
        return [("e4m3", cache[..., 4:], cache.shape[-1] - 4),
                ("f16", np.ascontiguousarray(cache[..., :4]).view(np.float16), 2)]
    nib = cache[..., 4 * G:]
    return [("int4", nib, 2 * nib.shape[-1]),
            ("f16", np.ascontiguousarray(cache[..., :4 * G]).view(np.float16), 2 * G)]


def budgets(mode, norm, n_codes, n_words, n_rows):
    """SPEC §11.1: (codes/values budget, words budget)."""
    if norm:
        return flip_budget(n_codes, 1e-4), flip_budget(n_rows, 1e-2)
    if mode:
        return flip_budget(n_codes, 2.0 ** -20), flip_budget(n_words, 2.0 ** -20)
    return 0, 0


def compare(got, want, case, *, pos_name="nope", norm=False, what=""):
    """Kernel results vs reference results with the SPEC §11.1 budgets (V rows always exact)."""
    mode = POS_ENCS[pos_name] is not None
    n_kept = int(case.kept().sum())
    nq = n_kept * case.n_h * case.D
    assert_flips(got["out"], want["out"], "bf16", budgets(mode, norm, nq, 0, 0)[0], what=f"{what} xq_out")
    rows = n_kept * case.n_kv
    for name, qpn in (("ck", "qk"), ("cv", "qv")):
        ext = case.fmt == "fp8_ext"
        gp = _parts(case.fmt, got[name], got[qpn] if ext else None)
        wp = _parts(case.fmt, want[name], want[qpn] if ext else None)
        for (kind, g, per_row), (_, w, _) in zip(gp, wp):
            cb, wb = budgets(mode, norm, rows * per_row, rows * per_row, rows)
            b = 0 if name == "cv" else (wb if kind == "f16" else cb)
            assert_flips(g, w, kind, b, what=f"{what} {name} {kind}")
    if case.fmt == "fp8_head":
        for name in ("qk", "qv"):
            assert_bytes_equal(got[name], want[name], what=f"{what} {name} (read-only scales)")
    if got["amax"] is not None:
        g, w = got["amax"], want["amax"]
        if mode or norm:
            np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=f"{what} amax")
        else:
            assert_bytes_equal(g, w, what=f"{what} amax")
    for name in ("xq", "xk"):
        b = budgets(mode, norm, got[name].size, 0, 0)[0]
        assert_flips(got[name], want[name], "bf16", b, what=f"{what} {name} (write-back)")


# ------------------------------------------------------------------------------------ GPU vs reference
def _grid():
    out = []
    for k, (fmt, pe, D) in enumerate(itertools.product(FMTS, POS_ENCS, (64, 128, 256))):
        gqa = (1, 4, 8)[k % 3]
        layout = ("contig", "16", "64")[(k // 3) % 3]
        norm = (k // 2) % 2 == 1
        out.append((fmt, pe, D, gqa, layout, norm))
    return out


@pytest.mark.parametrize("fmt,pe,D,gqa,layout,norm", _grid())
def test_kernel_vs_reference(gpu, rng, fmt, pe, D, gqa, layout, norm):
    n_kv = 2 if gqa < 8 else 1
    case = make_case(rng, fmt=fmt, D=D, n_h=n_kv * gqa, n_kv=n_kv, layout=layout,
                     lens=(5, 0, 1, 23, 2), fused=(D != 128), skips=(D == 64))
    kw = dict(pos_enc=POS_ENCS[pe], qk_norm=norm, qk_norm_eps=1e-6 if norm else 0.0,
              write_q_back=(D == 256))
    got = run(case, gpu, **kw)
    want = run(case, np, **kw)
    compare(got, want, case, pos_name=pe, norm=norm, what=f"{fmt}/{pe}/D{D}")


@pytest.mark.parametrize("fmt", ["fp8", "int4:g4", "fp8_head", "bf16"])
def test_kernel_decode_vs_reference(gpu, rng, fmt):
    case = make_case(rng, fmt=fmt, D=128, n_h=8, n_kv=2, lens=(1,) * 7, layout="16", shuffle=True,
                     pre=None, trim_tables=False)
    case.lane = np.random.default_rng(1).permutation(7).astype(np.int32)   # decode rows -> any lane
    kw = dict(pos_enc=POS_ENCS["rope_l31"], decode=True)
    compare(run(case, gpu, **kw), run(case, np, **kw), case, pos_name="rope_l31", what="decode")


@pytest.mark.parametrize("where", ["xq", "cache"])
def test_kernel_misaligned_scalar_paths(gpu, rng, where):
    """Base addresses off a 16-byte boundary take the element-wise paths; results stay exact."""
    from helpers import misaligned_copy

    for fmt in ("fp8", "bf16", "int4:g2"):
        case = make_case(rng, fmt=fmt, D=64, n_h=4, n_kv=2, fused=False)
        a, k = case.args(gpu)
        if where == "xq":
            a[0] = misaligned_copy(gpu, to_host(a[0]))
        else:
            off = 2 if fmt == "bf16" else 1
            a[3] = misaligned_copy(gpu, case.cache, off)
            a[4] = misaligned_copy(gpu, case.cache, off)
        out = cukv.write_kv_prefill(*a, **k)
        want = run(case, np)
        assert_bytes_equal(out, want["out"], what=f"{fmt} out")
        assert_bytes_equal(a[3], want["ck"], what=f"{fmt} cache_k")
        assert_bytes_equal(a[4], want["cv"], what=f"{fmt} cache_v")


def test_kernel_large_positions_and_outliers(gpu, rng):
    """Positions near 2^20 (float64 angles matter), huge and tiny rows; RoPE budget."""
    case = make_case(rng, fmt="fp8", D=128, n_h=8, n_kv=2, lens=(40, 40), max_start=0)
    case.cpos = case.pos.copy()                         # cache slots 0..39, RoPE positions ~2^20
    case.pos = (case.pos + np.int32((1 << 20) - 50)).astype(np.int32)
    case.buf[:3] *= BF16.type(300.0)
    for pe in ("rope", "rope_l31", "xpos"):
        got, want = run(case, gpu, pos_enc=POS_ENCS[pe]), run(case, np, pos_enc=POS_ENCS[pe])
        compare(got, want, case, pos_name=pe, what=pe)


@pytest.mark.parametrize("fmt,D,n_h,n_kv,pe,norm", [
    ("fp8", 128, 40, 8, "rope_l31", True), ("int4:g4", 64, 72, 8, "xpos_half", True),
    ("fp8_head", 256, 20, 4, "nope", True), ("fp8_ext", 128, 40, 8, "xpos", True),
    ("bf16", 128, 40, 8, "rope", False)])
def test_kernel_many_rows_per_team(gpu, rng, fmt, D, n_h, n_kv, pe, norm):
    """>= 2048 tokens: the launch gives each token one slice of blocks, so every team takes several
    rows of each token through the cp.async ring (D 128: team t of 16 takes rows t, t+16, t+32, ...:
    Q rows and a K or V row); the small cases above give each team at most one row per token."""
    case = make_case(rng, fmt=fmt, D=D, n_h=n_h, n_kv=n_kv, lens=(700, 1400, 3), layout="16")
    kw = dict(pos_enc=POS_ENCS[pe], qk_norm=norm, qk_norm_eps=1e-6 if norm else 0.0,
              write_q_back=fmt == "fp8_head")
    compare(run(case, gpu, **kw), run(case, np, **kw), case, pos_name=pe, norm=norm, what=f"{fmt}/D{D}")


def test_kernel_inv_sqrt_fast_path(gpu):
    """qk_norm's r = RN(1 / RN(sqrt(x))) (cache_write.cu inv_sqrt_rn: the compiler's fast sqrt.rn and
    rcp.rn sequences behind one range test) equals __frcp_rn(__fsqrt_rn(x)) for every x >= 0, every
    subnormal, Inf and NaN pattern included (2^31 bit patterns)."""
    from cukv import _compile
    from cukv.cache_write import _WRITE

    bad = gpu.zeros(1, gpu.uint64)
    _compile.launch(_WRITE.kernel("cw_inv_sqrt_probe"), (4096,), (256,),
                    (np.uint32(0), np.uint32(1 << 31), bad))
    assert int(bad.get()[0]) == 0


@pytest.mark.parametrize("fmt,D", [("fp8", 128), ("int4:g4", 64), ("bf16", 256), ("int4:g2", 128)])
def test_kernel_qk_norm_extreme_rows(gpu, rng, fmt, D):
    """qk_norm rows whose ms + eps leaves inv_sqrt_rn's fast range [2^-101, FLT_MAX]: subnormal and
    zero ms, ss overflowing to Inf (r = 0), an all-zero row (NaN with eps = 0), and rows at the edges
    of the fast range; with and without RoPE, eps 0 and 1e-6. Norm budgets of SPEC §11.1."""
    n_h, n_kv = 8, 2
    case = make_case(rng, fmt=fmt, D=D, n_h=n_h, n_kv=n_kv, lens=(6, 5), layout="16")
    # per-head scales: Q heads 0..7, K heads 8..9 (V rows are never normed but take the same scales)
    scales = [2.0 ** -75, 2.0 ** -62, 2.0 ** -45, 2.0 ** 60, 2.0 ** 66, 2.0 ** 75, 0.0, 1.0,
              2.0 ** -70, 2.0 ** 70, 2.0 ** -70, 1.0]
    for h, s in enumerate(scales):
        case.buf[:, h] = (case.buf[:, h].astype(np.float64) * s).astype(BF16)
    case.buf[3, 9] = 0                        # one all-zero K row
    for pe in ("nope", "rope"):
        for eps in (0.0, 1e-6):
            kw = dict(pos_enc=POS_ENCS[pe], qk_norm=True, qk_norm_eps=eps)
            got, want = run(case, gpu, **kw), run(case, np, **kw)
            compare(got, want, case, pos_name=pe, norm=True, what=f"{fmt}/{pe}/eps={eps}")


# ------------------------------------------------------------------------------------ semantics (both modules)
def logical(res, case, name="ck"):
    """Logical cache rows [B, capacity, N_KVH, R] (paged caches gathered through the block table)."""
    c = res[name]
    if case.bt is None:
        return c
    T = case.bt.shape[1] * case.page_size
    rows, ok = gather_logical(c, case.B, T, case.bt, case.page_size)
    return np.where(ok[..., None, None], rows, np.array(POISON_BYTE, c.dtype) if c.dtype == np.uint8
                    else np.full((), np.nan, c.dtype))


@pytest.mark.parametrize("fmt", ["fp8", "int4:g4", "bf16", "fp8_ext"])
@pytest.mark.parametrize("S", [16, 64])
def test_paged_equals_contiguous(xp, rng, fmt, S):
    base = make_case(rng, fmt=fmt, D=64, n_h=4, n_kv=2, lens=(70, 1, 0, 33), layout=str(S), max_start=0)
    T = base.bt.shape[1] * S
    cc = np.empty((base.B, T) + base.cache.shape[2:], base.cache.dtype)
    cc.reshape(-1).view(np.uint8)[...] = POISON_BYTE
    contig = replace(base, bt=None, cache=cc)
    if fmt == "fp8_ext":
        contig.qp = tuple(np.full((base.B, T, 2), -0x5A5A5A5B, np.int32) for _ in range(2))
    pe = POS_ENCS["rope"]
    rp, rc = run(base, xp, pos_enc=pe), run(contig, xp, pos_enc=pe)
    assert_bytes_equal(rp["out"], rc["out"], what="xq_out")
    for name in ("ck", "cv"):
        lp = logical(rp, base, name)
        kept = np.zeros((base.B, T), bool)
        kept[base.lane, base.pos] = True
        assert_bytes_equal(lp[kept], rc[name][kept], what=f"{name} written rows")
        assert (rc[name][~kept].view(np.uint8) == POISON_BYTE).all(), f"{name}: contiguous row touched"
        phys = rp[name].reshape(-1, *rp[name].shape[2:])
        touched = np.zeros(phys.shape[0], bool)
        touched[base.bt[base.lane, base.pos // S].astype(np.int64) * S + base.pos % S] = True
        assert (phys[~touched].view(np.uint8) == POISON_BYTE).all(), f"{name}: paged row touched"
    if fmt == "fp8_ext":
        wp = rp["qk"].reshape(-1, 2)[base.bt[base.lane, base.pos // S].astype(np.int64) * S + base.pos % S]
        assert_bytes_equal(wp, rc["qk"][base.lane, base.pos], what="external words")


@pytest.mark.parametrize("pe", ["nope", "rope", "xpos_half"])
def test_xq_out_independent_of_format(xp, rng, pe):
    seed = int(rng.integers(1 << 30))
    case = make_case(np.random.default_rng(seed), fmt="bf16", D=128, n_h=8, n_kv=1)
    ref_out = run(case, xp, pos_enc=POS_ENCS[pe])["out"]
    for fmt in ("fp8", "fp8_ext", "int4:g8", "fp8_head"):
        c2 = make_case(np.random.default_rng(seed), fmt=fmt, D=128, n_h=8, n_kv=1)
        assert (c2.lane == case.lane).all() and (c2.pos == case.pos).all()
        c2 = replace(c2, buf=case.buf, pre=None if c2.pre is None else np.ones(case.n, bool))
        assert_bytes_equal(run(c2, xp, pos_enc=POS_ENCS[pe])["out"], ref_out, what=f"{fmt} xq_out")


@pytest.mark.parametrize("fmt", ["fp8", "int4", "fp8_head", "bf16"])
def test_skips_equal_leaving_tokens_out(xp, rng, fmt):
    """-1 positions, -1 cache slots and valid_tokens skip a token: same result as not passing it,
    and its xq_out rows are 0."""
    case = make_case(rng, fmt=fmt, D=64, n_h=4, n_kv=2, skips=True, layout="16", pre="all")
    vt = case.n - 2
    keep = case.kept(vt)
    res = run(case, xp, pos_enc=POS_ENCS["rope"], valid_tokens=vt)
    sub = replace(case, buf=case.buf[keep], lane=case.lane[keep], pos=case.pos[keep],
                  cpos=case.cpos[keep], pre=None if case.pre is None else case.pre[keep])
    want = run(sub, xp, pos_enc=POS_ENCS["rope"])
    assert_bytes_equal(res["out"][keep], want["out"], what="kept xq_out")
    assert (res["out"][~keep].astype(F32) == 0).all() and (res["out"][~keep].view(np.uint16) == 0).all()
    for name in ("ck", "cv", "amax"):
        if res[name] is not None:
            assert_bytes_equal(res[name], want[name], what=name)
    # valid_tokens as a device array (graph-capturable form), int32 and int64
    for dt in (np.int32, np.int64):
        r2 = run(case, xp, pos_enc=POS_ENCS["rope"], valid_tokens=to_device(xp, np.array([vt], dt)))
        assert_bytes_equal(r2["out"], res["out"], what=f"valid_tokens {dt.__name__} array")
        assert_bytes_equal(r2["ck"], res["ck"], what="cache_k")


@pytest.mark.parametrize("fmt", ["fp8", "fp8_head"])
def test_q_only(xp, rng, fmt):
    case = make_case(rng, fmt=fmt, D=128, n_h=4, n_kv=2, skips=True, pre="all")
    full = run(case, xp, pos_enc=POS_ENCS["rope"], qk_norm=True)
    qo = run(case, xp, q_only=True, pos_enc=POS_ENCS["rope"], qk_norm=True)
    assert_bytes_equal(qo["out"], full["out"], what="Q-only xq_out")
    assert (qo["ck"].view(np.uint8) == POISON_BYTE).all() and (qo["cv"].view(np.uint8) == POISON_BYTE).all()
    if fmt == "fp8_head":
        n_h = case.n_h
        assert_bytes_equal(qo["amax"][:, :n_h], full["amax"][:, :n_h], what="Q amax")
        assert (qo["amax"][:, n_h:] == 0).all()
    # caches omitted entirely
    a, k = case.args(xp, q_only=True)
    k = {n: v for n, v in k.items() if n in ("fmt", "amax")}
    out = cukv.write_kv_prefill(a[0], None, None, None, None, a[5], a[6], pos_enc=POS_ENCS["rope"],
                                qk_norm=True, cache_pos=to_device(xp, case.cpos), **k)
    assert_bytes_equal(out, full["out"], what="Q-only without caches")


def test_write_back(xp, rng):
    """Write-back stores RN_bf16(y): Q rows equal xq_out, K rows equal the bf16 cache rows; skipped
    tokens and V rows keep their values."""
    case = make_case(rng, fmt="bf16", D=128, n_h=4, n_kv=2, skips=True, fused=True)
    keep = case.kept()
    res = run(case, xp, pos_enc=POS_ENCS["rope_half"], qk_norm=True, write_q_back=True, write_k_back=True)
    assert_bytes_equal(res["xq"][keep], res["out"][keep], what="xq written back")
    assert_bytes_equal(res["xq"][~keep], case.buf[~keep, :case.n_h], what="skipped xq rows")
    lp = res["ck"][case.lane[keep], case.cpos[keep]]
    assert_bytes_equal(res["xk"][keep], lp, what="xk written back == bf16 cache rows")
    assert_bytes_equal(res["xk"][~keep], case.buf[~keep, case.n_h:case.n_h + case.n_kv], what="skipped xk")
    # default write_k_back: False for bf16, True for fp8_head
    res2 = run(case, xp, pos_enc=POS_ENCS["rope"])
    assert_bytes_equal(res2["xk"], case.buf[:, case.n_h:case.n_h + case.n_kv], what="xk untouched")
    h = make_case(rng, fmt="fp8_head", D=64, n_h=2, n_kv=1, pre=None)
    r3 = run(h, xp, pos_enc=POS_ENCS["rope"])
    bf = replace(h, fmt="bf16", cache=np.zeros(h.cache.shape[:3] + (64,), BF16), qp=None, amax=None)
    r4 = run(bf, xp, pos_enc=POS_ENCS["rope"], write_k_back=True)
    assert_bytes_equal(r3["xk"], r4["xk"], what="fp8_head default write-back")


@pytest.mark.parametrize("fmt", ["fp8", "int4:g2", "fp8_head"])
def test_decode_equals_prefill(xp, rng, fmt):
    case = make_case(rng, fmt=fmt, D=64, n_h=4, n_kv=2, lens=(1, 1, 1, 1, 1), layout="16", pre="all",
                     trim_tables=False)
    case.lane = np.array([3, 0, 4, 2, 1], np.int32)
    a = run(case, xp, pos_enc=POS_ENCS["xpos"], decode=True)
    b = run(case, xp, pos_enc=POS_ENCS["xpos"])
    for name in ("out", "ck", "cv", "amax"):
        if a[name] is not None:
            assert_bytes_equal(a[name], b[name], what=name)
    # lanes=None: row i is lane i
    case.lane = np.arange(5, dtype=np.int32)
    ar, kw = case.args(xp)
    kw.pop("scale_precomputed", None)
    out = cukv.write_kv_decode(*ar[:5], ar[6], **kw)
    assert_bytes_equal(out, run(case, xp, decode=True)["out"], what="lanes=None")


def test_fp8_head_amax_and_precomputed(xp, rng):
    """NoPE, no norm: amax == max |x| exactly; precomputed tokens are quantized with the given scale
    and do not touch K/V amax; the others write no cache row."""
    case = make_case(rng, fmt="fp8_head", D=64, n_h=4, n_kv=2, lens=(6, 0, 3), pre="random",
                     amax="random")
    res = run(case, xp)
    x = case.buf.astype(F32)
    want = case.amax.copy()
    n_h, n_kv = case.n_h, case.n_kv
    for i in range(case.n):
        b = case.lane[i]
        cols = slice(0, n_h) if case.pre[i] else slice(0, case.hh)
        want[b, cols] = np.maximum(want[b, cols], np.abs(x[i, cols]).max(-1))
    assert_bytes_equal(res["amax"], want, what="amax")
    for i in range(case.n):
        b, t = case.lane[i], case.pos[i]
        for name, off, qp in (("ck", n_h, case.qp[0]), ("cv", n_h + n_kv, case.qp[1])):
            row = res[name][b, t]
            if case.pre[i]:
                codes = rcodec.quantize_fp8_head(x[i, off:off + n_kv], qp[b])
                assert_bytes_equal(row, codes, what=f"{name} precomputed row")
            else:
                assert (row == POISON_BYTE).all(), f"{name}: non-precomputed row written"


def test_fp8_head_amax_nonfinite(xp, rng):
    """NaN beats +Inf beats finite in amax; the effect stays in its (lane, column)."""
    case = make_case(rng, fmt="fp8_head", D=64, n_h=2, n_kv=1, lens=(2, 2, 2), pre=None, shuffle=False)
    case.buf[0, 0, 5] = np.inf
    case.buf[1, 0, 7] = np.nan
    case.buf[2, 2, 3] = -np.inf
    res = run(case, xp)
    assert np.isnan(res["amax"][0, 0]) and res["amax"][1, 2] == np.inf
    clean = replace(case, buf=case.buf.copy())
    clean.buf[0, 0, 5] = clean.buf[1, 0, 7] = clean.buf[2, 2, 3] = 0
    rc = run(clean, xp)
    mask = np.ones(res["amax"].shape, bool)
    mask[0, 0] = mask[1, 2] = False
    assert_bytes_equal(res["amax"][mask], rc["amax"][mask], what="other amax entries")


@pytest.mark.parametrize("fmt", ["fp8", "int4:g4", "bf16"])
def test_nonfinite_confined(xp, rng, fmt):
    """SPEC §11.4: a NaN / Inf changes only its row (fp8, bf16) or group (int4)."""
    case = make_case(rng, fmt=fmt, D=128, n_h=2, n_kv=2, lens=(4, 3), shuffle=False, layout="contig")
    bad = replace(case, buf=case.buf.copy())
    bad.buf[1, 2, 17] = np.nan       # K head 0 of token 1
    bad.buf[4, 5, 100] = -np.inf     # V head 1 of token 4
    bad.buf[2, 0, 3] = np.inf        # Q head 0 of token 2
    clean = replace(case, buf=case.buf.copy())
    clean.buf[1, 2, 17] = clean.buf[4, 5, 100] = clean.buf[2, 0, 3] = 0
    pe = POS_ENCS["rope"]
    rb, rc = run(bad, xp, pos_enc=pe), run(clean, xp, pos_enc=pe)
    m = np.ones(rb["out"].shape[:2], bool)
    m[2, 0] = False
    assert_bytes_equal(rb["out"][m], rc["out"][m], what="other Q rows")
    for name, (b, t, h) in (("ck", (0, case.pos[1], 0)), ("cv", (1, case.pos[4], 1))):
        mm = np.ones(rb[name].shape[:3], bool)
        mm[b, t, h] = False
        assert_bytes_equal(rb[name][mm], rc[name][mm], what=f"{name} other rows")
        row, row_c = rb[name][b, t, h], rc[name][b, t, h]
        if fmt == "fp8":
            assert row[:4].view("<u4")[0] == 0x7E007E00 and (row[4:] == 0x7F).all()
        elif fmt.startswith("int4"):      # only the group holding the value (RoPE pairs stay in it)
            g = (17 if name == "ck" else 100) // 32
            words = row[:16].view("<u4")
            assert words[g] == 0x7E007E00 and (words == 0x7E007E00).sum() == 1
            keepb = np.ones(row.shape, bool)
            keepb[4 * g:4 * g + 4] = False
            keepb[16 + 16 * g:16 + 16 * (g + 1)] = False
            assert (row[16 + 16 * g:16 + 16 * (g + 1)] == 0).all()
            assert_bytes_equal(row[keepb], row_c[keepb], what="other int4 groups")


def y64(x, pos, pe, D, is_q, norm, eps=0.0):
    """The write formula entirely in float64 (SPEC §11.2)."""
    from cukv.rope import position_tables

    x = x.astype(np.float64)
    mode, inter, f, z = position_tables(pe, D)
    if mode:
        a = pos[:, None].astype(np.float64) * f[None]
        c, s = np.cos(a)[:, None], np.sin(a)[:, None]
        xi, xj = (x[..., 0::2], x[..., 1::2]) if inter else (x[..., :D // 2], x[..., D // 2:])
        yi, yj = xi * c - xj * s, xj * c + xi * s
        if mode == 2:
            e = (pos - pe.exponent_offset) / (pe.scale_base if is_q else -pe.scale_base)
            zz = (z[None] ** e[:, None])[:, None]
            yi, yj = yi * zz, yj * zz
        y = np.empty_like(x)
        if inter:
            y[..., 0::2], y[..., 1::2] = yi, yj
        else:
            y[..., :D // 2], y[..., D // 2:] = yi, yj
        x = y
    if norm:
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x


@pytest.mark.parametrize("pe,norm", [("rope_l31", False), ("xpos", True), ("rope_half", True), ("nope", True)])
def test_float64_bounds(xp, rng, pe, norm):
    """SPEC §11.2: every bf16 output within one bf16 ulp of the float64 formula; cache rows within the
    quantization bounds of their format."""
    case = make_case(rng, fmt="fp8", D=128, n_h=4, n_kv=2, lens=(30, 7), max_start=3000)
    res = run(case, xp, pos_enc=POS_ENCS[pe], qk_norm=norm, write_k_back=True)
    keep = case.kept()
    q64 = y64(case.buf[keep, :4], case.pos[keep], POS_ENCS[pe], 128, True, norm)
    k64 = y64(case.buf[keep, 4:6], case.pos[keep], POS_ENCS[pe], 128, False, norm)
    assert_within_rel(res["out"][keep], q64, 2.0 ** -7, what="xq_out")
    assert_within_rel(res["xk"][keep], k64, 2.0 ** -7, what="xk write-back")
    rows = res["ck"][case.lane[keep], case.pos[keep]]
    deq = rcodec.dequantize(rows, "fp8").astype(np.float64)
    s, z, _ = rcodec.fp8_params(k64.astype(F32))
    s, z = s.astype(np.float64)[..., None], z.astype(np.float64)[..., None]

    def u16(a):
        return np.maximum(np.abs(a) * 2.0 ** -11, 2.0 ** -25)

    bound = 1.01 * (2.0 ** -4 * np.abs(k64 - z) + 2.0 ** -10 * s + 448 * u16(s) + u16(z)) + \
        2.0 ** -8 * np.abs(k64) + 2.0 ** -20 * np.abs(k64).max(-1, keepdims=True)
    assert (np.abs(deq - k64) <= bound).all()


# ------------------------------------------------------------------------------------ bad input
def test_bad_input(xp, rng):
    op = "write_kv_prefill"
    case = make_case(rng, fmt="fp8", D=64, n_h=4, n_kv=2, lens=(3, 2), layout="16")

    def call(**over):
        a, k = case.args(xp)
        names = ["xq", "xk", "xv", "cache_k", "cache_v", "token_lane", "token_pos"]
        args = dict(zip(names, a))
        for n in list(over):
            if n in args:
                args[n] = over.pop(n)
        k.update(over)
        return cukv.write_kv_prefill(*[args[n] for n in names], **k)

    a, _ = case.args(xp)
    bad_pos = to_device(xp, np.array([0, 1, 2, 0, 999], np.int32))
    with raises_arg(ValueError, op, "token_pos[4]", "capacity", "999"):
        call(token_pos=bad_pos)
    bt = case.bt.copy()
    bt[1, 0] = bt.size + 100
    with raises_arg(ValueError, op, "block_tables[1, 0]", str(bt.size + 100)):
        call(block_tables=to_device(xp, bt))
    with raises_arg(ValueError, op, "token_lane[0]", "[0, B=2)"):
        call(token_lane=to_device(xp, np.array([5, 0, 0, 1, 1], np.int32)))
    with raises_arg(ValueError, op, "token_pos[2]", "-1"):
        call(token_pos=to_device(xp, np.array([0, 1, -7, 0, 1], np.int32)))
    with raises_arg(TypeError, op, "xq", "bfloat16"):
        call(xq=a[0].astype(np.float32))
    with raises_arg(TypeError, op, "token_pos", "int32"):
        call(token_pos=a[6].astype(np.int64))
    with raises_arg(ValueError, op, "xv", "N_KVH=2"):
        call(xv=a[2][:, :1])
    with raises_arg(ValueError, op, "cache_k", "N_KVH=1"):
        call(xk=a[1][:, :1], xv=a[2][:, :1])
    with raises_arg(ValueError, op, "fmt", "ambiguous"):
        call(fmt=None)
    with raises_arg(ValueError, op, "cache_k", "68"):
        call(fmt="int4:g1")       # 64 + 4 bytes is fp8 for D=64, not int4:g1 (36 bytes)
    with raises_arg(ValueError, op, "xq", "64, 128, 256"):
        call(xq=to_device(xp, np.zeros((5, 4, 32), BF16)))
    with raises_arg(ValueError, op, "amax", "None for fmt 'fp8'"):
        call(amax=to_device(xp, np.zeros((2, 8), F32)))
    with raises_arg(ValueError, op, "xv", "both"):
        call(xv=None)
    with raises_arg(ValueError, op, "out", "C-contiguous"):
        call(out=a[0])                        # a fused view
    xqc = to_device(xp, np.ascontiguousarray(case.buf[:, :4]))
    with raises_arg(ValueError, op, "out", "overlaps"):
        call(xq=xqc, out=xqc)
    with raises_arg(TypeError, op, "pos_enc"):
        call(pos_enc="rope")
    with raises_arg(ValueError, op, "qk_norm_eps"):
        call(qk_norm_eps=-1.0)
    with raises_arg(ValueError, op, "xq[", "finite"):
        x = case.buf.copy()
        x[1, 0, 3] = np.nan
        call(xq=to_device(xp, x)[:, :4], check_finite=True)
    with raises_arg(ValueError, "write_kv_decode", "lanes[2]", "B=2"):
        a2, k2 = case.args(xp)
        k2.pop("block_tables")
        cukv.write_kv_decode(a2[0][:3], a2[1][:3], a2[2][:3], to_device(xp, np.zeros((2, 16, 2, 68), np.uint8)),
                             to_device(xp, np.zeros((2, 16, 2, 68), np.uint8)),
                             to_device(xp, np.zeros(3, np.int32)), fmt="fp8")
    # fp8_head needs amax; negative amax is rejected
    h = make_case(rng, fmt="fp8_head", D=64, n_h=2, n_kv=1, lens=(2,))
    ah, kh = h.args(xp)
    kh.pop("amax")
    with raises_arg(ValueError, op, "amax", "None"):
        cukv.write_kv_prefill(*ah, **kh)
    with raises_arg(ValueError, op, "amax[0, 1]", ">= 0"):
        cukv.write_kv_prefill(*ah, amax=to_device(xp, np.array([[0, -1, 0, 0]], F32)), **kh)


def test_nothing_written_on_error(xp, rng):
    case = make_case(rng, fmt="int4:g2", D=64, n_h=2, n_kv=2, lens=(4,))
    a, k = case.args(xp)
    a[6] = to_device(xp, np.array([0, 1, 2, 500], np.int32))
    with pytest.raises(ValueError):
        cukv.write_kv_prefill(*a, **k)
    assert (to_host(a[3]) == POISON_BYTE).all() and (to_host(a[4]) == POISON_BYTE).all()


@pytest.mark.parametrize("layout", ["contig", "16"])
def test_adversarial_indices_validate_false(xp, rng, layout):
    """validate=False: out-of-range lanes, slots, positions and page ids skip their token; caches sit
    in guard bands that stay untouched; the result equals the run with those tokens at -1."""
    from helpers import guarded

    case = make_case(rng, fmt="fp8", D=64, n_h=2, n_kv=1, lens=(5, 4), layout=layout, shuffle=False)
    lane, pos = case.lane.copy(), case.pos.copy()
    lane[0] = 7            # lane >= B
    lane[1] = -3           # negative lane
    pos[2] = -9            # position < -1
    pos[5] = 1 << 30       # slot past the capacity
    bt = case.bt
    if bt is not None:
        bt = bt.copy()
        bt[1, 0] = 1 << 20  # page id >= P (token 5.. of lane 1)
        bt[1, 1] = -5
    adv = replace(case, lane=lane, pos=pos, bt=bt)
    ref_pos = pos.copy()
    ref_pos[[0, 1, 2, 5]] = -1
    if bt is not None:
        ref_pos[(lane == 1) & (pos < 32) & (pos >= 0)] = -1
    clean = replace(case, pos=ref_pos, lane=np.where(ref_pos < 0, 0, lane).astype(np.int32))
    want = run(clean, xp, pos_enc=POS_ENCS["rope"])
    a, k = adv.args(xp)
    bufs = []
    for j in (3, 4):
        buf, view = guarded(xp, a[j].shape, np.uint8, guard=4096)
        view[...] = a[j]
        a[j] = view
        bufs.append((buf, view))
    out = cukv.write_kv_prefill(*a, pos_enc=POS_ENCS["rope"], validate=False, **k)
    assert_bytes_equal(out, want["out"], what="xq_out")
    assert_bytes_equal(a[3], want["ck"], what="cache_k")
    assert_bytes_equal(a[4], want["cv"], what="cache_v")
    for buf, view in bufs:
        check_guard(buf, view, guard=4096)


def test_empty(xp):
    z = np.zeros((0, 4, 64), BF16)
    zk = np.zeros((0, 2, 64), BF16)
    c = np.zeros((1, 8, 2, 68), np.uint8)
    e = np.zeros(0, np.int32)
    out = cukv.write_kv_prefill(to_device(xp, z), to_device(xp, zk), to_device(xp, zk), to_device(xp, c),
                                to_device(xp, c), to_device(xp, e), to_device(xp, e), fmt="fp8",
                                pos_enc=cukv.RoPE())
    assert out.shape == (0, 4, 64)


# ------------------------------------------------------------------------------------ FBGEMM writers
def test_fbgemm_rope_prefill_dispatch(xp, rng):
    """SPEC §10: the compat writers give the native results; dispatch by cache dtype and row size."""
    from cukv import fbgemm

    fb_scaling = cukv.RoPE(10000.0, scaling=cukv.Llama31Scaling(8192, 16, 1, 32))
    for fmt, cdt, ng in (("bf16", 1, 0), ("fp8", 1, 1), ("fp8_ext", 1, None), ("int4", 0, 1),
                         ("int4:g4", 2, 4)):
        case = make_case(rng, fmt=fmt, D=64, n_h=4, n_kv=2, layout="16", skips=True)
        want = run(case, xp, pos_enc=fb_scaling, qk_norm=True)
        a, k = case.args(xp)
        out = fbgemm.rope_qkv_varseq_prefill(
            *a, 10000.0, ng, k["block_tables"], 16, None, k["cache_pos"], cdt, True,
            qparam_k=k.get("qparam_k"), qparam_v=k.get("qparam_v"), k_norm=True)
        assert_bytes_equal(out, want["out"], what=f"{fmt} XQ_O")
        assert_bytes_equal(a[3], want["ck"], what=f"{fmt} cache_K")
        assert_bytes_equal(a[4], want["cv"], what=f"{fmt} cache_V")
    op = "rope_qkv_varseq_prefill"
    case = make_case(rng, fmt="int4", D=64, n_h=4, n_kv=2)
    a, k = case.args(xp)
    with raises_arg(ValueError, op, "num_groups", "1, 2, 4 or 8"):
        fbgemm.rope_qkv_varseq_prefill(*a, 10000.0, num_groups=16)
    with raises_arg(ValueError, op, "num_groups", "FP8"):
        fbgemm.rope_qkv_varseq_prefill(*a, 10000.0, num_groups=2, cache_logical_dtype_int=1)
    with raises_arg(ValueError, op, "XK", "update_kv=False"):
        fbgemm.rope_qkv_varseq_prefill(*a, 10000.0, update_kv=False)
    out = fbgemm.rope_qkv_varseq_prefill(a[0], None, None, a[3], a[4], a[5], a[6], 10000.0, update_kv=False)
    assert_bytes_equal(out, run(case, xp, pos_enc=cukv.RoPE(10000.0))["out"], what="update_kv=False")
    assert (to_host(a[3]) == POISON_BYTE).all()


def test_fbgemm_fp8_head_and_decode(xp, rng):
    from cukv import fbgemm

    case = make_case(rng, fmt="fp8_head", D=128, n_h=4, n_kv=2, lens=(3, 2), pre=None)
    # kv_quant_scale_precomputed=None: every token is precomputed; XQ and XK are written back
    want = run(case, xp, pos_enc=cukv.RoPE(500000.0), scale_precomputed=to_device(xp, np.ones(case.n, bool)),
               write_q_back=True, write_k_back=True)
    a, k = case.args(xp)
    out = fbgemm.rope_qkv_varseq_prefill(*a, 500000.0, cache_logical_dtype_int=1, qparam_k=k["qparam_k"],
                                         qparam_v=k["qparam_v"], amax_qkv=k["amax"])
    assert_bytes_equal(out, want["out"], what="XQ_O")
    for j, name in ((0, "xq"), (1, "xk"), (3, "ck"), (4, "cv")):
        assert_bytes_equal(a[j], want[name], what=name)
    assert_bytes_equal(k["amax"], want["amax"], what="amax")
    with raises_arg(ValueError, "xpos_qkv_varseq_prefill", "cache_K", "per-head"):
        fbgemm.xpos_qkv_varseq_prefill(*a, 10000.0, 0.4, 512.0, 0.0, cache_logical_dtype_int=1,
                                       qparam_k=k["qparam_k"], qparam_v=k["qparam_v"])
    # decoding: batch honoured, cache_seqpos, actual_batch_size, xpos
    dec = make_case(rng, fmt="int4:g2", D=64, n_h=4, n_kv=1, lens=(1, 1, 1, 1), layout="64",
                    trim_tables=False)
    dec.lane = np.array([2, 3, 0, 1], np.int32)
    pe = cukv.XPos(10000.0, 0.4, 512.0, 2.0)
    want = run(dec, xp, decode=True, pos_enc=pe, valid_tokens=3)
    a, k = dec.args(xp)
    out = fbgemm.xpos_qkv_decoding(a[0], a[1], a[2], a[3], a[4], a[6], 10000.0, 0.4, 512.0, 2.0, 2,
                                   k["block_tables"], 64, 3, a[5])
    assert_bytes_equal(out, want["out"], what="xpos decoding XQ_O")
    assert_bytes_equal(a[3], want["ck"], what="xpos decoding cache_K")
    a, k = dec.args(xp)
    out = fbgemm.nope_qkv_decoding(a[0], a[1], a[2], a[3], a[4], a[6], k["block_tables"], 64, None, a[5],
                                   num_groups=2, k_norm=True)
    want = run(dec, xp, decode=True, qk_norm=True)
    assert_bytes_equal(out, want["out"], what="nope decoding XQ_O")
    assert_bytes_equal(a[4], want["cv"], what="nope decoding cache_V")
