"""cukv.prefill_attention (SPEC §8.2, §11.2): the float64 reference against an independent per-row
formula (CPU), the kernel against the reference (GPU), layout equivalence, edges and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

import cukv
from cukv.ref import attention_prefill as ref
from cukv.ref import codec as rcodec
from helpers import BF16, activations, raises_arg, to_host

OP = "prefill_attention"


@pytest.fixture(scope="module", autouse=True)
def _warm_kernels():
    """With a GPU, compile the kernels these tests use in parallel first (one NVRTC process per
    instantiation into cukv's cubin cache) instead of one by one inside the tests."""
    from cukv import _backend
    from cukv import attention_prefill as ap

    ok, _ = _backend.gpu_available()
    if ok:
        arch = "sm_" + _backend.cupy().cuda.Device().compute_capability
        alt = {ap._fwd_expr(128, cfg, ap._LINEAR, 0) for cfg in ap.ALT_CONFIGS_128}
        try:
            ap.warm_cache(arch, [e for e in ap._PREFILL.expressions if e not in alt])
        except Exception:  # noqa: BLE001  (a compile error then surfaces in the test that needs it)
            pass
    yield


# ----------------------------------------------------------------------------------- data
class Case:
    """One ragged batch with the same keys in packed, padded and paged form (host arrays).

    Padding rows of the padded cache and every page no lane uses hold NaN (never read); block-table
    entries past a lane's last page are -1 (never read).
    """

    def __init__(self, rng, q_lens, k_lens, n_h, n_kvh, D, *, page_size=16, outliers=False):
        self.q_lens, self.k_lens = list(q_lens), list(k_lens)
        self.B = len(q_lens)
        self.D, self.n_h, self.n_kvh, self.S = D, n_h, n_kvh, page_size
        self.cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        self.cu_k = np.concatenate([[0], np.cumsum(k_lens)]).astype(np.int32)
        T_q, T_k = int(self.cu_q[-1]), int(self.cu_k[-1])
        self.q = activations(rng, (T_q, n_h, D), outliers=outliers)
        self.k = activations(rng, (T_k, n_kvh, D), outliers=outliers)
        self.v = activations(rng, (T_k, n_kvh, D), outliers=outliers)
        self.seqlens_k = np.asarray(k_lens, dtype=np.int32)
        pad = max(k_lens + [0]) + 3
        self.kp = np.full((self.B, pad, n_kvh, D), np.nan, dtype=BF16)
        self.vp = np.full((self.B, pad, n_kvh, D), np.nan, dtype=BF16)
        for b in range(self.B):
            s, e = self.cu_k[b], self.cu_k[b + 1]
            self.kp[b, :e - s] = self.k[s:e]
            self.vp[b, :e - s] = self.v[s:e]
        S = page_size
        n_used = [-(-L // S) for L in k_lens]
        max_pages = max(n_used + [0]) + 1
        P = sum(n_used) + 3
        perm = rng.permutation(P)
        self.bt = np.full((self.B, max_pages), -1, dtype=np.int32)
        self.kg = np.full((1, P * S, n_kvh, D), np.nan, dtype=BF16)
        self.vg = np.full((1, P * S, n_kvh, D), np.nan, dtype=BF16)
        j = 0
        for b in range(self.B):
            for pg in range(n_used[b]):
                pid = int(perm[j]); j += 1
                self.bt[b, pg] = pid
                lo, hi = pg * S, min((pg + 1) * S, k_lens[b])
                self.kg[0, pid * S:pid * S + hi - lo] = self.k[self.cu_k[b] + lo:self.cu_k[b] + hi]
                self.vg[0, pid * S:pid * S + hi - lo] = self.v[self.cu_k[b] + lo:self.cu_k[b] + hi]

    def args(self, layout, xp=np):
        """``(q, k, v, cu_seqlens_q, kwargs)`` for one layout in module ``xp``."""
        d = (lambda a: np.array(a, copy=True)) if xp is np else xp.asarray
        if layout == "packed":
            return d(self.q), d(self.k), d(self.v), d(self.cu_q), {"cu_seqlens_k": d(self.cu_k)}
        if layout == "padded":
            return d(self.q), d(self.kp), d(self.vp), d(self.cu_q), {"seqlens_k": d(self.seqlens_k)}
        return d(self.q), d(self.kg), d(self.vg), d(self.cu_q), {
            "seqlens_k": d(self.seqlens_k), "block_tables": d(self.bt), "page_size": self.S}

    def truth(self, causal=True, scale=None):
        return ref.prefill_attention_f64(self.q, self.k, self.v, self.cu_q, cu_seqlens_k=self.cu_k,
                                         causal=causal, softmax_scale=scale)


def naive(q, k, v, cu_q, cu_k, causal, scale):
    """Independent float64 formula: one query row and head at a time (SPEC §8.1/§8.2)."""
    T_q, n_h, D = q.shape
    n_kvh = k.shape[1]
    out = np.zeros((T_q, n_h, D))
    lse = np.full((T_q, n_h), -np.inf)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        Lq, Lk = q1 - q0, k1 - k0
        for r in range(Lq):
            last = r + Lk - Lq if causal else Lk - 1
            keys = [j for j in range(Lk) if j <= last]
            if not keys:
                continue
            for h in range(n_h):
                kh = h // (n_h // n_kvh)
                qv = q[q0 + r, h].astype(np.float64)
                s = [scale * float(np.dot(qv, k[k0 + j, kh].astype(np.float64))) for j in keys]
                m = max(s)
                p = [math.exp(x - m) for x in s]
                l = sum(p)
                o = sum(pi * v[k0 + j, kh].astype(np.float64) for pi, j in zip(p, keys)) / l
                out[q0 + r, h] = o
                lse[q0 + r, h] = m + math.log(l)
    return out, lse


def check_bounds(out, lse, o64, l64, what=""):
    """SPEC §11.2 attention bounds against the float64 truth."""
    o = to_host(out).astype(np.float64)
    assert o.shape == o64.shape
    assert np.isfinite(o).all(), f"{what}: non-finite output"
    err = np.abs(o - o64)
    lim = 2e-2 + 6e-3 * np.abs(o64)
    if not (err <= lim).all():
        i = np.unravel_index(np.argmax(err - lim), err.shape)
        raise AssertionError(f"{what}: {(err > lim).sum()} of {err.size} elements outside "
                             f"2e-2 + 6e-3|O64|; worst at {i}: got {o[i]}, exact {o64[i]}")
    assert np.linalg.norm(o - o64) <= 2 ** -7 * np.linalg.norm(o64) + 1e-12, f"{what}: L2 bound"
    if lse is not None:
        lg = to_host(lse).astype(np.float64)
        fin = np.isfinite(l64)
        assert (np.isfinite(lg) == fin).all() and (lg[~fin] == l64[~fin]).all(), f"{what}: lse inf"
        le = np.abs(lg[fin] - l64[fin])
        assert (le <= 2e-3 * np.maximum(1.0, np.abs(l64[fin]))).all(), \
            f"{what}: lse off by up to {le.max()}"


# ----------------------------------------------------------------------------------- CPU: reference
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_h,n_kvh", [(2, 2), (4, 1), (8, 2)])
def test_reference_matches_naive_formula(rng, causal, n_h, n_kvh):
    c = Case(rng, [1, 7, 13, 0, 5], [1, 12, 13, 3, 40], n_h, n_kvh, 64)
    scale = 1.0 / math.sqrt(64)
    o64, l64 = c.truth(causal)
    on, ln = naive(c.q, c.k, c.v, c.cu_q, c.cu_k, causal, float(np.float32(scale)))
    np.testing.assert_allclose(o64, on, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(l64), np.isinf(ln))
    fin = np.isfinite(ln)
    np.testing.assert_allclose(l64[fin], ln[fin], rtol=1e-12)


def test_reference_layouts_agree(rng):
    c = Case(rng, [3, 1, 9], [3, 20, 33], 4, 2, 64, page_size=8)
    res = [cukv.prefill_attention(*c.args(lay)[:4], **c.args(lay)[4], return_lse=True)
           for lay in ("packed", "padded", "paged")]
    for o, l in res[1:]:
        assert o.dtype == BF16 and l.dtype == np.float32
        np.testing.assert_array_equal(o.view(np.uint16), res[0][0].view(np.uint16))
        np.testing.assert_array_equal(l, res[0][1])


def test_reference_public_dtypes_and_scale(rng):
    c = Case(rng, [4, 6], [4, 9], 2, 1, 128)
    q, k, v, cu, kw = c.args("packed")
    out = cukv.prefill_attention(q, k, v, cu, **kw, softmax_scale=0.3)
    assert out.dtype == BF16 and out.shape == q.shape
    o64, _ = c.truth(True, 0.3)
    np.testing.assert_array_equal(out.astype(np.float32), o64.astype(np.float32).astype(BF16).astype(np.float32))


def test_reference_empty_keys_non_causal(rng):
    c = Case(rng, [3, 2], [0, 4], 2, 2, 64)
    q, k, v, cu, kw = c.args("packed")
    out, lse = cukv.prefill_attention(q, k, v, cu, **kw, causal=False, return_lse=True)
    assert (out[:3].astype(np.float32) == 0).all() and np.isneginf(lse[:3]).all()
    assert np.isfinite(lse[3:]).all()


def test_reference_quantized_equals_dequantize_then_attend(rng):
    c = Case(rng, [5, 9], [12, 9], 4, 2, 64, page_size=4)
    q, kp, vp, cu, kw = c.args("padded")
    kp = np.nan_to_num(kp.astype(np.float32)).astype(BF16)
    vp = np.nan_to_num(vp.astype(np.float32)).astype(BF16)
    for fmt in ("fp8", "fp8_head", "int4:g2"):
        qk = {}
        if fmt == "fp8_head":
            qk = {"qparam_k": np.full((2, 2), 0.01, np.float32), "qparam_v": np.full((2, 2), 0.02, np.float32)}
            ck = rcodec.quantize(kp.astype(np.float32), fmt, scale=np.float32(0.01))
            cv = rcodec.quantize(vp.astype(np.float32), fmt, scale=np.float32(0.02))
            dk = rcodec.dequantize(ck, fmt, scale=np.float32(0.01))
            dv = rcodec.dequantize(cv, fmt, scale=np.float32(0.02))
        else:
            ck = rcodec.quantize(kp.astype(np.float32), fmt)
            cv = rcodec.quantize(vp.astype(np.float32), fmt)
            dk, dv = rcodec.dequantize(ck, fmt), rcodec.dequantize(cv, fmt)
        got = cukv.prefill_attention(q, ck, cv, cu, **kw, fmt=fmt, **qk)
        want = cukv.prefill_attention(q, dk, dv, cu, **kw)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16), err_msg=fmt)


# ----------------------------------------------------------------------------------- bad input
def _base(rng):
    return Case(rng, [3, 5], [4, 5], 4, 2, 64, page_size=4)


def test_bad_inputs(rng):
    c = _base(rng)
    q, k, v, cu, kw = c.args("packed")
    f = cukv.prefill_attention
    with raises_arg(TypeError, OP, "q", "expected", "got"):
        f(q.astype(np.float32), k, v, cu, **kw)
    with raises_arg(ValueError, OP, "q", "D in"):
        f(q[..., :32], k[..., :32], v[..., :32], cu, **kw)
    with raises_arg(TypeError, OP, "cu_seqlens_q"):
        f(q, k, v, cu.astype(np.int64), **kw)
    with raises_arg(ValueError, OP, "cu_seqlens_k", "exactly one"):
        f(q, k, v, cu)
    with raises_arg(ValueError, OP, "cu_seqlens_k", "exactly one"):
        f(q, k, v, cu, **kw, seqlens_k=c.seqlens_k)
    with raises_arg(ValueError, OP, "k", "N_KVH"):
        f(q[:, :3], k, v, cu, **kw)
    with raises_arg(ValueError, OP, "v"):
        f(q, k, v[:-1], cu, **kw)
    with raises_arg(ValueError, OP, "cu_seqlens_q[2]", "packed length"):
        f(q[:-1], k, v, cu, **kw)
    bad = cu.copy(); bad[1] = 6; bad[2] = 5
    with raises_arg(ValueError, OP, "cu_seqlens_q[2]", "non-decreasing"):
        f(q[:5], k, v, bad, **kw)
    with raises_arg(ValueError, OP, "cu_seqlens_q", "L_q(b) <= L_k(b)"):
        f(q, k, v, cu, cu_seqlens_k=np.array([0, 2, 9], np.int32))
    f(q, k, v, cu, cu_seqlens_k=np.array([0, 2, 9], np.int32), causal=False)       # fine
    with raises_arg(ValueError, OP, "softmax_scale"):
        f(q, k, v, cu, **kw, softmax_scale=-1.0)
    with raises_arg(ValueError, OP, "fmt"):
        f(q, k, v, cu, **kw, fmt="fp8")
    qn = q.copy(); qn[2, 1, 3] = np.nan
    with raises_arg(ValueError, OP, "q[2, 1, 3]", "finite"):
        f(qn, k, v, cu, **kw, check_finite=True)
    f(qn, k, v, cu, **kw)                                                            # not checked
    with raises_arg(TypeError, OP, "k"):
        f(q, k.view(np.uint16), v, cu, **kw)

    q, kp, vp, cu, kw = c.args("padded")
    with raises_arg(ValueError, OP, "seqlens_k[1]", "capacity"):
        f(q, kp, vp, cu, seqlens_k=np.array([4, 99], np.int32))
    with raises_arg(ValueError, OP, "k"):
        f(q, kp[:1], vp[:1], cu, **kw)
    with raises_arg(ValueError, OP, "fmt"):
        f(q, kp.view(np.uint8), vp.view(np.uint8), cu, **kw)

    q, kg, vg, cu, kw = c.args("paged")
    bt = kw["block_tables"].copy(); bt[1, 1] = 10 ** 6
    with raises_arg(ValueError, OP, "block_tables[1, 1]", "page id"):
        f(q, kg, vg, cu, **{**kw, "block_tables": bt})
    bt = kw["block_tables"].copy(); bt[1, -1] = 10 ** 6                              # untouched entry
    f(q, kg, vg, cu, **{**kw, "block_tables": bt})
    with raises_arg(ValueError, OP, "page_size"):
        f(q, kg, vg, cu, **{**kw, "page_size": 0})
    with raises_arg(ValueError, OP, "k", "multiple of page_size"):
        f(q, kg[:, :-1], vg[:, :-1], cu, **kw)
    with raises_arg(ValueError, OP, "block_tables", "None with cu_seqlens_k"):
        f(q, c.k, c.v, cu, cu_seqlens_k=c.cu_k, block_tables=kw["block_tables"])


def test_validate_false_guards_reference(rng):
    """Adversarial index contents under validate=False: clamped, excluded, no exception."""
    c = _base(rng)
    q, kg, vg, cu, kw = c.args("paged")
    bt = kw["block_tables"].copy(); bt[1, 0] = -5
    out, lse = cukv.prefill_attention(q, kg, vg, np.array([0, 3, 99], np.int32), validate=False,
                                      seqlens_k=np.array([4, 1000], np.int32), block_tables=bt,
                                      page_size=c.S, return_lse=True)
    assert out.shape == q.shape and np.isfinite(out.astype(np.float32)).all()


# ----------------------------------------------------------------------------------- GPU
GPU_GRID = [
    # D, n_h, n_kvh, q_lens, k_extra
    (128, 8, 8, [1, 7, 128, 1000], [0, 5, 64, 37]),
    (128, 8, 2, [1, 7, 128, 1000], [3, 0, 200, 0]),
    (128, 16, 2, [1, 7, 128, 1000], [0, 130, 1, 64]),
    (64, 4, 4, [1, 7, 128, 300], [0, 9, 64, 129]),
    (64, 8, 1, [7, 300, 1], [1, 0, 70]),
    (256, 4, 1, [1, 7, 128, 300], [2, 0, 64, 65]),
    (256, 8, 2, [130, 7], [0, 300]),
]


@pytest.mark.parametrize("layout", ["packed", "padded", "paged"])
@pytest.mark.parametrize("D,n_h,n_kvh,q_lens,k_extra", GPU_GRID)
def test_gpu_matches_float64(gpu, rng, layout, D, n_h, n_kvh, q_lens, k_extra):
    k_lens = [a + b for a, b in zip(q_lens, k_extra)]
    c = Case(rng, q_lens, k_lens, n_h, n_kvh, D, page_size=[16, 64, 7][len(q_lens) % 3])
    o64, l64 = c.truth(True)
    q, k, v, cu, kw = c.args(layout, gpu)
    out, lse = cukv.prefill_attention(q, k, v, cu, **kw, return_lse=True)
    check_bounds(out, lse, o64, l64, f"{layout} D={D} {n_h}/{n_kvh}")


@pytest.mark.parametrize("causal", [True, False])
def test_gpu_layouts_agree(gpu, rng, causal):
    c = Case(rng, [1, 77, 300, 5], [1, 200, 300, 64], 8, 2, 128, page_size=32)
    res = {}
    for lay in ("packed", "padded", "paged"):
        q, k, v, cu, kw = c.args(lay, gpu)
        res[lay] = [to_host(a) for a in cukv.prefill_attention(q, k, v, cu, **kw, causal=causal,
                                                               return_lse=True)]
    np.testing.assert_array_equal(res["padded"][0].view(np.uint16), res["packed"][0].view(np.uint16))
    np.testing.assert_array_equal(res["padded"][1], res["packed"][1])
    o64, l64 = c.truth(causal)
    check_bounds(*res["paged"], o64, l64, "paged")
    diff = np.abs(res["paged"][0].astype(np.float32) - res["padded"][0].astype(np.float32))
    assert diff.max() <= 2 ** -7 * np.abs(res["padded"][0].astype(np.float32)).max()


def test_gpu_single_token(gpu, rng):
    c = Case(rng, [1, 1], [1, 1], 4, 2, 128)
    q, k, v, cu, kw = c.args("packed", gpu)
    out, lse = cukv.prefill_attention(q, k, v, cu, **kw, return_lse=True)
    want = np.repeat(c.v, 2, axis=1)                       # softmax over one key: out = v exactly
    np.testing.assert_array_equal(to_host(out).view(np.uint16), want.view(np.uint16))
    _, l64 = c.truth(True)
    np.testing.assert_allclose(to_host(lse), l64, rtol=2e-3, atol=2e-3)


def test_gpu_huge_score(gpu, rng):
    c = Case(rng, [5, 200], [9, 260], 4, 1, 128)
    c.q[0, 0, 0] = 1000.0
    c.q[10, 2, 5] = -1000.0
    o64, l64 = c.truth(True)
    q, k, v, cu, kw = c.args("packed", gpu)
    out, lse = cukv.prefill_attention(q, k, v, cu, **kw, return_lse=True)
    check_bounds(out, lse, o64, l64, "huge score")


def test_gpu_non_contiguous_and_misaligned(gpu, rng):
    c = Case(rng, [3, 130], [40, 130], 8, 2, 64)
    q, k, v, cu, kw = c.args("packed", gpu)
    want = to_host(cukv.prefill_attention(q, k, v, cu, **kw))
    T_q, T_k = q.shape[0], k.shape[0]
    fused = gpu.full((T_q, 8 + 2 * 2, 64), np.nan, dtype=BF16)         # [T, N_H + 2 N_KVH, D]
    fused[:, :8] = q
    qs = fused[:, :8]
    kv = gpu.full((T_k, 2, 2, 72), np.nan, dtype=BF16)                  # padded rows, k and v interleaved
    kv[:, 0, :, 4:68] = k
    kv[:, 1, :, 4:68] = v
    ks, vs = kv[:, 0, :, 4:68], kv[:, 1, :, 4:68]
    assert not qs.flags.c_contiguous and not ks.flags.c_contiguous
    got = to_host(cukv.prefill_attention(qs, ks, vs, cu, **kw))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    raw = gpu.zeros(q.nbytes + 64, dtype=np.uint8)                      # misaligned base address
    off = (-int(raw.data.ptr)) % 16 + 2
    qm = raw[off:off + q.nbytes].view(BF16).reshape(q.shape)
    qm[...] = q
    got = to_host(cukv.prefill_attention(qm, k, v, cu, **kw))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    # q from a fused buffer with an odd head stride: copied internally
    fused2 = gpu.zeros((T_q, 8, 65), dtype=BF16)
    fused2[:, :, :64] = q
    got = to_host(cukv.prefill_attention(fused2[:, :, :64], k, v, cu, **kw))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    # inputs are not modified
    np.testing.assert_array_equal(to_host(q).view(np.uint16), c.q.view(np.uint16))


def test_gpu_every_output_written(gpu, rng):
    """Outputs land in pool memory poisoned with NaN: every element must be overwritten."""
    c = Case(rng, [100, 1, 250], [130, 1, 250], 8, 2, 128)
    q, k, v, cu, kw = c.args("padded", gpu)
    T_q = q.shape[0]
    for _ in range(2):
        po = gpu.full((T_q, 8, 128), np.nan, dtype=BF16)
        pl = gpu.full((T_q, 8), np.nan, dtype=np.float32)
        ptrs = {int(po.data.ptr), int(pl.data.ptr)}
        del po, pl
        out, lse = cukv.prefill_attention(q, k, v, cu, **kw, return_lse=True)
        assert int(out.data.ptr) in ptrs and int(lse.data.ptr) in ptrs, "pool did not reuse the poison"
        assert bool(gpu.isfinite(out.astype(np.float32)).all()) and bool(gpu.isfinite(lse).all())


def test_gpu_empty_and_keyless_rows(gpu, rng):
    c = Case(rng, [3, 0, 2], [0, 0, 5], 2, 2, 64)
    q, k, v, cu, kw = c.args("packed", gpu)
    out, lse = cukv.prefill_attention(q, k, v, cu, **kw, causal=False, return_lse=True)
    o64, l64 = c.truth(False)
    check_bounds(out, lse, o64, l64, "keyless rows")
    assert (to_host(out)[:3].astype(np.float32) == 0).all() and np.isneginf(to_host(lse)[:3]).all()
    e = cukv.prefill_attention(q[:0], k[:0], v[:0], gpu.zeros(1, np.int32),
                               cu_seqlens_k=gpu.zeros(1, np.int32))
    assert e.shape == (0, 2, 64)
    e = cukv.prefill_attention(q, k, v, gpu.zeros(1, np.int32), cu_seqlens_k=gpu.zeros(1, np.int32),
                               validate=False)                              # B = 0: no lane owns a row
    assert (to_host(e).astype(np.float32) == 0).all()


def test_gpu_validation(gpu, rng):
    c = _base(rng)
    q, k, v, cu, kw = c.args("packed", gpu)
    bad = cu.copy(); bad[-1] = 7
    with raises_arg(ValueError, OP, "cu_seqlens_q[2]", "packed length"):
        cukv.prefill_attention(q, k, v, bad, **kw)
    with raises_arg(ValueError, OP, "q[1, 0, 0]", "finite"):
        qn = q.copy(); qn[1, 0, 0] = np.inf
        cukv.prefill_attention(qn, k, v, cu, **kw, check_finite=True)
    with raises_arg(TypeError, OP, "k"):
        cukv.prefill_attention(q, to_host(k), v, cu, **kw)


@pytest.mark.parametrize("page_size", [8, 64])
def test_gpu_validate_false_matches_reference(gpu, rng, page_size):
    """Adversarial contents under validate=False follow the reference's guards exactly."""
    c = Case(rng, [3, 70, 10], [40, 90, 10], 4, 2, 64, page_size=page_size)
    q, kg, vg, cu, kw = c.args("paged")
    kg = np.nan_to_num(kg.astype(np.float32)).astype(BF16)     # clamped lengths reach unused rows
    vg = np.nan_to_num(vg.astype(np.float32)).astype(BF16)
    bt = kw["block_tables"].copy()
    bt[1, 1] = -3                          # lane 1: the keys of its page 1 are excluded
    bt[2, 0] = 10 ** 6                     # lane 2: the keys of its page 0 are excluded
    cu_q = np.array([0, 3, 73, 80], np.int32)          # rows 80..82 belong to no lane
    lens = np.array([40, 90, 10 ** 6], np.int32)       # clamped to the capacity
    args = dict(seqlens_k=lens, block_tables=bt, page_size=c.S, validate=False, return_lse=True)
    o_ref, l_ref = ref.prefill_attention_f64(q, kg, vg, cu_q, seqlens_k=lens, block_tables=bt,
                                             page_size=c.S)
    d = gpu.asarray
    out, lse = cukv.prefill_attention(d(q), d(kg), d(vg), d(cu_q), **{**args, "seqlens_k": d(lens),
                                                                        "block_tables": d(bt)})
    check_bounds(out, lse, o_ref, l_ref, "validate=False")
    lanes = np.array([0, 3, 99, 5], np.int32)           # cu_seqlens_k past T_k: clamped
    q, k, v, cu, kw = c.args("packed")
    o_ref, l_ref = ref.prefill_attention_f64(q, k, v, cu, cu_seqlens_k=lanes, causal=False)
    out, lse = cukv.prefill_attention(d(q), d(k), d(v), d(cu), cu_seqlens_k=d(lanes), causal=False,
                                      validate=False, return_lse=True)
    check_bounds(out, lse, o_ref, l_ref, "validate=False packed")
    cu_bad = np.array([5, 8, 2, 4], np.int32)           # not sorted: rows 0, 1, 4 and 8.. owned by none
    qq, kk, vv = q[:10], k[:12], v[:12]
    cu_kb = np.array([0, 5, 7, 12], np.int32)
    o_ref, l_ref = ref.prefill_attention_f64(qq, kk, vv, cu_bad, cu_seqlens_k=cu_kb)
    out, lse = cukv.prefill_attention(d(qq), d(kk), d(vv), d(cu_bad), cu_seqlens_k=d(cu_kb),
                                      validate=False, return_lse=True)
    check_bounds(out, lse, o_ref, l_ref, "validate=False unsorted cu_seqlens_q")


QFMTS = [("fp8", False), ("fp8", True), ("fp8_head", False), ("int4:g1", False), ("int4:g4", False)]


@pytest.mark.parametrize("layout,page_size", [("padded", 16), ("paged", 16), ("paged", 128)])
@pytest.mark.parametrize("fmt,external", QFMTS)
def test_gpu_quantized_cache(gpu, rng, layout, page_size, fmt, external):
    """fmt= reads quantized caches; the result equals bf16 attention over the dequantized cache.
    page_size 16 looks pages up per key; 128 (a multiple of the key tile) once per tile."""
    D, n_kvh = 128, 2
    c = Case(rng, [1, 7, 200], [5, 7, 333], 8, n_kvh, D, page_size=page_size)
    q, kc, vc, cu, kw = c.args(layout)
    kc = np.nan_to_num(kc.astype(np.float32))
    vc = np.nan_to_num(vc.astype(np.float32))
    qk = {}
    if fmt == "fp8_head":
        B = c.B
        sk = rng.uniform(0.01, 0.05, (B, n_kvh)).astype(np.float32)
        sv = rng.uniform(0.01, 0.05, (B, n_kvh)).astype(np.float32)
        # per (lane, head) scales: paged rows take their lane's scale through the block table
        if layout == "paged":
            lane_of_row = np.zeros(kc.shape[1], np.int64)
            for b in range(B):
                for pg in range(c.bt.shape[1]):
                    if c.bt[b, pg] >= 0:
                        lane_of_row[c.bt[b, pg] * c.S:(c.bt[b, pg] + 1) * c.S] = b
            rk, rv = sk[lane_of_row][None], sv[lane_of_row][None]
        else:
            rk = np.broadcast_to(sk[:, None], kc.shape[:3])
            rv = np.broadcast_to(sv[:, None], kc.shape[:3])
        ck, cv = rcodec.quantize(kc, fmt, scale=rk), rcodec.quantize(vc, fmt, scale=rv)
        dk, dv = rcodec.dequantize(ck, fmt, scale=rk), rcodec.dequantize(cv, fmt, scale=rv)
        qk = {"qparam_k": sk, "qparam_v": sv}
    elif external:
        ck, wk = rcodec.quantize(kc, fmt, external_qparams=True)
        cv, wv = rcodec.quantize(vc, fmt, external_qparams=True)
        dk, dv = rcodec.dequantize(ck, fmt, qparams=wk), rcodec.dequantize(cv, fmt, qparams=wv)
        qk = {"qparam_k": wk, "qparam_v": wv}
    else:
        ck, cv = rcodec.quantize(kc, fmt), rcodec.quantize(vc, fmt)
        dk, dv = rcodec.dequantize(ck, fmt), rcodec.dequantize(cv, fmt)
    d = gpu.asarray
    dkw = {n: (d(a) if isinstance(a, np.ndarray) else a) for n, a in kw.items()}
    got, lse = cukv.prefill_attention(d(q), d(ck), d(cv), d(cu), **dkw, fmt=fmt, return_lse=True,
                                      **{n: d(a) for n, a in qk.items()})
    want, lse_w = cukv.prefill_attention(d(q), d(dk), d(dv), d(cu), **dkw, return_lse=True)
    o64, l64 = ref.prefill_attention_f64(q, dk, dv, cu, **kw)
    check_bounds(got, lse, o64, l64, f"{fmt} {layout}")
    np.testing.assert_array_equal(to_host(got).view(np.uint16), to_host(want).view(np.uint16))
    np.testing.assert_array_equal(to_host(lse), to_host(lse_w))
