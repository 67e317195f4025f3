#!/usr/bin/env python3
"""Prefill attention benchmark: ``cukv.prefill_attention`` beside torch SDPA (causal, ``enable_gqa``).

``scripts/bench.py`` imports :func:`bench_prefill` and calls it with its context (``ctx.time(fn)`` ->
median ms over CUDA events, ``ctx.copy_gbps``, ``ctx.record(...)``). Standalone::

    python3 scripts/bench_prefill.py            # the issue-6 shapes, tile-config comparison, layouts
    python3 scripts/bench_prefill.py --warm     # first compile every prefill kernel in parallel

Attention is compute bound, so the figure of merit is TFLOP/s over the causal FLOPs
``4 * B * N_H * D * T^2 / 2`` (the same count for cukv and SDPA, so the ratio is a time ratio). GB/s
over the minimal bytes (q, k, v read once, out written once) and % of a device copy are recorded
too, as every bench row has them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

try:
    import cukv  # noqa: F401
except ImportError:  # running from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, KVH, D = 32, 8, 128
SHAPES = ((4, 4096), (1, 16384))


def causal_flops(B, Tq, Tk, n_h, d):
    """FLOPs of the two matmuls over the visible (bottom-right causal) keys."""
    vis = Tq * (Tk - Tq) + Tq * (Tq + 1) / 2
    return 4.0 * B * n_h * d * vis


def _data(cp, B, T, n_h=H, n_kvh=KVH, d=D, seed=0):
    import ml_dtypes  # noqa: PLC0415

    rs = cp.random.RandomState(seed)
    bf = np.dtype(ml_dtypes.bfloat16)
    q = rs.standard_normal((B * T, n_h, d), dtype=cp.float32).astype(bf)
    k = rs.standard_normal((B * T, n_kvh, d), dtype=cp.float32).astype(bf)
    v = rs.standard_normal((B * T, n_kvh, d), dtype=cp.float32).astype(bf)
    cu = cp.arange(0, B * T + 1, T, dtype=cp.int32)
    return q, k, v, cu


def bench_prefill(ctx, *, configs=True, layouts=True):
    """Record the prefill rows into ``ctx`` (see the module docstring)."""
    import cupy as cp  # noqa: PLC0415

    import cukv  # noqa: PLC0415
    from cukv import attention_prefill as ap  # noqa: PLC0415

    try:
        import torch  # noqa: PLC0415
        import torch.nn.functional as F  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        torch = None

    for B, T in SHAPES:
        q, k, v, cu = _data(cp, B, T)
        fl = causal_flops(B, T, T, H, D)
        nbytes = 2 * (q.size * 2 + k.size + v.size)
        run = (lambda: cukv.prefill_attention(q, k, v, cu, cu_seqlens_k=cu, validate=False))
        out = run()
        ms = ctx.time(run)
        extra = {"tflops": fl / ms / 1e9, "B": B, "T": T, "N_H": H, "N_KVH": KVH, "D": D,
                 "causal": True, "config": str(ap.CONFIGS[D])}
        peer, peer_ms = None, None
        if torch is not None:
            qt = torch.from_dlpack(q).view(B, T, H, D).transpose(1, 2).contiguous()
            kt = torch.from_dlpack(k).view(B, T, KVH, D).transpose(1, 2).contiguous()
            vt = torch.from_dlpack(v).view(B, T, KVH, D).transpose(1, 2).contiguous()

            def sdpa():
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

            ref = sdpa()
            torch.cuda.synchronize()
            peer, peer_ms = "torch SDPA (causal, enable_gqa)", ctx.time(sdpa)
            extra["sdpa_tflops"] = fl / peer_ms / 1e9
            extra["ratio_vs_sdpa"] = peer_ms / ms
            o = torch.from_dlpack(out).view(B, T, H, D).transpose(1, 2).float()
            extra["max_abs_diff_vs_sdpa"] = float((o - ref.float()).abs().max())
        if configs and (B, T) == SHAPES[0]:
            alt = {}
            saved = ap.CONFIGS[D]
            try:
                for cfg in ap.ALT_CONFIGS_128:
                    ap.CONFIGS[D] = cfg
                    run()
                    alt[str(cfg)] = round(fl / ctx.time(run) / 1e9, 1)
            finally:
                ap.CONFIGS[D] = saved
            extra["alt_config_tflops"] = alt
        ctx.record(f"prefill_attention bf16 causal B{B} T{T}", (B, T, H, KVH, D), ms, nbytes, peer=peer,
                   peer_ms=peer_ms, extra=extra)
        del q, k, v, out

    if layouts:
        # Partial prefill: 1024 new queries per lane over 4096 keys, padded and paged bf16 caches.
        B, Tq, Tk, S = 4, 1024, 4096, 64
        q, _, _, cuq = _data(cp, B, Tq)
        _, k, v, _ = _data(cp, B, Tk, seed=1)
        kp, vp = k.reshape(B, Tk, KVH, D), v.reshape(B, Tk, KVH, D)
        lens = cp.full((B,), Tk, dtype=cp.int32)
        bt = cp.arange(B * Tk // S, dtype=cp.int32).reshape(B, Tk // S)
        bt16 = cp.random.RandomState(2).permutation(B * Tk // 16).astype(cp.int32).reshape(B, Tk // 16)
        kg, vg = k.reshape(1, B * Tk, KVH, D), v.reshape(1, B * Tk, KVH, D)
        fl = causal_flops(B, Tq, Tk, H, D)
        nbytes = 2 * (2 * q.size + kp.size + vp.size)
        for name, fn in (
                ("padded", lambda: cukv.prefill_attention(q, kp, vp, cuq, seqlens_k=lens, validate=False)),
                ("paged S64", lambda: cukv.prefill_attention(q, kg, vg, cuq, seqlens_k=lens, block_tables=bt,
                                                             page_size=S, validate=False)),
                ("paged S16 shuffled", lambda: cukv.prefill_attention(
                    q, kg, vg, cuq, seqlens_k=lens, block_tables=bt16, page_size=16, validate=False))):
            fn()
            ms = ctx.time(fn)
            ctx.record(f"prefill_attention bf16 {name} q{Tq} over k{Tk}", (B, Tq, Tk, H, KVH, D), ms, nbytes,
                       extra={"tflops": fl / ms / 1e9, "layout": name})
        try:
            from cukv import quantize  # noqa: PLC0415

            for fmt in ("fp8", "int4:g2"):
                ck, cv = quantize(kp, fmt), quantize(vp, fmt)
                fn = (lambda ck=ck, cv=cv, fmt=fmt: cukv.prefill_attention(
                    q, ck, cv, cuq, seqlens_k=lens, fmt=fmt, validate=False))
                fn()
                ms = ctx.time(fn)
                nb = 2 * 2 * q.size + ck.nbytes + cv.nbytes
                ctx.record(f"prefill_attention {fmt} padded q{Tq} over k{Tk}", (B, Tq, Tk, H, KVH, D), ms, nb,
                           extra={"tflops": fl / ms / 1e9, "fmt": fmt})
        except NotImplementedError as e:  # pragma: no cover
            print(f"prefill fmt bench skipped: {e}")


# ------------------------------------------------------------------------------------ standalone
class _Ctx:
    """Minimal stand-in for scripts/bench.py's context: CuPy-event timing, printed rows."""

    def __init__(self, reps=20, warmup=3):
        import cupy as cp  # noqa: PLC0415

        self.cp, self.reps, self.warmup = cp, reps, warmup
        a = cp.empty(1 << 30, dtype=cp.uint8)
        b = cp.empty_like(a)
        ms = self.time(lambda: cp.copyto(b, a))
        self.copy_gbps = 2 * a.nbytes / ms / 1e6
        del a, b
        self.rows = []

    def time(self, fn):
        cp = self.cp
        for _ in range(self.warmup):
            fn()
        ts = []
        for _ in range(self.reps):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1))
        return float(np.median(ts))

    def record(self, op, shape, ms, nbytes, *, peer=None, peer_ms=None, extra=None):
        """Same signature as scripts/bench.py's Ctx.record."""
        row = dict(op=op, shape=tuple(shape), ms=ms, nbytes=nbytes, peer=peer, peer_ms=peer_ms, extra=extra)
        self.rows.append(row)
        ex = extra or {}
        pr = f" | {peer}: {peer_ms:.3f} ms" if peer else ""
        tf = f" {ex['tflops']:.1f} TFLOP/s" if "tflops" in ex else ""
        print(f"{op:42s} {str(tuple(shape)):28s} {ms:8.3f} ms{tf}{pr}")
        rest = {k: v for k, v in ex.items() if k != "tflops"}
        if rest:
            print(f"{'':18s} {rest}")


def warm(procs=None, arch=None):
    """Compile every prefill instantiation into cukv's cubin cache, in parallel processes."""
    from cukv import attention_prefill as ap  # noqa: PLC0415

    if arch is None:
        import cupy as cp  # noqa: PLC0415

        arch = "sm_" + cp.cuda.Device().compute_capability
    return ap.warm_cache(arch, procs=procs)


def main(argv=None):
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--warm", action="store_true", help="compile every prefill kernel first")
    ap_.add_argument("--warm-only", action="store_true")
    ap_.add_argument("--no-configs", action="store_true")
    ap_.add_argument("--no-layouts", action="store_true")
    ns = ap_.parse_args(argv)
    if ns.warm or ns.warm_only:
        import time  # noqa: PLC0415

        t0 = time.time()
        n = warm()
        print(f"compiled {n} prefill instantiations in {time.time() - t0:.1f} s")
        if ns.warm_only:
            return 0
    ctx = _Ctx()
    print(f"device copy: {ctx.copy_gbps:.0f} GB/s")
    bench_prefill(ctx, configs=not ns.no_configs, layouts=not ns.no_layouts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
