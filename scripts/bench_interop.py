"""Benchmark section: host overhead of passing torch tensors instead of CuPy arrays.

A small decode step (B=4, 32/8 heads, D=128, an fp8 cache of 1024 positions) is called many times with
``validate=False`` (no synchronisation), alternately with CuPy arrays and with torch CUDA tensors sharing
the same memory, so host noise (the device machine's CPU is shared) hits both alike. Each call is timed
on its own; the figures are the medians over 3000 calls of each kind, and the overhead is the median of
the paired differences: what the interop layer costs (issue bar: at most 15 us per call). The torch
tensors are the same objects every call, as the cache, table and length tensors of a decode loop are;
a tensor seen for the first time costs one more CuPy view (``first_view_us``).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

import cukv


def _paired_us(fa, fb, n=3000, warm=50):
    """Median host microseconds of ``fa`` and ``fb`` called alternately, and the median of the paired
    differences ``fb - fa``."""
    for _ in range(warm):
        fa()
        fb()
    ta, tb = [], []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        fa()
        t1 = clock()
        fb()
        t2 = clock()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    diff = [b - a for a, b in zip(ta, tb)]
    return (statistics.median(ta) * 1e6, statistics.median(tb) * 1e6, statistics.median(diff) * 1e6)


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
        us_cp, us_t, over = _paired_us(lambda: fn(cc), lambda: fn(tt))
        torch.cuda.synchronize()
        ctx.record(f"interop host overhead: {name}", (B, H, D), us_t / 1000.0, 1,
                   peer="same call with CuPy arrays", peer_ms=us_cp / 1000.0,
                   extra={"host_us_torch": round(us_t, 2), "host_us_cupy": round(us_cp, 2),
                          "overhead_us": round(over, 2), "bar_us": 15})
        print(f"    {name}: torch {us_t:.1f} us/call, cupy {us_cp:.1f} us/call, "
              f"overhead {over:+.1f} us (median of paired differences)", flush=True)
    # a tensor the layer has not seen yet (a fresh activation every step): one view to build
    fresh = [torch.from_dlpack(q).clone() for _ in range(256)]
    it = iter(fresh)
    t0 = time.perf_counter()
    for t in it:
        cukv.rms_norm(t)
    first = (time.perf_counter() - t0) / len(fresh) * 1e6
    _, us_norm, _ = _paired_us(lambda: None, lambda: cukv.rms_norm(tt["q"]), n=500)
    torch.cuda.synchronize()
    ctx.record("interop host overhead: first view of a tensor", (B, H, D), first / 1000.0, 1,
               peer="the same call on a tensor seen before", peer_ms=us_norm / 1000.0,
               extra={"first_view_us": round(first - us_norm, 2)})
    print(f"    rms_norm on new tensors: {first:.1f} us/call vs {us_norm:.1f} on a known one", flush=True)
