"""Benchmark section ``decode``: ``cukv.decode_attention`` over bf16 / FP8 / INT4 caches vs SDPA on bf16.

Shapes of issue 5: ``(B, T)`` in (64, 4096), (16, 16384), (128, 2048), (1, 131072); 32 query heads,
8 KV heads, D = 128; every lane attends all T keys. Minimal bytes: the cache rows read (K and V,
``B*T*N_KVH*R`` each, qparams included) plus q read and the output written. The peer is
``torch.nn.functional.scaled_dot_product_attention`` (``enable_gqa=True``) on a bf16 cache of the
same shape; it is timed on the cache layout ``[B, N_KVH, T, D]`` it prefers and on a transposed view
of cukv's ``[B, T, N_KVH, D]``, and the faster of the two is the reference time. ``extra`` holds
``x_sdpa`` = cukv ms / SDPA ms (issue-5 bar: fp8 <= 0.6, int4:g4 <= 0.4, bf16 <= 1.1) and the split
count chosen.

Standalone: ``python scripts/bench_decode.py`` (prints, writes nothing). ``CUKV_BENCH_SWEEP=1`` also
prints both SDPA layouts and a sweep of warps per CTA x split counts (the data behind
``attention_decode.auto_splits``).
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np

import cukv
from cukv import attention_decode as ad

BF16 = ml_dtypes.bfloat16
SHAPES = ((64, 4096), (16, 16384), (128, 2048), (1, 131072))
N_H, N_KVH, D = 32, 8, 128
FORMATS = ("bf16", "fp8", "int4:g4")
BAR = {"bf16": 1.1, "fp8": 0.6, "int4:g4": 0.4}


def _cache(cp, B, T, fmt, seed):
    """A [B, T, N_KVH, R] cache of N(0,1) rows in ``fmt``, quantized on the GPU in slabs of rows."""
    rs = cp.random.RandomState(seed)
    R = cukv.row_bytes(fmt, D)
    out = cp.empty((B, T, N_KVH, R), dtype=BF16 if fmt == "bf16" else np.uint8)
    flat = out.reshape(-1, R)
    step = (1 << 24) // D
    for i in range(0, flat.shape[0], step):
        n = min(step, flat.shape[0] - i)
        flat[i:i + n] = cukv.quantize(rs.standard_normal((n, D), dtype=np.float32).astype(BF16), fmt)
    return out


def _sdpa_ms(ctx, q, k, v):
    """Best SDPA time over the two cache layouts, or None without torch."""
    torch = ctx.torch
    if torch is None:
        return None, None, None
    F = torch.nn.functional
    tq = ctx.to_torch(q).unsqueeze(2)                      # [B, N_H, 1, D]
    tk, tv = ctx.to_torch(k), ctx.to_torch(v)              # [B, T, N_KVH, D]
    best, how, out = None, None, None
    for name, kk, vv in (("BHTD", tk.transpose(1, 2).contiguous(), tv.transpose(1, 2).contiguous()),
                         ("BTHD view", tk.transpose(1, 2), tv.transpose(1, 2))):
        def f(kk=kk, vv=vv):
            return F.scaled_dot_product_attention(tq, kk, vv, enable_gqa=True)

        ms = ctx.time_peer(f, compiled=False)
        if os.environ.get("CUKV_BENCH_SWEEP") and ms is not None:
            print(f"  SDPA {name}: {ms:.4f} ms", flush=True)
        if ms is not None and (best is None or ms < best):
            best, how = ms, name
            out = ctx.from_torch(f()[:, :, 0])
        del kk, vv
    return best, how, out


def bench_decode(ctx):
    cp = ctx.cp
    for B, T in SHAPES:
        rs = cp.random.RandomState(B * 7 + T)
        q = rs.standard_normal((B, N_H, D), dtype=np.float32).astype(BF16)
        seq = cp.full((B,), T, dtype=cp.int32)
        caches = {}
        for fmt in FORMATS:
            caches[fmt] = (_cache(cp, B, T, fmt, 1), _cache(cp, B, T, fmt, 2))
        sdpa, how, ref_out = _sdpa_ms(ctx, q, *caches["bf16"])
        for fmt in FORMATS:
            ck, cv = caches[fmt]
            fn = lambda: cukv.decode_attention(q, ck, cv, seq, fmt=fmt, validate=False)  # noqa: E731
            o = fn()
            sched = dict(ad._LAST)   # the schedule this call ran (split, stream or records)
            ms = ctx.time(fn)
            nbytes = ck.nbytes + cv.nbytes + 2 * q.nbytes
            p = ad.prepare("bench", q, ck, cv, seq, fmt=fmt, qparam_k=None, qparam_v=None,
                           block_tables=None, page_size=64, softmax_scale=None, num_splits=None,
                           validate=False, check_finite=False)
            run_as = (f"{sched['schedule']} ({sched['ctas']} CTAs)" if sched.get("ctas")
                      else f"split, splits={ad.config(p).num_splits}")
            extra = {"schedule": run_as, "x_sdpa": None if not sdpa else round(ms / sdpa, 3),
                     "bar": BAR[fmt], "sdpa_layout": how}
            if ref_out is not None:   # same N(0,1) draws in every format: quantization error only
                extra["max_abs_vs_sdpa"] = round(float(cp.abs(o.astype(np.float32)
                                                              - ref_out.astype(np.float32)).max()), 4)
            ctx.record(f"decode_attention {fmt}", (B, T, N_H, N_KVH, D), ms, nbytes,
                       peer="SDPA bf16", peer_ms=sdpa, extra=extra)
        if os.environ.get("CUKV_BENCH_SWEEP"):
            _sweep(ctx, q, seq, caches, B, T)
        del caches, ck, cv
        cp.get_default_memory_pool().free_all_blocks()
        if ctx.torch is not None:
            ctx.torch.cuda.empty_cache()


def _sweep(ctx, q, seq, caches, B, T):
    """Tuning aid (CUKV_BENCH_SWEEP=1): time warps per CTA x split counts; printed only."""
    for fmt in FORMATS:
        ck, cv = caches[fmt]
        p = ad.prepare("bench", q, ck, cv, seq, fmt=fmt, qparam_k=None, qparam_v=None, block_tables=None,
                       page_size=64, softmax_scale=None, num_splits=None, validate=False,
                       check_finite=False)
        auto = ad.config(p).num_splits
        row = []
        for nw, hm in ((4, 0), (2, 0), (4, 1)):
            if hm and B > 1:
                continue
            ad._TUNE.update(nw=nw, smem_target=200 * 1024, head_major=hm)
            cands = {1, 2, 3, 4, auto} if B >= 16 else {auto, 2 * auto, max(1, auto // 2), 33, 40, 66}
            for S in sorted(cands):
                ms = ctx.time(lambda: cukv.decode_attention(q, ck, cv, seq, fmt=fmt, num_splits=S,
                                                            validate=False), batches=3)
                row.append(f"nw{nw}{'h' if hm else ''}/S{S}={ms:.4f}")
            ad._TUNE.clear()
        print(f"  sweep {fmt} B{B} T{T} (auto S={auto}): " + " ".join(row), flush=True)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench  # noqa: E402

    c = bench.Ctx()
    print(f"device: {c.device}, copy {c.copy_gbps:.1f} GB/s")
    c.section = "decode"
    bench_decode(c)
