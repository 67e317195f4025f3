"""Framework interop (cukv/_backend.py): torch tensors and DLPack objects in place of CuPy arrays.

One conversion layer serves every op: each family is called once with CuPy arrays and once with torch
tensors, and the bytes must match. Written arguments stay the caller's memory (checked by data
pointer), float8 tensors are viewed as uint8, cukv runs on torch's current stream, and a decode step
can be captured in a CUDA graph. CPU torch tensors take the NumPy path. Without torch these tests skip.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import cukv
from helpers import BF16, activations, assert_bytes_equal, raises_arg, to_host

torch = pytest.importorskip("torch", reason="torch is not installed (interop tests need it)")


def t_host(a: np.ndarray):
    """NumPy -> CPU torch tensor sharing memory (bf16 through an int16 view)."""
    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def t_np(t) -> np.ndarray:
    """torch tensor (any device) -> NumPy (bf16 via int16, float8 via uint8)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def out_np(r):
    if isinstance(r, tuple):
        return tuple(out_np(x) for x in r)
    if isinstance(r, torch.Tensor):
        return t_np(r)
    return to_host(r)


@pytest.fixture
def cuda(gpu):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return gpu


def test_import_cukv_imports_no_framework():
    code = "import sys, cukv; print(sorted(m for m in ('torch', 'jax', 'cupy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------ CPU tensors
def test_cpu_tensors_take_numpy_path(rng):
    x = activations(rng, (5, 64))
    got = cukv.quantize(t_host(x), "int4:g2")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and got.device.type == "cpu"
    assert_bytes_equal(t_np(got), cukv.quantize(x, "int4:g2"))
    y = cukv.rms_norm(t_host(x))
    assert y.dtype == torch.bfloat16
    assert_bytes_equal(t_np(y), cukv.rms_norm(x))
    s = np.full(5, 0.01, np.float32)
    c = cukv.quantize(t_host(x), "fp8_head", scale=t_host(s))
    assert c.dtype == torch.float8_e4m3fn, "fp8 codes come back as float8_e4m3fn for torch callers"
    back = cukv.dequantize(c, "fp8_head", scale=t_host(s))       # float8 input viewed as uint8
    assert_bytes_equal(t_np(back), cukv.dequantize(cukv.quantize(x, "fp8_head", scale=s), "fp8_head",
                                                   scale=s))


def test_cpu_out_is_written_in_place(rng):
    x = activations(rng, (4, 64))
    out = torch.empty((4, 64), dtype=torch.bfloat16)
    r = cukv.rms_norm(t_host(x), out=out)
    assert r is out
    assert_bytes_equal(t_np(out), cukv.rms_norm(x))


def test_array_protocol_objects(rng):
    class Wrapped:
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return self.a

    x = activations(rng, (3, 64))
    assert_bytes_equal(cukv.quantize(Wrapped(x), "fp8"), cukv.quantize(x, "fp8"))
    with raises_arg(TypeError, "quantize", "x", "expected"):
        cukv.quantize([[1.0] * 8], "fp8")


# ------------------------------------------------------------------------------ CUDA tensors
def _families(rng):
    """(name, host inputs, call(xs) -> result, names of written inputs) for every op family."""
    D, H, HK, B, T = 128, 8, 2, 3, 64
    q = activations(rng, (7, H, D))
    k = activations(rng, (7, HK, D))
    v = activations(rng, (7, HK, D))
    lane = np.array([0, 0, 1, 1, 1, 2, 2], np.int32)
    pos = np.array([0, 1, 0, 1, 2, 0, 1], np.int32)
    cache = np.zeros((B, T, HK, cukv.row_bytes("fp8", D)), np.uint8)
    fams = [
        ("quantize", dict(x=q), lambda a: cukv.quantize(a["x"], "int4:g4"), ()),
        ("dequantize", dict(r=cukv.quantize(q, "fp8")), lambda a: cukv.dequantize(a["r"], "fp8"), ()),
        ("rms_norm", dict(x=q, w=activations(rng, (D,))), lambda a: cukv.rms_norm(a["x"], a["w"]), ()),
        ("write_kv_prefill",
         dict(q=q, k=k, v=v, ck=cache, cv=cache.copy(), lane=lane, pos=pos),
         lambda a: cukv.write_kv_prefill(a["q"], a["k"], a["v"], a["ck"], a["cv"], a["lane"], a["pos"],
                                         fmt="fp8", pos_enc=cukv.RoPE()),
         ("ck", "cv")),
        ("write_kv_decode",
         dict(q=q[:B], k=k[:B], v=v[:B], ck=cache, cv=cache.copy(), pos=np.array([5, 0, 9], np.int32)),
         lambda a: cukv.write_kv_decode(a["q"], a["k"], a["v"], a["ck"], a["cv"], a["pos"], fmt="fp8",
                                        pos_enc=cukv.RoPE()),
         ("ck", "cv")),
    ]
    filled = cukv.quantize(activations(rng, (B, T, HK, D)), "int4:g2")
    lens = np.array([0, 17, 64], np.int32)
    fams.append(("dequantize_cache", dict(ck=filled, cv=filled[::-1].copy(), s=lens),
                 lambda a: cukv.dequantize_cache(a["ck"], a["cv"], a["s"], "int4:g2"), ()))
    amax = np.abs(np.concatenate([q, k, v], axis=1).astype(np.float32)).max(-1)[:B]
    fams.append(("quantize_qkv_per_head",
                 dict(amax=amax, q=q[:B], k=k[:B], v=v[:B], ck=np.zeros((B, T, HK, D), np.uint8),
                      cv=np.zeros((B, T, HK, D), np.uint8), cp=np.array([3, 0, 63], np.int32),
                      sk=np.zeros((B, HK), np.float32), sv=np.zeros((B, HK), np.float32)),
                 lambda a: cukv.quantize_qkv_per_head(a["amax"], a["q"], a["k"], a["v"], a["ck"], a["cv"],
                                                      a["cp"], qparam_k=a["sk"], qparam_v=a["sv"]),
                 ("ck", "cv", "sk", "sv")))
    cu = np.array([0, 2, 5, 7], np.int32)
    fams.append(("prefill_attention", dict(q=q, k=k, v=v, cu=cu),
                 lambda a: cukv.prefill_attention(a["q"], a["k"], a["v"], a["cu"], cu_seqlens_k=a["cu"],
                                                  return_lse=True), ()))
    if hasattr(cukv, "decode_attention"):
        kc = activations(rng, (B, T, HK, D))
        fams.append(("decode_attention",
                     dict(q=q[:B], ck=cukv.quantize(kc, "fp8"), cv=cukv.quantize(kc[::-1], "fp8"),
                          s=np.array([1, 40, 64], np.int32)),
                     lambda a: cukv.decode_attention(a["q"], a["ck"], a["cv"], a["s"], fmt="fp8",
                                                     return_lse=True), ()))
    return fams


def test_every_family_same_bytes_and_no_copies(cuda, rng):
    """Torch CUDA inputs give the CuPy bytes; written tensors are updated in the caller's memory."""
    for name, host, call, written in _families(rng):
        via_cupy = {n: cuda.asarray(a) for n, a in host.items()}
        want = out_np(call(via_cupy))
        via_torch = {n: t_host(a).cuda() for n, a in host.items()}
        ptrs = {n: via_torch[n].data_ptr() for n in written}
        got = call(via_torch)
        for r in (got if isinstance(got, tuple) else (got,)):
            assert isinstance(r, torch.Tensor) and r.is_cuda, f"{name}: result is {type(r)}"
        for g, w in zip(out_np(got) if isinstance(got, tuple) else (out_np(got),),
                        want if isinstance(want, tuple) else (want,)):
            assert_bytes_equal(g, w, what=f"{name} torch vs cupy")
        for n in written:
            assert via_torch[n].data_ptr() == ptrs[n]
            assert_bytes_equal(t_np(via_torch[n]), to_host(via_cupy[n]), what=f"{name}: {n} written in place")


def test_float8_tensors(cuda, rng):
    x = activations(rng, (6, 2, 128))
    s = np.full((6, 2), 0.02, np.float32)
    c = cukv.quantize(t_host(x).cuda(), "fp8_head", scale=t_host(s).cuda())
    assert c.dtype == torch.float8_e4m3fn and c.is_cuda
    assert_bytes_equal(t_np(c), cukv.quantize(x, "fp8_head", scale=s))
    # a float8 cache written in place by quantize_qkv_per_head, read back by dequantize_cache
    B, T, H, HK, D = 2, 16, 4, 2, 128
    q, k, v = (activations(rng, (B, h, D)) for h in (H, HK, HK))
    amax = np.abs(np.concatenate([q, k, v], axis=1).astype(np.float32)).max(-1)
    ck = torch.zeros((B, T, HK, D), dtype=torch.float8_e4m3fn, device="cuda")
    cv = torch.zeros_like(ck)
    sk = torch.zeros((B, HK), dtype=torch.float32, device="cuda")
    sv = torch.zeros_like(sk)
    ptr = ck.data_ptr()
    xq8, sq = cukv.quantize_qkv_per_head(*(t_host(a).cuda() for a in (amax, q, k, v)), ck, cv,
                                         t_host(np.array([3, 7], np.int32)).cuda(), qparam_k=sk, qparam_v=sv)
    assert xq8.dtype == torch.float8_e4m3fn and ck.data_ptr() == ptr
    assert t_np(ck).any(), "the float8 cache was written in place"
    kk, vv = cukv.dequantize_cache(ck, cv, t_host(np.array([8, 8], np.int32)).cuda(), "fp8_head",
                                   qparam_k=sk, qparam_v=sv)
    assert kk.dtype == torch.bfloat16 and float(kk.float().abs().sum()) > 0


def test_remembered_views_follow_the_tensor(cuda, rng):
    """The per-tensor view cache: a tensor passed again whose metadata changed in place gets a new
    view; a dead tensor leaves no entry; a non-contiguous tensor is read through its strides."""
    from cukv import _backend

    x = activations(rng, (6, 64))
    t = t_host(x).cuda()
    assert_bytes_equal(t_np(cukv.rms_norm(t)), cukv.rms_norm(x))
    t.resize_(3, 128)                                  # same storage, new shape and strides
    assert_bytes_equal(t_np(cukv.rms_norm(t)), cukv.rms_norm(x.reshape(3, 128)))
    t.as_strided_((3, 64), (128, 1), 64)               # offset view of the same storage
    assert_bytes_equal(t_np(cukv.rms_norm(t)), cukv.rms_norm(np.ascontiguousarray(x.reshape(3, 128)[:, 64:])))
    w = t_host(activations(rng, (12, 64))).cuda()[::2]     # non-contiguous rows
    assert_bytes_equal(t_np(cukv.rms_norm(w)), cukv.rms_norm(t_np(w)))
    key = id(t)
    assert key in _backend._VIEWS
    del t
    assert key not in _backend._VIEWS, "the entry dies with its tensor"


def test_module_mix_names_argument(cuda, rng):
    x = activations(rng, (2, 64))
    with raises_arg(TypeError, "rms_norm", "weight"):
        cukv.rms_norm(t_host(x).cuda(), t_host(activations(rng, (64,))))
    t = t_host(x).cuda()
    cukv.rms_norm(t)                       # t's view is now cached: the fast path must still check
    with raises_arg(TypeError, "rms_norm", "weight"):
        cukv.rms_norm(t, t_host(activations(rng, (64,))))
    with raises_arg(TypeError, "rms_norm", "weight"):
        cukv.rms_norm(t, activations(rng, (64,)))          # a NumPy array


def test_runs_on_torch_current_stream(cuda, rng):
    """An op on a side stream sees the result of the torch kernel queued before it on that stream."""
    x0 = activations(rng, (4096, 128))
    x1 = activations(rng, (4096, 128))
    xt = t_host(x0).cuda()
    src = t_host(x1).cuda()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)        # keep the stream busy, then overwrite x
        xt.copy_(src)
        r = cukv.quantize(xt, "fp8")          # must run after the copy on stream s
    torch.cuda.synchronize()
    assert_bytes_equal(t_np(r), cukv.quantize(x1, "fp8"))


def test_cuda_graph_decode_step(cuda, rng):
    """write_kv_decode + decode_attention (validate=False) captured in a CUDA graph, replayed."""
    if not hasattr(cukv, "decode_attention"):
        pytest.skip("decode_attention not built")
    B, H, HK, D, T = 4, 8, 2, 128, 256
    cache = torch.zeros((B, T, HK, D + 4), dtype=torch.uint8, device="cuda")
    cache_v = torch.zeros_like(cache)
    q = torch.empty((B, H, D), dtype=torch.bfloat16, device="cuda")
    k = torch.empty((B, HK, D), dtype=torch.bfloat16, device="cuda")
    v = torch.empty_like(k)
    pos = torch.zeros(B, dtype=torch.int32, device="cuda")
    lens = torch.zeros(B, dtype=torch.int32, device="cuda")
    rope = cukv.RoPE()

    def step():
        qo = cukv.write_kv_decode(q, k, v, cache, cache_v, pos, fmt="fp8", pos_enc=rope, validate=False)
        return cukv.decode_attention(qo, cache, cache_v, lens, fmt="fp8", validate=False)

    def load(t):
        host = [activations(rng, tuple(a.shape)) for a in (q, k, v)]
        for a, h in zip((q, k, v), host):
            a.copy_(t_host(h))
        pos.fill_(t)
        lens.fill_(t + 1)
        return host

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()                       # warm-up: compile kernels, fill CuPy's pool
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    cache.zero_()
    cache_v.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    # replay over several positions with new data; compare with the uncaptured ops on CuPy copies
    ref_cache = cuda.zeros(tuple(cache.shape), np.uint8)
    ref_cache_v = cuda.zeros(tuple(cache.shape), np.uint8)
    for t in range(3):
        hq, hk, hv = load(t)
        g.replay()
        torch.cuda.synchronize()
        qo = cukv.write_kv_decode(cuda.asarray(hq), cuda.asarray(hk), cuda.asarray(hv), ref_cache, ref_cache_v,
                                  cuda.full(B, t, np.int32), fmt="fp8", pos_enc=rope)
        want = cukv.decode_attention(qo, ref_cache, ref_cache_v, cuda.full(B, t + 1, np.int32), fmt="fp8")
        assert_bytes_equal(t_np(cache), to_host(ref_cache), what=f"cache after replay {t}")
        assert_bytes_equal(t_np(out), to_host(want), what=f"attention after replay {t}")
