"""Benchmark section ``dequant``: ``cukv.dequantize_cache`` and ``cukv.quantize_qkv_per_head`` vs
torch.compile of the same math.

dequantize_cache: K and V caches ``[8, 8192, 8, 128]`` (contiguous, or paged with 64-row pages and
shuffled block tables) with ragged lengths in ``[T/2, T]``; fp8, fp8_head, int4:g4 and int4:g1.
Minimal bytes: the cache rows of data rows read once (plus qparams) + the whole bf16 output written.
The torch peer dequantizes every row (gathering through the block table when paged), masks rows
``t >= seqlens[b]`` to zero and writes bf16, compiled with ``torch.compile`` (one fused kernel);
eager time goes to ``extra``.

quantize_qkv_per_head: 32768 tokens (8 lanes x 4096), 32 Q / 8 KV heads, D 128, Q/K/V as strided
slices of a fused ``[B_T, 48, 128]`` buffer (FBGEMM's layout), fp8_head cache ``[8, 4096, 8, 128]``;
with K/V writes (no token precomputed), Q only, and paged. Minimal bytes: Q (and K, V) read once,
``xq_fp8`` and the cache rows written once. The torch peer computes the same scales from ``amax``,
quantizes through ``torch.float8_e4m3fn`` and scatters K/V with ``index_put_``.

Timing: GPU time for cukv and the peers alike (``ctx.time`` queues each batch behind a spin covering its
measured host time). Each row records ``host_us`` (host time of one call) in ``extra``: that cost is real
for eager Python callers and absent under CUDA-graph capture.
"""
from __future__ import annotations


import ml_dtypes
import numpy as np

import cukv
from cukv import dequant as dq
from cukv import per_head as ph

BF16 = ml_dtypes.bfloat16
S_MIN = 1.0 / 229376.0
B, T, H, D, S = 8, 8192, 8, 128, 64


# ----------------------------------------------------------------------------------- torch peers
def _decode_rows(torch, rows, fmt, scale):
    """uint8 rows [..., R] -> fp32 values [..., D] (the SPEC math in fp32)."""
    if fmt == "fp8":
        qp = rows[..., :4].contiguous().view(torch.float16).float()
        q = rows[..., 4:].contiguous().view(torch.float8_e4m3fn).float()
        return q * qp[..., 0:1] + qp[..., 1:2]
    if fmt == "fp8_head":
        return rows.view(torch.float8_e4m3fn).float() * scale
    G = int(fmt.split("g")[1])
    qp = rows[..., :4 * G].contiguous().view(torch.float16).unflatten(-1, (G, 2)).float()
    b = rows[..., 4 * G:]
    q = torch.stack([b & 0xF, b >> 4], -1).flatten(-2).unflatten(-1, (G, -1)).float()
    return (q * qp[..., 0:1] + qp[..., 1:2]).flatten(-2)


def torch_dequant(fmt, paged):
    def torch_dequantize_cache(ck, cv, seqlens, sk, sv, bt):
        import torch  # noqa: PLC0415

        t = torch.arange(T, device=ck.device)
        outs = []
        for c, s in ((ck, sk), (cv, sv)):
            if paged:
                idx = bt[:, t // S] * S + t % S            # [B, T] physical rows
                c = c[0][idx]                              # [B, T, H, R]
            sc = s[:, None, :, None] if s is not None else None
            x = _decode_rows(torch, c, fmt, sc)
            mask = (t[None, :] < seqlens[:, None])[:, :, None, None]
            outs.append(torch.where(mask, x, 0.0).to(torch.bfloat16))
        return tuple(outs)

    torch_dequantize_cache.__name__ = f"torch_dequantize_cache_{fmt.replace(':', '_')}"
    return torch_dequantize_cache


def torch_per_head(N_H, N_KVH, kv):
    def torch_quantize_qkv_per_head(amax, xq, xk, xv, ck, cv, pos, lane):
        import torch  # noqa: PLC0415

        def recipe(a):
            return torch.clamp(torch.clamp(a, max=12000.0) / 448.0, min=S_MIN)

        sq = recipe(amax[:, :N_H].amax(1))
        q8 = torch.clamp(xq.float() * (1.0 / sq)[lane][:, None, None], -448.0, 448.0)
        q8 = q8.to(torch.float8_e4m3fn).view(torch.uint8)
        scale_q = sq[:, None].expand(-1, N_KVH).contiguous()
        if kv:
            sk = recipe(64.0 * amax[:, N_H:N_H + N_KVH])
            sv = recipe(64.0 * amax[:, N_H + N_KVH:])
            for x, c, s in ((xk, ck, sk), (xv, cv, sv)):
                y = torch.clamp(x.float() * (1.0 / s)[lane][:, :, None], -448.0, 448.0)
                c.index_put_((lane, pos), y.to(torch.float8_e4m3fn).view(torch.uint8))
        return q8, scale_q

    return torch_quantize_qkv_per_head


# ----------------------------------------------------------------------------------- sections
def bench_dequant(ctx):
    cp = ctx.cp
    rng = np.random.default_rng(0)
    seqlens_h = rng.integers(T // 2, T + 1, B).astype(np.int32)
    seqlens = cp.asarray(seqlens_h)
    n_data = int(seqlens_h.sum())
    x = cp.random.standard_normal((B, T, H, D), dtype=cp.float32).astype(BF16)
    bt_h = rng.permutation(B * (T // S)).astype(np.int32).reshape(B, T // S)
    bt = cp.asarray(bt_h)
    cases = [("fp8", False), ("fp8", True), ("fp8_head", False), ("int4:g4", False), ("int4:g1", True)]
    for fmt, paged in cases:
        kw = {}
        sk = sv = None
        if fmt == "fp8_head":
            sk = cp.asarray(rng.uniform(0.001, 0.01, (B, H)).astype(np.float32))
            sv = cp.asarray(rng.uniform(0.001, 0.01, (B, H)).astype(np.float32))
            kw.update(qparam_k=sk, qparam_v=sv)
            ck = cukv.quantize(x, fmt, scale=sk[:, None, :])
        else:
            ck = cukv.quantize(x, fmt)
        cv = ck.copy()
        if paged:
            # physical page bt[b, j] holds lane b's logical page j
            phys_idx = (bt_h[:, :, None] * S + np.arange(S)[None, None, :]).reshape(B, T)
            pk = cp.empty((1, B * T, H, ck.shape[-1]), cp.uint8)
            pk[0, cp.asarray(phys_idx.reshape(-1))] = ck.reshape(B * T, H, -1)
            ck, cv = pk, pk.copy()
            kw.update(block_tables=bt, page_size=S)
        R = ck.shape[-1]
        out = (cp.empty((B, T, H, D), BF16), cp.empty((B, T, H, D), BF16))
        nbytes = 2 * n_data * H * R + 2 * out[0].nbytes + (2 * sk.nbytes if sk is not None else 0)

        def run():
            return cukv.dequantize_cache(ck, cv, seqlens, fmt, out=out, validate=False, **kw)

        ms, host_us = _time(ctx, run)
        peer = torch_dequant(fmt, paged)
        targs = (ctx.to_torch(ck), ctx.to_torch(cv), ctx.to_torch(seqlens),
                 ctx.to_torch(sk) if sk is not None else None,
                 ctx.to_torch(sv) if sv is not None else None,
                 ctx.to_torch(bt) if paged else None)
        peer_ms = _time_peer_noneok(ctx, peer, targs)
        eager = _time_peer_noneok(ctx, peer, targs, compiled=False)
        ex = {"data_rows": f"{n_data}/{B * T}", "layout": "paged S=64" if paged else "contiguous",
              "host_us": round(host_us, 1)}
        if eager is not None:
            ex["torch_eager_ms"] = round(eager, 5)
        ctx.record(f"dequantize_cache {fmt}{' paged' if paged else ''}", (2, B, T, H, D), ms, nbytes,
                   peer="torch.compile", peer_ms=peer_ms, extra=ex)
        if fmt in ("fp8", "int4:g4"):                 # rows-per-thread plan sweep
            default = dq.ITERS
            for it in (1, 2):
                dq.ITERS = it
                try:
                    ms_i = _time(ctx, run)[0]
                finally:
                    dq.ITERS = default
                ctx.record(f"  plan: {it} rows/thread", (2, B, T, H, D), ms_i, nbytes,
                           extra={"layout": ex["layout"], "default_rows_per_thread": default})
        del ck, cv, out
        cp.get_default_memory_pool().free_all_blocks()
    del x
    cp.get_default_memory_pool().free_all_blocks()
    _bench_per_head(ctx)


def _time(ctx, fn):
    """``(ms, host_us)``: GPU milliseconds of one call and the host microseconds it costs."""
    ms = ctx.time(fn)
    return ms, ctx.last_host_us


def _time_peer_noneok(ctx, fn, args, compiled=True):
    """ctx.time_peer with some None arguments allowed (ctx.time_peer treats None as 'no torch'),
    timed like cukv (:func:`_time`)."""
    if ctx.torch is None:
        return None
    try:
        f = ctx.compile(fn) if compiled else fn
        with ctx.torch.no_grad():
            f(*args)
            ctx.torch.cuda.synchronize()
            return _time(ctx, lambda: f(*args))[0]
    except Exception as e:  # noqa: BLE001
        ctx.note(f"{'torch.compile' if compiled else 'torch eager'} peer {fn.__name__} failed: "
                 f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return None


def _bench_per_head(ctx):
    cp = ctx.cp
    nb, per, N_H, N_KVH, Dh = 8, 4096, 32, 8, 128
    n = nb * per
    HH = N_H + 2 * N_KVH
    xqkv = cp.random.standard_normal((n, HH, Dh), dtype=cp.float32).astype(BF16)
    xq, xk, xv = xqkv[:, :N_H], xqkv[:, N_H:N_H + N_KVH], xqkv[:, N_H + N_KVH:]
    lane = cp.repeat(cp.arange(nb, dtype=cp.int32), per)
    pos = cp.tile(cp.arange(per, dtype=cp.int32), nb)
    amax = cp.abs(cp.random.standard_normal((nb, HH), dtype=cp.float32)) * 4
    ck = cp.zeros((nb, per, N_KVH, Dh), cp.uint8)
    cv = cp.zeros_like(ck)
    qk = cp.zeros((nb, N_KVH), cp.float32)
    qv = cp.zeros_like(qk)
    out = cp.empty((n, N_H, Dh), cp.uint8)
    rng = np.random.default_rng(1)
    S_ = 64
    bt = cp.asarray(rng.permutation(nb * per // S_).astype(np.int32).reshape(nb, per // S_))
    pk = cp.zeros((1, nb * per, N_KVH, Dh), cp.uint8)
    pv = cp.zeros_like(pk)
    q_bytes = n * N_H * Dh * 3
    kv_bytes = 2 * n * N_KVH * Dh * 3
    for name, kv, paged in (("q+kv", True, False), ("q only", False, False), ("q+kv paged", True, True)):
        kw = dict(token_lane=lane, out=out, validate=False)
        if kv:
            kw.update(qparam_k=qk, qparam_v=qv)
        c_k, c_v = (pk, pv) if paged else (ck, cv)
        if paged:
            kw.update(block_tables=bt, page_size=S_)
        xk_, xv_ = (xk, xv) if kv else (None, None)

        def run():
            return cukv.quantize_qkv_per_head(amax, xq, xk_, xv_, c_k, c_v, pos, **kw)

        ms, host_us = _time(ctx, run)
        nbytes = q_bytes + (kv_bytes if kv else 0)
        peer_ms = eager = None
        if not paged:
            peer = torch_per_head(N_H, N_KVH, kv)
            targs = tuple(ctx.to_torch(a) if a is not None else None
                          for a in (amax, xq, xk, xv, ck, cv, pos.astype(cp.int64), lane.astype(cp.int64)))
            peer_ms = _time_peer_noneok(ctx, peer, targs)
            eager = _time_peer_noneok(ctx, peer, targs, compiled=False)
        ex = {"tokens": n, "heads": f"{N_H}/{N_KVH}", "layout": "paged S=64" if paged else "contiguous",
              "host_us": round(host_us, 1)}
        if eager is not None:
            ex["torch_eager_ms"] = round(eager, 5)
        ctx.record(f"quantize_qkv_per_head {name}", (n, HH, Dh), ms, nbytes,
                   peer="torch.compile" if not paged else None, peer_ms=peer_ms, extra=ex)
        default = ph.HEADS                    # heads-per-thread plan sweep
        for nh in (4, 8):
            if nh == default:
                continue
            ph.HEADS = nh
            try:
                ms_h = _time(ctx, run)[0]
            finally:
                ph.HEADS = default
            ctx.record(f"  plan: {nh} heads/thread", (n, HH, Dh), ms_h, nbytes,
                       extra={"layout": ex["layout"], "default_heads_per_thread": default})
