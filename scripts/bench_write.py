"""Benchmark section ``write``: ``cukv.write_kv_prefill`` / ``write_kv_decode`` vs torch of the same math.

Shapes (issue 3): 32768 tokens, 32 Q / 8 KV heads, D 128, RoPE (theta 500000) with Llama-3.1
scaling, qk_norm off and on, caches fp8 (inline qparams) and int4:g4. Inputs are slices of one fused
``[B_T, 48, 128]`` bf16 buffer (the usual QKV projection output). Prefill: 8 lanes x 4096 tokens into
a contiguous cache (65536 rows per lane, the decode cache's size, so each torch peer compiles once). Decode: 32768 lanes, one row each at a random position < 1024, into a paged cache
(page size 16, one physical page per lane). Calls use ``validate=False`` (the CUDA-graph form).

Minimal bytes: Q, K, V read once + ``xq_out`` and the K/V cache rows written once (indices are not
counted). The peers do the same math in torch: float64 angle, cos/sin and rotation, fp32 ``y``,
qk_norm, the fp8 / int4 row encoders of ``bench_codec`` and an index_put into the cache;
``torch.compile`` is the peer, torch eager goes to ``extra``. ``CUKV_BENCH_WRITE_PEERS=0`` skips the
peers (their compiles take minutes).
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np

import cukv
from bench_codec import torch_quantize_fp8, torch_quantize_int4

BF16 = ml_dtypes.bfloat16
N_TOK, N_H, N_KV, D = 32768, 32, 8, 128
PREFILL_LANES = 8
DEC_CAP, DEC_PAGE = 1024, 16
POS_ENC = cukv.RoPE(500000.0, scaling=cukv.Llama31Scaling())
_INT4_G4 = torch_quantize_int4(4)


_PEERS: dict = {}


def _torch_write(quant, norm, eps=0.0):
    key = (quant.__name__, norm)
    if key not in _PEERS:
        _PEERS[key] = _make_torch_write(quant, norm, eps)
    return _PEERS[key]


def _make_torch_write(quant, norm, eps):
    def torch_write(xq, xk, xv, ck_rows, cv_rows, slots, pos, freqs):
        """The SPEC §4-§5 write in torch: returns xq_out, scatters K/V rows into the caches."""
        import torch  # noqa: PLC0415

        a = pos.double()[:, None] * freqs[None, :]
        c, s = torch.cos(a)[:, None, :], torch.sin(a)[:, None, :]

        def rot(x):
            x = x.double()
            xi, xj = x[..., 0::2], x[..., 1::2]
            return torch.stack([xi * c - xj * s, xj * c + xi * s], -1).flatten(-2).float()

        def nrm(y):
            return y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps) if norm else y

        yq, yk = nrm(rot(xq)), nrm(rot(xk))
        ck_rows[slots] = quant(yk)
        cv_rows[slots] = quant(xv.float())
        return yq.to(torch.bfloat16)

    torch_write.__name__ = f"torch_write_{quant.__name__}{'_norm' if norm else ''}"
    return torch_write


def _setup(ctx, decode, fmt):
    cp = ctx.cp
    rng = np.random.default_rng(0)
    buf = cp.random.standard_normal((N_TOK, N_H + 2 * N_KV, D), dtype=cp.float32).astype(BF16)
    xq, xk, xv = buf[:, :N_H], buf[:, N_H:N_H + N_KV], buf[:, N_H + N_KV:]
    R = cukv.row_bytes(fmt, D)
    if decode:
        lanes = np.arange(N_TOK, dtype=np.int32)
        pos = rng.integers(0, DEC_CAP, N_TOK).astype(np.int32)
        bt = np.full((N_TOK, DEC_CAP // DEC_PAGE), -1, np.int32)
        phys = rng.permutation(N_TOK).astype(np.int32)
        bt[lanes, pos // DEC_PAGE] = phys
        slots = phys.astype(np.int64) * DEC_PAGE + pos % DEC_PAGE
        shape = (1, N_TOK * DEC_PAGE, N_KV, R)
        kw = dict(block_tables=cp.asarray(bt), page_size=DEC_PAGE)
    else:
        per = N_TOK // PREFILL_LANES
        cap = N_TOK * DEC_PAGE // PREFILL_LANES     # same cache size as decode: the peers compile once
        lanes = np.repeat(np.arange(PREFILL_LANES), per).astype(np.int32)
        pos = np.tile(np.arange(per), PREFILL_LANES).astype(np.int32)
        slots = lanes.astype(np.int64) * cap + pos
        shape = (PREFILL_LANES, cap, N_KV, R)
        kw = {}
    ck = cp.zeros(shape, cp.uint8)
    cv = cp.zeros(shape, cp.uint8)
    return buf, xq, xk, xv, ck, cv, cp.asarray(lanes), cp.asarray(pos), cp.asarray(slots), kw


def bench_write(ctx):
    cp = ctx.cp
    for decode in (False, True):
        for fmt in ("fp8", "int4:g4"):
            buf, xq, xk, xv, ck, cv, lanes, pos, slots, kw = _setup(ctx, decode, fmt)
            out = cp.empty(xq.shape, BF16)
            nbytes = buf.nbytes + out.nbytes + 2 * N_TOK * N_KV * ck.shape[-1]
            quant = torch_quantize_fp8 if fmt == "fp8" else _INT4_G4
            for norm in (False, True):
                if decode:
                    def call():
                        return cukv.write_kv_decode(xq, xk, xv, ck, cv, pos, lanes=lanes, fmt=fmt,
                                                    pos_enc=POS_ENC, qk_norm=norm, out=out, validate=False,
                                                    **kw)
                else:
                    def call():
                        return cukv.write_kv_prefill(xq, xk, xv, ck, cv, lanes, pos, fmt=fmt,
                                                     pos_enc=POS_ENC, qk_norm=norm, out=out,
                                                     validate=False, **kw)
                call()
                ms = ctx.time(call)
                extra = {}
                if ctx.torch is not None and os.environ.get("CUKV_BENCH_WRITE_PEERS", "1") != "0":
                    t = ctx.to_torch
                    tck, tcv = t(ck).view(-1, N_KV, ck.shape[-1]), t(cv).view(-1, N_KV, cv.shape[-1])
                    freqs = ctx.torch.from_numpy(cukv.rope_frequencies(D, POS_ENC.theta, POS_ENC.scaling)).cuda()
                    args = (t(xq), t(xk), t(xv), tck, tcv, t(slots), t(pos), freqs)
                    fn = _torch_write(quant, norm)
                    eager = ctx.time_peer(fn, *args, compiled=False, reps=3, batches=3)
                    if eager is not None:
                        extra["torch_eager_ms"] = round(eager, 4)
                    peer_ms = ctx.time_peer(fn, *args)
                else:
                    peer_ms = None
                name = f"write_kv_{'decode' if decode else 'prefill'} {fmt} rope-l31{' qk_norm' if norm else ''}"
                ctx.record(name, (N_TOK, N_H, N_KV, D), ms, nbytes, peer="torch.compile", peer_ms=peer_ms,
                           extra=extra)
            if not decode and fmt == "fp8":
                ms = ctx.time(lambda: cukv.write_kv_prefill(xq, xk, xv, ck, cv, lanes, pos, fmt=fmt,
                                                            out=out, validate=False))
                ctx.record("write_kv_prefill fp8 NoPE", (N_TOK, N_H, N_KV, D), ms, nbytes,
                           extra={"note": "no position encoding: cost of the float64 rotation"})
                ms = ctx.time(lambda: cukv.write_kv_prefill(xq, xk, xv, ck, cv, lanes, pos, fmt=fmt,
                                                            pos_enc=POS_ENC, out=out))
                ctx.record("write_kv_prefill fp8 rope-l31 validate=True", (N_TOK, N_H, N_KV, D), ms, nbytes,
                           extra={"note": "with the index checks (one sync)"})
            del buf, xq, xk, xv, ck, cv, out
            cp.get_default_memory_pool().free_all_blocks()
