"""cukv.quantize_qkv_per_head and cukv.fbgemm.quantize_qkv_per_head (cukv/per_head.py), the fp8_head
scale recipes (cukv/ref/per_head.py) and the chunked-prefill pipeline with the fp8_head writers.

Expected values are built token by token from SPEC §2.4/§7 with float32 scalars and the row codec
(``cukv.quantize(..., "fp8_head", scale=...)``), independently of ``cukv.ref.per_head``. The path is
bit-exact (SPEC §11.1, 0 budget): codes, cache bytes and float32 scales compare by bytes. Outputs,
caches and scale arrays start poisoned, so unwritten or wrongly written elements show.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import cukv
from cukv import fbgemm
from cukv.ref import per_head as ref
from cukv.ref.codec import S_MIN
from helpers import (BF16, POISON_BYTE, activations, assert_bytes_equal, misaligned_copy, poison,
                     raises_arg, to_device, to_host)

F32 = np.float32
OP = "quantize_qkv_per_head"
SENTINEL = F32(-7.25)


# ------------------------------------------------------------------------------ independent truth
def recipe(a) -> np.float32:
    """max(RN(min(a, 12000) / 448), S_MIN) on one float32 scalar, NaN propagating."""
    a = F32(a)
    m = a if (np.isnan(a) or a < F32(12000)) else F32(12000)
    s = F32(m / F32(448))
    return s if (np.isnan(s) or s > S_MIN) else S_MIN


def scales(amax, N_H, N_KVH):
    B = amax.shape[0]
    sq = np.array([recipe(np.nan if np.isnan(amax[b, :N_H]).any() else amax[b, :N_H].max())
                   for b in range(B)], F32)
    with np.errstate(over="ignore", invalid="ignore"):
        sk = np.array([[recipe(F32(64) * amax[b, N_H + h]) for h in range(N_KVH)] for b in range(B)], F32)
        sv = np.array([[recipe(F32(64) * amax[b, N_H + N_KVH + h]) for h in range(N_KVH)]
                       for b in range(B)], F32)
    return sq.reshape(B), sk.reshape(B, N_KVH), sv.reshape(B, N_KVH)


def expect(amax, xq, xk, xv, ck, cv, cpos, lane, pre, qk, qv, bt=None, S=64, valid=None):
    """Host expectation of (xq_fp8, scale_q, ck, cv, qk, qv) from poisoned inputs (copies)."""
    B_T, N_H, D = xq.shape
    B = amax.shape[0]
    N_KVH = (amax.shape[1] - N_H) // 2
    sq, sk, sv = scales(amax, N_H, N_KVH)
    xq8 = np.zeros((B_T, N_H, D), np.uint8)
    scale_q = np.zeros((B, N_KVH), F32)
    ck, cv = (None, None) if ck is None else (ck.copy(), cv.copy())
    qk, qv = (None, None) if qk is None else (qk.copy(), qv.copy())
    kv = qk is not None and xk is not None
    cap = None if ck is None else (bt.shape[1] * S if bt is not None else ck.shape[1])
    for i in range(B_T):
        b = i if lane is None else int(lane[i])
        c = int(cpos[i])
        if (valid is not None and i >= valid) or c < 0 or not 0 <= b < B or (cap is not None and c >= cap):
            continue
        writes = kv and not (pre is not None and pre[i])
        if writes:
            if bt is not None:
                page = int(bt[b, c // S])
                if not 0 <= page < ck.shape[1] // S:
                    continue
                idx = (0, page * S + c % S)
            else:
                idx = (b, c)
        xq8[i] = cukv.quantize(xq[i], "fp8_head", scale=np.full(N_H, sq[b], F32))
        scale_q[b] = sq[b]
        if writes:
            ck[idx] = cukv.quantize(xk[i], "fp8_head", scale=sk[b])
            cv[idx] = cukv.quantize(xv[i], "fp8_head", scale=sv[b])
            qk[b], qv[b] = sk[b], sv[b]
    return xq8, scale_q, ck, cv, qk, qv


def paged_tables(rng, B, max_pages, extra=3):
    P = B * max_pages + extra
    return rng.permutation(P)[:B * max_pages].astype(np.int32).reshape(B, max_pages), P


def check_all(got, want, what=""):
    names = ("xq_fp8", "scale_q", "cache_k", "cache_v", "qparam_k", "qparam_v")
    for n, g, w in zip(names, got, want):
        if w is None:
            continue
        assert_bytes_equal(g, w, what=f"{what} {n}", nan_equal=True)


# ------------------------------------------------------------------------------ scale recipes
def test_scale_recipes_spot_values():
    N_H, N_KVH = 2, 1
    a = np.array([[0, 0, 0, 0],                   # all zero: S_MIN
                  [1e9, 3, 1e9, 1e-30],           # capped at 12000; K 64*1e9 capped
                  [448, 224, 7, 0.5],             # exact quotients
                  [np.nan, 1, np.inf, 2]], F32)   # NaN propagates; +inf caps
    sq = ref.scale_q(a, N_H)
    sk, sv = ref.scale_kv(a, N_H, N_KVH)
    assert sq[0] == S_MIN and sk[0, 0] == S_MIN and sv[0, 0] == S_MIN
    assert sq[1] == F32(12000) / F32(448) and sk[1, 0] == F32(12000) / F32(448)
    assert sv[1, 0] == S_MIN
    assert sq[2] == F32(1.0) and sk[2, 0] == F32(1.0) and sv[2, 0] == F32(32.0) / F32(448)
    assert np.isnan(sq[3]) and sk[3, 0] == F32(12000) / F32(448) and sv[3, 0] == F32(128) / F32(448)
    w = scales(a, N_H, N_KVH)
    assert_bytes_equal(sq, w[0])
    assert_bytes_equal(sk, w[1])
    assert_bytes_equal(sv, w[2])


def test_scale_recipes_random(rng):
    a = np.abs(rng.standard_normal((9, 14)) * rng.choice([1e-6, 1, 300, 1e5], (9, 14))).astype(F32)
    w = scales(a, 6, 4)
    assert_bytes_equal(ref.scale_q(a, 6), w[0])
    sk, sv = ref.scale_kv(a, 6, 4)
    assert_bytes_equal(sk, w[1])
    assert_bytes_equal(sv, w[2])


# ------------------------------------------------------------------------------ FBGEMM grid
_GRID = list(itertools.product([1, 2, 3], [4, 8, 16], [4, 8], [512, 1024, 2048],
                               ["q", "FTF", "FFF", "TTT"], [2, 8], ["contig", "paged"]))
GRID = _GRID[5::17]          # ~50 cases; stride 17 is coprime to every axis length


@pytest.mark.parametrize("B,B_T,N_H,MAX_T,mode,N_KVH,layout", GRID)
def test_fbgemm_grid(xp, rng, B, B_T, N_H, MAX_T, mode, N_KVH, layout):
    """FBGEMM's quantize_qkv_per_head grid (B_T tokens per lane, contiguous lanes at random offsets),
    Q only or with cache writes under per-lane precomputed patterns, N_KVH in {2, 8}, paged caches.
    No head mapping is involved, so N_KVH > N_H is valid here."""
    D, S = 128, 64
    HH = N_H + 2 * N_KVH
    n = B * B_T
    xqkv = activations(rng, (n, HH, D))
    lane = np.repeat(np.arange(B, dtype=np.int32), B_T)
    start = rng.integers(0, MAX_T - B_T + 1, B)
    seqpos = (start[lane] + np.tile(np.arange(B_T), B)).astype(np.int32)
    amax = np.zeros((B + 1, HH), F32)                # an extra row FBGEMM's amax[:B] ignores
    for b in range(B):
        amax[b] = np.abs(xqkv[lane == b].astype(F32)).max(axis=(0, 2))
    amax[B] = 1e6
    pre = None if mode == "q" else np.array([mode[b] == "T" for b in lane], bool)
    if layout == "paged":
        bt, P = paged_tables(rng, B, MAX_T // S)
        shape = (1, P * S, N_KVH, D)
    else:
        bt, shape = None, (B, MAX_T, N_KVH, D)
    ck = np.full(shape, POISON_BYTE, np.uint8)
    cv = np.full(shape, POISON_BYTE, np.uint8)
    qk = np.full((B, N_KVH), SENTINEL) if mode != "q" else None
    qv = np.full((B, N_KVH), SENTINEL) if mode != "q" else None
    xq8 = np.full((n, N_H, D), POISON_BYTE, np.uint8)
    want = expect(amax[:B], xqkv[:, :N_H], xqkv[:, N_H:N_H + N_KVH], xqkv[:, N_H + N_KVH:], ck, cv,
                  seqpos, lane, pre, qk, qv, bt, S)
    d = lambda a: None if a is None else to_device(xp, a)  # noqa: E731
    dck, dcv, dqk, dqv, dxq8 = d(ck), d(cv), d(qk), d(qv), d(xq8)
    dx = d(xqkv)
    scale_q = fbgemm.quantize_qkv_per_head(d(amax), dx, d(seqpos), d(lane), d(pre), dck, dcv, dxq8, B,
                                           dqk, dqv, block_tables=d(bt), page_size=S)
    check_all((dxq8, scale_q, dck, dcv, dqk, dqv), want, f"{mode} {layout}")
    assert_bytes_equal(dx, xqkv)                       # input untouched


def test_fbgemm_none_means_all_precomputed(xp, rng):
    """is_precalculated_qparam=None: every token precomputed -> only Q quantized, caches untouched."""
    B, N_H, N_KVH, D = 2, 4, 2, 64
    xqkv = activations(rng, (6, N_H + 2 * N_KVH, D))
    lane = np.array([0, 0, 0, 1, 1, 1], np.int32)
    pos = np.array([0, 1, 2, 5, 6, 7], np.int32)
    amax = np.abs(rng.standard_normal((B, N_H + 2 * N_KVH))).astype(F32) * 3
    ck = np.full((B, 16, N_KVH, D), POISON_BYTE, np.uint8)
    qk = np.full((B, N_KVH), SENTINEL)
    d = lambda a: to_device(xp, a)  # noqa: E731
    dck, dcv, dqk, dqv = d(ck), d(ck), d(qk), d(qk)
    xq8 = xp.zeros((6, N_H, D), np.uint8)
    sq = fbgemm.quantize_qkv_per_head(d(amax), d(xqkv), d(pos), d(lane), None, dck, dcv, xq8, B, dqk, dqv)
    want = expect(amax, xqkv[:, :N_H], None, None, None, None, pos, lane, None, None, None)
    assert_bytes_equal(xq8, want[0])
    assert_bytes_equal(sq, want[1])
    for a, w in ((dck, ck), (dcv, ck), (dqk, qk), (dqv, qk)):
        assert_bytes_equal(a, w)


# ------------------------------------------------------------------------------ native API details
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("layout", ["contig", "paged"])
def test_native_ragged_mixed(xp, rng, D, layout):
    """Non-contiguous lanes (interleaved tokens), mixed flags inside a lane, -1 positions, a
    valid_tokens cut (int and array), GQA 8/2; only lanes with a non-precomputed kept token get scales."""
    B, N_H, N_KVH, S, max_pages = 4, 8, 2, 16, 4
    n = 23
    xq = activations(rng, (n, N_H, D))
    xk, xv = activations(rng, (n, N_KVH, D)), activations(rng, (n, N_KVH, D))
    lane = rng.integers(0, 3, n).astype(np.int32)          # lane 3 never used
    cpos = rng.permutation(S * max_pages)[:n].astype(np.int32)
    cpos[[2, 9]] = -1
    pre = rng.random(n) < 0.4
    pre[lane == 2] = True                                   # lane 2: all precomputed
    amax = np.abs(rng.standard_normal((B, N_H + 2 * N_KVH)) * 5).astype(F32)
    if layout == "paged":
        bt, P = paged_tables(rng, B, max_pages)
        shape = (1, P * S, N_KVH, D)
    else:
        bt, shape = None, (B, S * max_pages, N_KVH, D)
    ck = np.full(shape, POISON_BYTE, np.uint8)
    cv = np.full(shape, 0x5A, np.uint8)
    qk = np.full((B, N_KVH), SENTINEL)
    qv = np.full((B, N_KVH), SENTINEL * 2)
    for valid in (None, 17, "array"):
        vt = None if valid is None else (17 if valid == 17 else to_device(xp, np.array([15], np.int64)))
        vh = None if valid is None else (17 if valid == 17 else 15)
        want = expect(amax, xq, xk, xv, ck, cv, cpos, lane, pre, qk, qv, bt, S, vh)
        d = lambda a: None if a is None else to_device(xp, a)  # noqa: E731
        dck, dcv, dqk, dqv = d(ck), d(cv), d(qk), d(qv)
        out = poison(xp.empty((n, N_H, D), np.uint8))
        got = cukv.quantize_qkv_per_head(d(amax), d(xq), d(xk), d(xv), dck, dcv, d(cpos),
                                         token_lane=d(lane), scale_precomputed=d(pre), qparam_k=dqk,
                                         qparam_v=dqv, block_tables=d(bt), page_size=S,
                                         valid_tokens=vt, out=out)
        assert got[0] is out
        check_all((got[0], got[1], dck, dcv, dqk, dqv), want, f"valid={valid}")
        assert_bytes_equal(to_host(dqk)[3], qk[3])          # unused lane untouched
        assert_bytes_equal(to_host(dqk)[2], qk[2])          # all-precomputed lane untouched


def test_native_decode_q_only(xp, rng):
    """Decode: token_lane=None (token i is lane i), Q only, caches given but untouched."""
    B, N_H, N_KVH, D = 5, 4, 1, 128
    xq = activations(rng, (3, N_H, D))
    amax = np.abs(rng.standard_normal((B, N_H + 2))).astype(F32)
    ck = np.full((B, 32, N_KVH, D), POISON_BYTE, np.uint8)
    pos = np.array([3, -1, 31], np.int32)
    dck, dcv = to_device(xp, ck), to_device(xp, ck)
    q8, sq = cukv.quantize_qkv_per_head(to_device(xp, amax), to_device(xp, xq), None, None, dck, dcv,
                                        to_device(xp, pos))
    want = expect(amax, xq, None, None, None, None, pos, None, None, None, None)
    assert_bytes_equal(q8, want[0])
    assert_bytes_equal(sq, want[1])
    assert (to_host(sq)[[1, 3, 4]] == 0).all()
    assert_bytes_equal(dck, ck)
    # caches may be None in a Q-only call
    q8b, _ = cukv.quantize_qkv_per_head(to_device(xp, amax), to_device(xp, xq), None, None, None, None,
                                        to_device(xp, pos))
    assert_bytes_equal(q8b, want[0])


def test_unvalidated_adversarial_indices(xp, rng):
    """validate=False: out-of-range lanes, positions and page ids skip their token (zero Q rows, nothing
    written); guard bands around the caches keep their sentinels."""
    B, N_H, N_KVH, D, S = 3, 4, 2, 64, 16
    n = 8
    xq = activations(rng, (n, N_H, D))
    xk, xv = activations(rng, (n, N_KVH, D)), activations(rng, (n, N_KVH, D))
    lane = np.array([0, 5, -1, 1, 2, 2, 1, 0], np.int32)
    cpos = np.array([0, 1, 2, 64, -9, 3, 17, 33], np.int32)
    bt, P = paged_tables(rng, B, 4)
    bt[1, 1] = 10 ** 7                           # token 6 (lane 1, pos 17) -> bad page
    bt[0, 2] = -2                                # token 7 (lane 0, pos 33) -> bad page
    amax = np.abs(rng.standard_normal((B, N_H + 2 * N_KVH))).astype(F32)
    G = 4096
    buf = np.full(P * S * N_KVH * D + 2 * G, POISON_BYTE, np.uint8)
    ck = buf[G:-G].reshape(1, P * S, N_KVH, D)
    cv = np.full((1, P * S, N_KVH, D), 0x5A, np.uint8)
    qk, qv = np.full((B, N_KVH), SENTINEL), np.full((B, N_KVH), SENTINEL)
    want = expect(amax, xq, xk, xv, ck, cv, cpos, lane, None, qk, qv, bt, S)
    dbuf = to_device(xp, buf)
    dck = dbuf[G:-G].reshape(1, P * S, N_KVH, D)
    d = lambda a: to_device(xp, a)  # noqa: E731
    dcv, dqk, dqv = d(cv), d(qk), d(qv)
    got = cukv.quantize_qkv_per_head(d(amax), d(xq), d(xk), d(xv), dck, dcv, d(cpos), token_lane=d(lane),
                                     qparam_k=dqk, qparam_v=dqv, block_tables=d(bt), page_size=S,
                                     validate=False)
    check_all((got[0], got[1], dck, dcv, dqk, dqv), want)
    h = to_host(dbuf)
    assert (h[:G] == POISON_BYTE).all() and (h[-G:] == POISON_BYTE).all()
    assert (to_host(got[0])[[1, 2, 3, 4, 6, 7]] == 0).all()
    with raises_arg(ValueError, OP, "token_lane[1]", "[0, 3)", "5"):
        cukv.quantize_qkv_per_head(d(amax), d(xq), d(xk), d(xv), dck, dcv, d(cpos), token_lane=d(lane),
                                   qparam_k=dqk, qparam_v=dqv, block_tables=d(bt), page_size=S)
    lane2 = np.array([0, 1, 1, 1, 2, 2, 1, 0], np.int32)
    with raises_arg(ValueError, OP, "cache_pos[3]", "64"):
        cukv.quantize_qkv_per_head(d(amax), d(xq), d(xk), d(xv), dck, dcv, d(cpos), token_lane=d(lane2),
                                   qparam_k=dqk, qparam_v=dqv, block_tables=d(bt), page_size=S)
    cpos2 = np.array([0, 1, 2, 3, -1, 3, 17, 33], np.int32)
    with raises_arg(ValueError, OP, "block_tables[0, 2]", "-2"):
        cukv.quantize_qkv_per_head(d(amax), d(xq), d(xk), d(xv), dck, dcv, d(cpos2),
                                   token_lane=d(lane2), qparam_k=dqk, qparam_v=dqv,
                                   block_tables=d(bt), page_size=S)
    # the same bad entries are fine when the tokens are precomputed (no entry is touched)
    pre = np.array([False, False, False, False, False, False, True, True])
    cukv.quantize_qkv_per_head(d(amax), d(xq), d(xk), d(xv), dck, dcv, d(cpos2), token_lane=d(lane2),
                               scale_precomputed=d(pre), qparam_k=dqk, qparam_v=dqv,
                               block_tables=d(bt), page_size=S)


def test_nonfinite_amax_confined(xp, rng):
    """SPEC §11.4: a NaN amax poisons its lane's Q (or one KV head's rows) only; +inf caps."""
    B, N_H, N_KVH, D = 3, 4, 2, 64
    n = 6
    xq = activations(rng, (n, N_H, D))
    xk, xv = activations(rng, (n, N_KVH, D)), activations(rng, (n, N_KVH, D))
    lane = np.array([0, 0, 1, 1, 2, 2], np.int32)
    cpos = np.array([0, 1, 0, 1, 0, 1], np.int32)
    amax = np.abs(rng.standard_normal((B, N_H + 2 * N_KVH))).astype(F32)
    amax[1, 2] = np.nan                 # lane 1 Q
    amax[2, N_H + 1] = np.nan           # lane 2 K head 1
    amax[0, N_H + N_KVH] = np.inf       # lane 0 V head 0: capped scale
    ck = np.zeros((B, 4, N_KVH, D), np.uint8)
    qk = np.zeros((B, N_KVH), F32)
    want = expect(amax, xq, xk, xv, ck, ck, cpos, lane, None, qk, qk)
    d = lambda a: to_device(xp, a)  # noqa: E731
    dck, dcv, dqk, dqv = d(ck), d(ck), d(qk), d(qk)
    got = cukv.quantize_qkv_per_head(d(amax), d(xq), d(xk), d(xv), dck, dcv, d(cpos), token_lane=d(lane),
                                     qparam_k=dqk, qparam_v=dqv)
    check_all((got[0], got[1], dck, dcv, dqk, dqv), want)
    q8 = to_host(got[0])
    assert (q8[2:4] == 0x7F).all() and not (q8[[0, 1, 4, 5]] == 0x7F).any()
    k = to_host(dck)
    assert (k[2, :2, 1] == 0x7F).all() and not (k[2, :2, 0] == 0x7F).any()
    assert to_host(dqv)[0, 0] == F32(12000) / F32(448)


# ------------------------------------------------------------------------------ kernels only
def test_kernel_scalar_path_and_views(gpu, rng):
    """Misaligned inputs/outputs take the scalar path; strided views behave as contiguous copies."""
    B, N_H, N_KVH, D = 2, 4, 2, 128
    n = 7
    xq = activations(rng, (n, N_H, D))
    xk, xv = activations(rng, (n, N_KVH, D)), activations(rng, (n, N_KVH, D))
    lane = np.array([0, 0, 1, 1, 1, 0, 1], np.int32)
    cpos = np.arange(n, dtype=np.int32)
    amax = np.abs(rng.standard_normal((B, N_H + 2 * N_KVH)) * 4).astype(F32)
    ck = np.zeros((B, 8, N_KVH, D), np.uint8)
    qk = np.zeros((B, N_KVH), F32)
    want = expect(amax, xq, xk, xv, ck, ck, cpos, lane, None, qk, qk)
    for how in ("misaligned", "transpose"):
        if how == "misaligned":
            dq, dk, dv = (misaligned_copy(gpu, a, 2) for a in (xq, xk, xv))
            dck, dcv = misaligned_copy(gpu, ck, 2), misaligned_copy(gpu, ck, 2)
            out = misaligned_copy(gpu, np.zeros((n, N_H, D), np.uint8), 1)
        else:
            dq = gpu.asarray(np.ascontiguousarray(xq.transpose(1, 0, 2))).transpose(1, 0, 2)
            dk = gpu.asarray(np.ascontiguousarray(xk[:, ::-1]))[:, ::-1]
            dv = gpu.asarray(xv)
            dck, dcv = gpu.asarray(ck), gpu.asarray(ck)
            out = gpu.zeros((n, N_H, D), np.uint8)
        dqk, dqv = gpu.asarray(qk), gpu.asarray(qk)
        got = cukv.quantize_qkv_per_head(gpu.asarray(amax), dq, dk, dv, dck, dcv, gpu.asarray(cpos),
                                         token_lane=gpu.asarray(lane), qparam_k=dqk, qparam_v=dqv,
                                         out=out)
        check_all((got[0], got[1], dck, dcv, dqk, dqv), want, how)


@pytest.mark.parametrize("D", [64, 128, 256])
def test_kernel_all_bf16_values(gpu, rng, D):
    """Every bf16 bit pattern (NaN of both signs, +-Inf, subnormals, every e4m3 rounding tie) through
    the Q and K/V encoders with exact scales 1 and 2^-4, for each head-slot layout (D)."""
    N_H, N_KVH = 2, 1
    n = 65536 // (2 * D)
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    x = bits.view(BF16).reshape(n, 2, D)                # n tokens x 2 heads x D: every bf16 value
    xq = x
    xk, xv = x[:, :1], x[:, 1:]
    lane = np.repeat(np.arange(2, dtype=np.int32), n // 2)
    pos = np.tile(np.arange(n // 2, dtype=np.int32), 2)
    amax = np.array([[448, 448, 7, 7], [28, 1, 28 / 64, 28 / 64]], F32)   # scales 1 and 2^-4
    ck = np.zeros((2, n // 2, N_KVH, D), np.uint8)
    qk = np.zeros((2, N_KVH), F32)
    want = expect(amax, xq, xk, xv, ck, ck, pos, lane, None, qk, qk)
    assert want[1][0, 0] == 1 and want[1][1, 0] == F32(2 ** -4) and want[4][0, 0] == 1
    d = gpu.asarray
    dck, dcv, dqk, dqv = d(ck), d(ck), d(qk), d(qk)
    got = cukv.quantize_qkv_per_head(d(amax), d(xq), d(np.ascontiguousarray(xk)),
                                     d(np.ascontiguousarray(xv)), dck, dcv, d(pos), token_lane=d(lane),
                                     qparam_k=dqk, qparam_v=dqv)
    check_all((got[0], got[1], dck, dcv, dqk, dqv), want)


@pytest.mark.parametrize("heads", [4, 8])
@pytest.mark.parametrize("N_H,N_KVH,D,n", [(32, 8, 128, 4096), (5, 1, 64, 96), (4, 2, 2048, 8)])
def test_kernel_many_tokens(gpu, rng, heads, N_H, N_KVH, D, n, monkeypatch):
    """Larger batches (4096 tokens, 32/8 heads), odd head counts and D = 2048 (one head slot, several
    rounds per thread) against the NumPy path of the op, for both heads-per-thread plans."""
    from cukv import per_head

    monkeypatch.setattr(per_head, "HEADS", heads)
    B, T = 4, max(1024, n)
    xqkv = activations(rng, (n, N_H + 2 * N_KVH, D))
    lane = np.repeat(np.arange(B, dtype=np.int32), n // B)
    pos = np.tile(np.arange(n // B, dtype=np.int32), B)
    pre = (lane % 2 == 1)
    amax = np.abs(rng.standard_normal((B, N_H + 2 * N_KVH)) * 3).astype(F32)
    res = []
    for xp in (np, gpu):
        d = lambda a: to_device(xp, a)  # noqa: E731
        ck = xp.zeros((B, T, N_KVH, D), np.uint8)
        cv = xp.zeros((B, T, N_KVH, D), np.uint8)
        qk, qv = xp.zeros((B, N_KVH), F32), xp.zeros((B, N_KVH), F32)
        x = d(xqkv)
        q8, sq = cukv.quantize_qkv_per_head(d(amax), x[:, :N_H], x[:, N_H:N_H + N_KVH], x[:, N_H + N_KVH:],
                                            ck, cv, d(pos), token_lane=d(lane), scale_precomputed=d(pre),
                                            qparam_k=qk, qparam_v=qv)
        res.append([to_host(a) for a in (q8, sq, ck, cv, qk, qv)])
    for a, b in zip(*res):
        assert_bytes_equal(a, b)


# ------------------------------------------------------------------------------ pipeline (writers)
def _writer_fp8_head_available():
    try:
        xq = np.zeros((1, 1, 64), BF16)
        xk = np.zeros((1, 1, 64), BF16)
        c = np.zeros((1, 4, 1, 64), np.uint8)
        s = np.ones((1, 1), F32)
        cukv.write_kv_prefill(xq, xk, xk.copy(), c, c.copy(), np.zeros(1, np.int32),
                              np.zeros(1, np.int32), fmt="fp8_head", amax=np.zeros((1, 3), F32),
                              qparam_k=s, qparam_v=s.copy())
        return True
    except NotImplementedError:
        return False


@pytest.mark.parametrize("layout", ["contig", "paged"])
def test_chunked_prefill_equals_one_shot(xp, rng, layout):
    """SPEC §7: prefill in two chunks (chunk 2 precomputed with chunk 1's scales) gives the same cache
    bytes as a one-shot prefill that uses chunk 1's scales. NoPE and no qk_norm, so the fp32 K the
    writer quantizes equals the bf16 K written back for quantize_qkv_per_head."""
    if not _writer_fp8_head_available():
        pytest.skip("write_kv_prefill has no fp8_head path yet")
    B, N_H, N_KVH, D, S = 2, 8, 2, 128, 16
    L, L1 = np.array([40, 21]), np.array([17, 16])
    T = 64
    tok = [(b, t) for b in range(B) for t in range(L[b])]
    lane = np.array([b for b, _ in tok], np.int32)
    pos = np.array([t for _, t in tok], np.int32)
    first = np.array([t < L1[b] for b, t in tok])
    xq = activations(rng, (len(tok), N_H, D))
    xk, xv = activations(rng, (len(tok), N_KVH, D)), activations(rng, (len(tok), N_KVH, D))
    if layout == "paged":
        bt, P = paged_tables(rng, B, T // S)
        shape, kw = (1, P * S, N_KVH, D), {"block_tables": to_device(xp, bt), "page_size": S}
    else:
        shape, kw = (B, T, N_KVH, D), {}
    d = lambda a: to_device(xp, a)  # noqa: E731

    def fresh():
        return (d(np.full(shape, POISON_BYTE, np.uint8)), d(np.full(shape, POISON_BYTE, np.uint8)),
                d(np.full((B, N_KVH), SENTINEL)), d(np.full((B, N_KVH), SENTINEL)))

    ck, cv, sk, sv = fresh()
    for chunk, precomputed in ((first, False), (~first, True)):
        idx = np.flatnonzero(chunk)
        amax = xp.zeros((B, N_H + 2 * N_KVH), F32)
        pre = d(np.full(idx.size, precomputed))
        q, k, v = d(xq[idx]), d(xk[idx]), d(xv[idx])
        q_out = cukv.write_kv_prefill(q, k, v, ck, cv, d(lane[idx]), d(pos[idx]), fmt="fp8_head",
                                      amax=amax, qparam_k=sk, qparam_v=sv, scale_precomputed=pre, **kw)
        if not precomputed:
            amax1 = to_host(amax)
        q8, sq = cukv.quantize_qkv_per_head(amax, q_out, k, v, ck, cv, d(pos[idx]), token_lane=d(lane[idx]),
                                            scale_precomputed=pre, qparam_k=sk, qparam_v=sv, **kw)
    ref_sk, ref_sv = ref.scale_kv(amax1, N_H, N_KVH)
    assert_bytes_equal(sk, ref_sk)
    assert_bytes_equal(sv, ref_sv)
    ck2, cv2, _, _ = fresh()
    amax = xp.zeros((B, N_H + 2 * N_KVH), F32)
    cukv.write_kv_prefill(d(xq), d(xk), d(xv), ck2, cv2, d(lane), d(pos), fmt="fp8_head", amax=amax,
                          qparam_k=sk.copy(), qparam_v=sv.copy(),
                          scale_precomputed=d(np.ones(len(tok), bool)), **kw)
    assert_bytes_equal(ck, ck2, what="K cache chunked vs one-shot")
    assert_bytes_equal(cv, cv2, what="V cache chunked vs one-shot")
    # and the dequantized logical cache is the same through dequantize_cache
    sl = d(L.astype(np.int32))
    a = cukv.dequantize_cache(ck, cv, sl, "fp8_head", qparam_k=sk, qparam_v=sv, **kw)
    b = cukv.dequantize_cache(ck2, cv2, sl, "fp8_head", qparam_k=sk, qparam_v=sv, **kw)
    assert_bytes_equal(a[0], b[0])
    assert_bytes_equal(a[1], b[1])


def test_pipeline_gpu(gpu, rng):
    """write_kv_prefill(fp8_head, RoPE, qk_norm) then quantize_qkv_per_head on the GPU. The writer's
    outputs are the writer's to test (RoPE/norm budgets); here the quantizer, given the GPU writer's
    amax / xq_out / written-back K, must equal the NumPy path byte for byte (0 budget), and amax must
    agree with the NumPy writer within the qk_norm tolerance (rtol 1e-6, SPEC §11.1)."""
    if not _writer_fp8_head_available():
        pytest.skip("write_kv_prefill has no fp8_head path yet")
    B, N_H, N_KVH, D, T = 3, 8, 2, 128, 64
    n = 50
    lane = np.sort(rng.integers(0, B, n)).astype(np.int32)
    pos = np.concatenate([np.arange((lane == b).sum()) for b in range(B)]).astype(np.int32)
    xq = activations(rng, (n, N_H, D))
    xk, xv = activations(rng, (n, N_KVH, D)), activations(rng, (n, N_KVH, D))
    amaxes = []
    for xp in (np, gpu):
        d = lambda a: to_device(xp, a)  # noqa: E731
        ck, cv = xp.zeros((B, T, N_KVH, D), np.uint8), xp.zeros((B, T, N_KVH, D), np.uint8)
        sk, sv = xp.zeros((B, N_KVH), F32), xp.zeros((B, N_KVH), F32)
        amax = xp.zeros((B, N_H + 2 * N_KVH), F32)
        k = d(xk)
        q_out = cukv.write_kv_prefill(d(xq), k, d(xv), ck, cv, d(lane), d(pos), fmt="fp8_head",
                                      pos_enc=cukv.RoPE(500000.0), qk_norm=True, amax=amax,
                                      qparam_k=sk, qparam_v=sv)
        amaxes.append(to_host(amax))
    np.testing.assert_allclose(amaxes[1], amaxes[0], rtol=1e-6, atol=0)
    # the quantizer on the GPU writer's outputs, both paths
    inputs = [to_host(a) for a in (amax, q_out, k)]
    res = []
    for xp in (np, gpu):
        d = lambda a: to_device(xp, a)  # noqa: E731
        ck, cv = xp.zeros((B, T, N_KVH, D), np.uint8), xp.zeros((B, T, N_KVH, D), np.uint8)
        sk, sv = xp.zeros((B, N_KVH), F32), xp.zeros((B, N_KVH), F32)
        q8, sq = cukv.quantize_qkv_per_head(d(inputs[0]), d(inputs[1]), d(inputs[2]), d(xv), ck, cv,
                                            d(pos), token_lane=d(lane), qparam_k=sk, qparam_v=sv)
        res.append([to_host(a) for a in (q8, sq, ck, cv, sk, sv)])
    for a, b in zip(*res):
        assert_bytes_equal(b, a)


# ------------------------------------------------------------------------------ bad input
def test_bad_input(xp, rng):
    B, N_H, N_KVH, D = 2, 4, 2, 64
    d = lambda a: to_device(xp, a)  # noqa: E731
    amax = d(np.ones((B, N_H + 2 * N_KVH), F32))
    xq = d(activations(rng, (3, N_H, D)))
    xk = d(activations(rng, (3, N_KVH, D)))
    ck = xp.zeros((B, 8, N_KVH, D), np.uint8)
    cv = xp.zeros((B, 8, N_KVH, D), np.uint8)
    pos = d(np.array([0, 1, 2], np.int32))
    lane = d(np.array([0, 1, 1], np.int32))
    qk, qv = xp.zeros((B, N_KVH), F32), xp.zeros((B, N_KVH), F32)
    f = cukv.quantize_qkv_per_head
    with raises_arg(TypeError, OP, "amax", "float32"):
        f(amax.astype(np.float64), xq, xk, xk, ck, cv, pos, token_lane=lane)
    with raises_arg(ValueError, OP, "amax", "N_KVH >= 1"):
        f(amax[:, :7], xq, xk, xk, ck, cv, pos, token_lane=lane)
    with raises_arg(TypeError, OP, "xq", "bfloat16"):
        f(amax, xq.astype(np.float32), xk, xk, ck, cv, pos, token_lane=lane)
    with raises_arg(ValueError, OP, "xk", "[B_T=3, N_KVH=2, D=64]"):
        f(amax, xq, xk[:, :1], xk[:, :1], ck, cv, pos, token_lane=lane)
    with raises_arg(ValueError, OP, "xv", "both"):
        f(amax, xq, xk, None, ck, cv, pos, token_lane=lane)
    with raises_arg(ValueError, OP, "cache_k", "[B, MAX_T, N_KVH, 64]"):
        f(amax, xq, xk, xk, ck[..., :60], cv[..., :60], pos, token_lane=lane)
    with raises_arg(ValueError, OP, "cache_k", "B=2"):
        f(amax, xq, xk, xk, ck[:1], cv[:1], pos, token_lane=lane)
    with raises_arg(ValueError, OP, "xk", "qparam_k"):
        f(amax, xq, None, None, ck, cv, pos, token_lane=lane, qparam_k=qk, qparam_v=qv)
    with raises_arg(ValueError, OP, "qparam_v", "both"):
        f(amax, xq, xk, xk, ck, cv, pos, token_lane=lane, qparam_k=qk)
    with raises_arg(TypeError, OP, "cache_pos", "int32"):
        f(amax, xq, xk, xk, ck, cv, pos.astype(np.int64), token_lane=lane)
    with raises_arg(ValueError, OP, "amax", "B >= B_T=3"):
        f(amax, xq, xk, xk, ck, cv, pos)
    with raises_arg(TypeError, OP, "scale_precomputed", "bool"):
        f(amax, xq, xk, xk, ck, cv, pos, token_lane=lane, scale_precomputed=pos)
    with raises_arg(ValueError, OP, "out", "uint8 [B_T=3, N_H=4, D=64]"):
        f(amax, xq, xk, xk, ck, cv, pos, token_lane=lane, out=xp.zeros((3, 4, 32), np.uint8))
    with raises_arg(ValueError, OP, "cache_pos[2]", "[0, 8)"):
        f(amax, xq, xk, xk, ck, cv, d(np.array([0, 1, 8], np.int32)), token_lane=lane)
    with raises_arg(ValueError, OP, "amax[1, 3]", ">= 0"):
        bad = to_host(amax).copy()
        bad[1, 3] = -1
        f(d(bad), xq, xk, xk, ck, cv, pos, token_lane=lane)
    with raises_arg(ValueError, OP, "valid_tokens", ">= 0"):
        f(amax, xq, xk, xk, ck, cv, pos, token_lane=lane, valid_tokens=-1)
    with raises_arg(ValueError, OP, "cache_k", "overlaps"):
        f(amax, xq, xk, xk, ck, ck, pos, token_lane=lane, qparam_k=qk, qparam_v=qv)
    with raises_arg(ValueError, "quantize_qkv_per_head", "cache_format", "fp8_head"):
        fbgemm.quantize_qkv_per_head(amax, d(activations(rng, (3, 8, D))), pos, lane, None, ck, cv,
                                     xp.zeros((3, N_H, D), np.uint8), B, cache_format="fp8")
    with raises_arg(ValueError, "quantize_qkv_per_head", "XQKV[0, 0, 0]", "finite"):
        x = activations(rng, (3, 8, D))
        x[0, 0, 0] = np.nan
        fbgemm.quantize_qkv_per_head(amax, d(x), pos, lane, None, ck, cv,
                                     xp.zeros((3, N_H, D), np.uint8), B, check_finite=True)
