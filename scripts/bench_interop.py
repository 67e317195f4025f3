"""Benchmark section: host overhead of passing torch tensors instead of CuPy arrays.

A small decode step (B=4, 32/8 heads, D=128, an fp8 cache of 1024 positions) is called many times with
``validate=False`` (no synchronisation), first with CuPy arrays, then with torch CUDA tensors sharing
the same memory. The per-call wall time on the host is the median over batches of 200 calls; the
difference is what the interop layer costs (issue bar: at most 15 us per call).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

import cukv


def _host_us(fn, n=200, batches=7):
    for _ in range(20):
        fn()
    out = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(out)


def bench_interop(ctx):
    cp, torch = ctx.cp, ctx.torch
    if torch is None:
        ctx.note("torch missing: interop overhead not measured")
        return
    B, H, HK, D, T = 4, 32, 8, 128, 1024
    rng = np.random.default_rng(0)
    bf16 = cukv._checks.BF16
    q = cp.asarray(rng.standard_normal((B, H, D), dtype=np.float32).astype(bf16))
    k = cp.asarray(rng.standard_normal((B, HK, D), dtype=np.float32).astype(bf16))
    v = cp.asarray(rng.standard_normal((B, HK, D), dtype=np.float32).astype(bf16))
    ck = cp.zeros((B, T, HK, D + 4), cp.uint8)
    cv = cp.zeros_like(ck)
    pos = cp.full(B, 100, cp.int32)
    lens = cp.full(B, 101, cp.int32)
    rope = cukv.RoPE()
    tt = {n: torch.from_dlpack(a) for n, a in dict(q=q, k=k, v=v, ck=ck, cv=cv, pos=pos, lens=lens).items()}
    cc = dict(q=q, k=k, v=v, ck=ck, cv=cv, pos=pos, lens=lens)

    calls = {
        "write_kv_decode": lambda a: cukv.write_kv_decode(a["q"], a["k"], a["v"], a["ck"], a["cv"], a["pos"],
                                                          fmt="fp8", pos_enc=rope, validate=False),
        "rms_norm": lambda a: cukv.rms_norm(a["q"]),
        "quantize": lambda a: cukv.quantize(a["k"], "fp8"),
    }
    if hasattr(cukv, "decode_attention"):
        calls["decode_attention"] = lambda a: cukv.decode_attention(a["q"], a["ck"], a["cv"], a["lens"],
                                                                    fmt="fp8", validate=False)
    for name, fn in calls.items():
        us_cp = _host_us(lambda: fn(cc))
        torch.cuda.synchronize()
        us_t = _host_us(lambda: fn(tt))
        torch.cuda.synchronize()
        ctx.record(f"interop host overhead: {name}", (B, H, D), us_t / 1000.0, 1,
                   peer="same call with CuPy arrays", peer_ms=us_cp / 1000.0,
                   extra={"host_us_torch": round(us_t, 2), "host_us_cupy": round(us_cp, 2),
                          "overhead_us": round(us_t - us_cp, 2)})
        print(f"    {name}: torch {us_t:.1f} us/call, cupy {us_cp:.1f} us/call, "
              f"overhead {us_t - us_cp:+.1f} us", flush=True)
