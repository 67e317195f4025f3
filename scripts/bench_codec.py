"""Benchmark section ``codec``: ``cukv.quantize`` / ``cukv.dequantize`` vs torch.compile of the same math.

Rows: bf16 ``[65536, 8, 128]`` (128 MiB in, well past L2) for fp8, int4:g1 and int4:g4. Minimal bytes:
quantize reads x and writes the rows; dequantize reads the rows and writes bf16. The torch peers do
the same per-row/per-group min/max, scale, shift and encode (fp8 through ``torch.float8_e4m3fn``, INT4
through integer ops and nibble packing) and write the same row layout, in fp32 (not bit-exact to the
spec's float64 INT4 step), compiled with ``torch.compile``; torch eager time goes to ``extra``.
"""
from __future__ import annotations

import ml_dtypes

import cukv

BF16 = ml_dtypes.bfloat16
SHAPE = (65536, 8, 128)
FORMATS = ("fp8", "int4:g1", "int4:g4")
S_MIN = 1.0 / 229376.0


def torch_quantize_fp8(x):
    """bf16 [..., D] -> uint8 [..., D+4]: fp16 scale, fp16 shift, e4m3fn codes (SPEC §2.3 math)."""
    import torch  # noqa: PLC0415

    y = x.float()
    mn = y.amin(-1, keepdim=True)
    mx = y.amax(-1, keepdim=True)
    h = torch.clamp((mx - mn) * 0.5, max=32750.0)
    s = torch.clamp(h / 448.0, min=S_MIN)
    z = mn + 448.0 * s
    q = torch.clamp((y - z) * (1.0 / s), -448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    qp = torch.cat([s.half(), z.half()], -1).view(torch.uint8)
    return torch.cat([qp, q], -1)


def torch_dequantize_fp8(rows):
    import torch  # noqa: PLC0415

    qp = rows[..., :4].contiguous().view(torch.float16)
    q = rows[..., 4:].contiguous().view(torch.float8_e4m3fn).float()
    return (q * qp[..., 0:1].float() + qp[..., 1:2].float()).to(torch.bfloat16)


def torch_quantize_int4(G):
    def torch_quantize_int4_g(x):
        """bf16 [..., D] -> uint8 [..., D/2 + 4G] (SPEC §2.5 layout; fp32 math)."""
        import torch  # noqa: PLC0415

        D = x.shape[-1]
        y = x.float().unflatten(-1, (G, D // G))
        mn = y.amin(-1, keepdim=True)
        mx = y.amax(-1, keepdim=True)
        s = (mx - mn) / 15.0
        inv = 15.0 / (15.0 * s + 1e-8)
        q = torch.round((y - mn) * inv).clamp(0, 15).to(torch.uint8).flatten(-2)
        packed = q[..., 0::2] | (q[..., 1::2] << 4)
        qp = torch.cat([s.half(), mn.half()], -1).view(torch.uint8).flatten(-2)
        return torch.cat([qp, packed], -1)

    torch_quantize_int4_g.__name__ = f"torch_quantize_int4_g{G}"
    return torch_quantize_int4_g


def torch_dequantize_int4(G):
    def torch_dequantize_int4_g(rows):
        import torch  # noqa: PLC0415

        qp = rows[..., :4 * G].contiguous().view(torch.float16).unflatten(-1, (G, 2))
        b = rows[..., 4 * G:]
        q = torch.stack([b & 0xF, b >> 4], -1).flatten(-2).unflatten(-1, (G, -1)).float()
        return (q * qp[..., 0:1].float() + qp[..., 1:2].float()).flatten(-2).to(torch.bfloat16)

    torch_dequantize_int4_g.__name__ = f"torch_dequantize_int4_g{G}"
    return torch_dequantize_int4_g


def peers(fmt):
    if fmt == "fp8":
        return torch_quantize_fp8, torch_dequantize_fp8
    G = cukv.parse_format(fmt)[1]
    return torch_quantize_int4(G), torch_dequantize_int4(G)


def bench_codec(ctx):
    cp = ctx.cp
    x = cp.random.standard_normal(SHAPE, dtype=cp.float32).astype(BF16)
    tx = ctx.to_torch(x)
    for fmt in FORMATS:
        tq, tdq = peers(fmt)
        rows = cukv.quantize(x, fmt)
        nq = x.nbytes + rows.nbytes
        ms = ctx.time(lambda: cukv.quantize(x, fmt))
        extra = {}
        eager = ctx.time_peer(tq, tx, compiled=False)
        if eager is not None:
            extra["torch_eager_ms"] = round(eager, 5)
        ctx.record(f"quantize {fmt}", SHAPE, ms, nq, peer="torch.compile",
                   peer_ms=ctx.time_peer(tq, tx), extra=extra)
        out = cukv.dequantize(rows, fmt)
        nd = rows.nbytes + out.nbytes
        ms = ctx.time(lambda: cukv.dequantize(rows, fmt))
        trows = ctx.to_torch(rows)
        extra = {}
        eager = ctx.time_peer(tdq, trows, compiled=False)
        if eager is not None:
            extra["torch_eager_ms"] = round(eager, 5)
        ctx.record(f"dequantize {fmt}", SHAPE, ms, nd, peer="torch.compile",
                   peer_ms=ctx.time_peer(tdq, trows), extra=extra)
        del rows, out, trows
