"""The ``cukv`` command, run as a subprocess: figures against the NumPy reference, stable JSON, PNG
plots, byte-exact round trips, and one line + exit 2 for every kind of bad input."""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from cukv import io as kvio
from cukv.ref import codec as ref

BF16 = np.dtype(ml_dtypes.bfloat16)
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "minilm_kv_sample.npz"
SHARED_README = ROOT.parent / "shared" / "data" / "README.md"


def cukv(*args, cwd=None, stderr=subprocess.PIPE, timeout=180):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CUKV_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "cukv", *map(str, args)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Traceback" not in (r.stderr or "")
    return r


def rand(shape, dtype=np.float32, seed=0, outliers=True):
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape).astype(np.float32)
    if outliers:
        x[..., 3] *= 8.0                                         # an outlier channel
        x = x + np.float32(0.25)
    return x.astype(dtype)


def make_kv(path, L=2, shape=(21, 2, 32), dtype=np.float32, k="k_layer{L}", v="v_layer{L}",
            extra=None, seed=0, header=None):
    arrays = {}
    for i in range(L):
        arrays[k.replace("{L}", str(i))] = rand(shape, dtype, seed + 2 * i)
        arrays[v.replace("{L}", str(i))] = rand(shape, dtype, seed + 2 * i + 1)
    arrays.update(extra or {})
    if str(path).endswith(".npy"):
        np.save(path, np.stack([np.stack([arrays[f"k_layer{i}"], arrays[f"v_layer{i}"]])
                                for i in range(L)]))
    else:
        kvio.write_arrays(path, arrays, header=header)
    return arrays


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


# ------------------------------------------------------------------------ NumPy reference side
def ref_deq(x, fmt):
    return ref.dequantize(ref.quantize(np.asarray(x).astype(np.float32), fmt), fmt)


def ref_errors(x, fmt):
    x64 = np.asarray(x).astype(np.float64)
    d64 = ref_deq(x, fmt).astype(np.float64)
    fin = np.isfinite(x64) & np.isfinite(d64)
    e = np.where(fin, d64 - x64, 0.0)
    xs = np.where(fin, x64, 0.0)
    sig, err = float((xs ** 2).sum()), float((e ** 2).sum())
    return {"sqnr_db": 10 * math.log10(sig / err), "rel_err": math.sqrt(err / sig),
            "max_abs_err": float(np.abs(e).max()),
            "poisoned": int((np.isfinite(x64) & ~np.isfinite(d64)).sum())}


def softmax_attn(q, k, v):
    """float64 attention, q [nq, N_H, D], k/v [n, N_KVH, D]; query head h reads KV head h // r."""
    r = q.shape[1] // k.shape[1]
    s = np.einsum("qhd,nhd->hqn", q, np.repeat(k, r, 1)) / math.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqn,nhd->qhd", p / p.sum(-1, keepdims=True), np.repeat(v, r, 1))


def ref_attn_err(lanes_q, lanes_k, lanes_v, fmt):
    """Relative L2 error of bf16-output attention over the dequantized lanes vs exact float64."""
    sig = err = 0.0
    for q, k, v in zip(lanes_q, lanes_k, lanes_v):
        q = q.astype(np.float32).astype(BF16).astype(np.float64)
        exact = softmax_attn(q, k.astype(np.float64), v.astype(np.float64))
        quant = softmax_attn(q, ref_deq(k, fmt).astype(np.float64), ref_deq(v, fmt).astype(np.float64))
        quant = quant.astype(np.float32).astype(BF16).astype(np.float64)
        sig += float((exact ** 2).sum())
        err += float(((quant - exact) ** 2).sum())
    return math.sqrt(err / sig)


def close(a, b, rtol=2e-5):
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12


def report_json(path, *extra, cwd=None):
    r = ok(cukv("report", path, "--json", "-", *extra, cwd=cwd))
    return json.loads(r.stdout), r


# --------------------------------------------------------------------------------- report
def test_report_figures_match_reference(tmp_path):
    lens = np.array([5, 9, 7], dtype=np.int32)
    arrays = make_kv(tmp_path / "f.npz", L=2, shape=(21, 2, 32), extra={"seq_lens": lens})
    res, r = report_json(tmp_path / "f.npz", "--formats", "fp8,int4:g2,bf16", "--device", "cpu")
    assert r.stderr == ""                                        # piped: no progress bar
    assert res["formats"] == ["fp8", "int4:g2", "bf16"] and res["lanes"] == 3
    assert res["attention"]["queries"] == "keys" and res["attention"]["queries_per_layer"] == 21
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    assert len(res["per_layer"]) == 6
    for row in res["per_layer"]:
        L, fmt = row["layer"], row["format"]
        k, v = arrays[f"k_layer{L}"], arrays[f"v_layer{L}"]
        for t, x in (("k", k), ("v", v)):
            want = ref_errors(x, fmt)
            for key in ("sqnr_db", "rel_err", "max_abs_err"):
                assert close(row[t][key], want[key]), (L, fmt, t, key, row[t][key], want[key])
            assert row[t]["nonfinite"] == 0 and row[t]["poisoned"] == 0
        lk = [k[s:s + n] for s, n in zip(starts, lens)]
        lv = [v[s:s + n] for s, n in zip(starts, lens)]
        want = ref_attn_err(lk, lk, lv, fmt)
        assert close(row["attn_rel_err"], want, 1e-4), (L, fmt, row["attn_rel_err"], want)
        assert close(row["attn_sqnr_db"], -20 * math.log10(want), 1e-4)
    s = res["summary"]
    assert s["fp8"]["bytes_per_element"] == 36 / 32 and s["int4:g2"]["bytes_per_element"] == 24 / 32
    assert s["fp8"]["memory_saved"] == 1 - 36 / 32 / 4 and s["bf16"]["memory_saved"] == 0.5
    for f in res["formats"]:
        worst = min(r[t]["sqnr_db"] for r in res["per_layer"] if r["format"] == f for t in "kv")
        assert s[f]["min_sqnr_db"] == worst and s[f]["safe"] == (worst >= res["threshold_db"])


def test_report_queries_from_file_gqa_bhtd(tmp_path):
    """transformers' [B, H, T, D] in .safetensors, 2 KV heads, 4 query heads from the file."""
    B, H, T, D, NH = 2, 2, 11, 16, 4
    extra = {f"queries.{i}": rand((B, NH, T, D), np.float16, 50 + i) for i in range(2)}
    extra["seq_lens"] = np.array([11, 6], dtype=np.int32)
    arrays = make_kv(tmp_path / "f.safetensors", shape=(B, H, T, D), dtype=np.float16,
                     k="past_key_values.{L}.key", v="past_key_values.{L}.value", extra=extra)
    res, _ = report_json(tmp_path / "f.safetensors", "--formats", "int4", "--queries", "4",
                         "--device", "cpu")
    assert res["layout"] == "BHTD" and res["attention"]["queries"] == "file"
    assert res["attention"]["queries_per_layer"] == 8
    for row in res["per_layer"]:
        L = row["layer"]
        k = arrays[f"past_key_values.{L}.key"].transpose(0, 2, 1, 3)
        v = arrays[f"past_key_values.{L}.value"].transpose(0, 2, 1, 3)
        q = extra[f"queries.{L}"].transpose(0, 2, 1, 3)
        lq, lk, lv = [], [], []
        for b, n in enumerate(extra["seq_lens"]):
            pos = np.unique(np.round(np.linspace(0, n - 1, 4)).astype(int))
            lq.append(q[b, pos])
            lk.append(k[b, :n])
            lv.append(v[b, :n])
        # the whole cache is quantized (padding rows included) but only [0, n) is attended
        want = ref_attn_err(lq, lk, lv, "int4:g1")
        assert close(row["attn_rel_err"], want, 1e-4), (row["attn_rel_err"], want)
    r = ok(cukv("report", tmp_path / "f.safetensors", "--formats", "int4", "--device", "cpu"))
    assert "from the file's query tensors" in r.stdout


def test_report_json_is_stable(tmp_path):
    make_kv(tmp_path / "f.npz")
    ok(cukv("report", tmp_path / "f.npz", "--json", tmp_path / "a.json"))
    ok(cukv("report", tmp_path / "f.npz", "--json", tmp_path / "b.json"))
    a = (tmp_path / "a.json").read_text()
    assert a == (tmp_path / "b.json").read_text()
    obj = json.loads(a)
    assert a == json.dumps(obj, sort_keys=True, indent=2) + "\n"
    out = ok(cukv("report", tmp_path / "f.npz", "--json", "-")).stdout
    assert out == a                                              # same bytes to stdout

    def floats(o):
        if isinstance(o, dict):
            for v in o.values():
                yield from floats(v)
        elif isinstance(o, list):
            for v in o:
                yield from floats(v)
        elif isinstance(o, float):
            yield o

    assert all(float(f"{f:.6g}") == f for f in floats(obj))
    assert obj["file"] == "f.npz"                                # no absolute paths


def check_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    n, tag = struct.unpack(">I4s", data[8:16])
    assert tag == b"IHDR" and n == 13
    w, h, depth, color = struct.unpack(">IIBB", data[16:26])
    assert 400 <= w <= 4000 and 200 <= h <= 4000 and depth == 8 and color in (2, 6)
    crc = struct.unpack(">I", data[16 + n:20 + n])[0]
    assert crc == zlib.crc32(data[12:16 + n]) & 0xFFFFFFFF
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return w, h


def test_sample_main_command(tmp_path):
    """The README's command: table on stdout, a valid PNG, figures equal to the reference."""
    r = ok(cukv("report", SAMPLE, "--plot", "report.png", cwd=tmp_path))
    check_png(tmp_path / "report.png")
    out = r.stdout
    assert "summary (safe = every layer's K and V SQNR >= 30 dB" in out
    for f in ("fp8", "int4:g1", "int4:g4"):
        assert f in out
    assert "from the keys (the file has no query tensors)" in out
    assert "NumPy float64" in out and "10 lane(s)" in out
    assert "wrote report.png" in out
    res, _ = report_json(SAMPLE, "--device", "cpu")
    z = np.load(SAMPLE)
    for row in res["per_layer"]:
        if row["layer"] in (0, 5):
            want = ref_errors(z[f"k_layer{row['layer']}"], row["format"])
            assert close(row["k"]["sqnr_db"], want["sqnr_db"])
    assert res["summary"]["fp8"]["safe"] and res["summary"]["fp8"]["bytes_per_element"] == 1.125


def test_inspect_sample_matches_shared_statistics():
    """absmax, mean |x| and channel spread of every layer equal the shared README's table."""
    r = ok(cukv("inspect", SAMPLE, "--json", "-"))
    res = json.loads(r.stdout)
    z = np.load(SAMPLE)
    assert res["dtype"] == "float16" and res["layout"] == "THD" and res["lanes"] == 10
    assert res["other_entries"] == ["seq_lens", "token_ids", "meta"]
    for t in res["tensors"]:
        x = z[t["name"]].astype(np.float64)
        ch = np.abs(x).max(axis=0)
        assert close(t["absmax"], np.abs(x).max()) and close(t["mean_abs"], np.abs(x).mean())
        assert close(t["outlier_ratio"], ch.max() / np.median(ch))
        h, d = np.unravel_index(np.argmax(ch), ch.shape)
        assert t["top_channel"] == f"h{h}/d{d}" and t["nonfinite"] == 0
    if SHARED_README.exists():                                   # the published figures
        text = SHARED_README.read_text()
        for L in range(6):
            t = next(t for t in res["tensors"] if t["name"] == f"k_layer{L}")
            line = next(s for s in text.splitlines() if s.startswith(f"| {L} | "))
            cells = [c.strip() for c in line.split("|")[1:-1]]
            assert f"{t['absmax']:.4f}" == cells[1] and f"{t['mean_abs']:.4f}" == cells[2]
            assert f"{t['outlier_ratio']:.2f}" == cells[3] and t["top_channel"] == cells[4]
    text = ok(cukv("inspect", SAMPLE)).stdout
    assert "k_layer0" in text and "8.1562" in text and "h2/d29" in text


def test_nonfinite_are_counted(tmp_path):
    arrays = make_kv(tmp_path / "f.npz", L=1, shape=(9, 2, 32))
    k = arrays["k_layer0"]
    k[2, 0, 5] = np.nan
    k[4, 1, 0] = np.inf
    k[6, 1, 9] = -np.inf
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    ins = json.loads(ok(cukv("inspect", tmp_path / "f.npz", "--json", "-")).stdout)
    t = ins["tensors"][0]
    assert (t["nonfinite"], t["nan"], t["posinf"], t["neginf"]) == (3, 1, 1, 1)
    assert t["absmax"] == float(f"{np.abs(k[np.isfinite(k)]).max():.6g}")
    res, _ = report_json(tmp_path / "f.npz", "--formats", "fp8,int4:g4")
    assert res["nonfinite_inputs"] == 3
    for row in res["per_layer"]:
        want = ref_errors(k, row["format"])
        assert row["k"]["nonfinite"] == 3 and row["k"]["poisoned"] == want["poisoned"] > 0
        assert close(row["k"]["sqnr_db"], want["sqnr_db"])
        # fp8: a row of 32 with one bad value poisons its other 31 values; int4:g4: its group of 7
        assert want["poisoned"] == (3 * 31 if row["format"] == "fp8" else 3 * 7)
    text = ok(cukv("report", tmp_path / "f.npz")).stdout
    assert "non-finite inputs: 3 values" in text


# ----------------------------------------------------------------------------- round trips
ROUND_TRIPS = [  # (container, dtype, fmt)
    (".npz", np.float32, "fp8"), (".npz", np.float16, "int4:g4"), (".npz", BF16, "int4:g1"),
    (".safetensors", np.float16, "fp8"), (".safetensors", BF16, "int4:g8"),
    (".safetensors", np.float32, "int4:g2"), (".npy", np.float32, "int4:g4"), (".npy", BF16, "fp8"),
]


@pytest.mark.parametrize("suffix,dtype,fmt", ROUND_TRIPS,
                         ids=[f"{s[1:]}-{np.dtype(d).name}-{f}" for s, d, f in ROUND_TRIPS])
def test_round_trip(tmp_path, suffix, dtype, fmt):
    src = tmp_path / f"kv{suffix}"
    conv = ("past_key_values.{L}.key", "past_key_values.{L}.value") if suffix == ".safetensors" \
        else ("k_layer{L}", "v_layer{L}")
    shape = (1, 3, 10, 32) if suffix == ".safetensors" else (10, 3, 32)
    extra = {} if suffix == ".npy" else {"token_ids": np.arange(10, dtype=np.int32)}
    if suffix == ".npz":
        extra["meta"] = np.array('{"model": "test"}')
    arrays = make_kv(src, L=2, shape=shape, dtype=dtype, k=conv[0], v=conv[1], extra=extra,
                     header={"note": "kept"} if suffix == ".safetensors" else None)
    h0 = sha(src)
    r = ok(cukv("quantize", src, "--format", fmt))
    qsuf = ".safetensors" if suffix == ".safetensors" else ".npz"
    q = tmp_path / f"kv.{fmt.replace(':', '-')}{qsuf}"
    assert q.exists() and f"wrote {q}" in r.stdout
    ok(cukv("quantize", src, "--format", fmt, "-o", tmp_path / f"again{qsuf}"))
    assert sha(q) == sha(tmp_path / f"again{qsuf}")             # deterministic bytes
    kq = kvio.load_kv(q)
    assert kq.fmt == fmt
    for n, rows in ((n, kq.arrays[n]) for n in kq.kv_names):
        assert rows.tobytes() == ref.quantize(arrays[n].astype(np.float32), fmt).tobytes(), n
    r = ok(cukv("dequantize", q))
    d = tmp_path / f"kv.{fmt.replace(':', '-')}.dequantized{suffix}"
    assert d.exists(), r.stdout
    ok(cukv("dequantize", q, "--dtype", "bfloat16", "-o", tmp_path / f"bf{qsuf}"))
    c0, a0, h_src = kvio.read_arrays(src)
    c1, a1, h_out = kvio.read_arrays(d)
    _, a2, _ = kvio.read_arrays(tmp_path / f"bf{qsuf}")
    assert c1 == c0 and list(a1) == list(a0) and h_out == h_src
    kv = kvio.load_kv(src)
    for name, a in a0.items():
        if name in kv.kv_names or name == "[stack]":
            continue
        assert a1[name].tobytes() == a.tobytes() and a1[name].dtype == a.dtype  # passed through
    kd = kvio.load_kv(d)
    assert kd.layout == kv.layout and kd.layers == kv.layers
    for n in kv.kv_names:
        x = kv.arrays[n]
        deq = ref_deq(x, fmt)
        assert kd.arrays[n].dtype == x.dtype and kd.arrays[n].shape == x.shape
        assert kd.arrays[n].tobytes() == deq.astype(np.float32).astype(x.dtype).tobytes(), n
        assert a2[n].dtype == BF16 and a2[n].tobytes() == deq.tobytes(), n
    assert sha(src) == h0


def test_bf16_round_trip_is_identity(tmp_path):
    make_kv(tmp_path / "kv.npz", dtype=BF16, extra={"seq_lens": np.array([21], np.int32)})
    ok(cukv("quantize", tmp_path / "kv.npz", "-f", "bf16", "-o", tmp_path / "q.npz"))
    ok(cukv("dequantize", tmp_path / "q.npz", "-o", tmp_path / "d.npz"))
    assert sha(tmp_path / "d.npz") == sha(tmp_path / "kv.npz")   # written by the same writer


def test_inputs_are_never_modified(tmp_path):
    src = tmp_path / "kv.npz"
    make_kv(src)
    os.chmod(src, 0o444)
    st = os.stat(src)
    h = sha(src)
    ok(cukv("inspect", src))
    ok(cukv("report", src, "--json", tmp_path / "r.json"))
    ok(cukv("quantize", src, "-f", "fp8", "-o", tmp_path / "q.npz"))
    q = tmp_path / "q.npz"
    hq = sha(q)
    ok(cukv("dequantize", q, "-o", tmp_path / "d.npz"))
    assert sha(src) == h and os.stat(src).st_mtime_ns == st.st_mtime_ns and sha(q) == hq
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "kv.npz", "q.npz", "r.json"]


# ------------------------------------------------------------------------------- bad input
def _bad_files(tmp):
    make_kv(tmp / "good.npz")
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    kvio.write_arrays(tmp / "nokv.npz", {"weights": np.ones((3, 4), np.float32)})
    a = make_kv(tmp / "inconsistent.npz", L=2)
    a["k_layer1"] = rand((20, 2, 32))
    kvio.write_arrays(tmp / "inconsistent.npz", a)
    make_kv(tmp / "f64.npz", dtype=np.float64)
    make_kv(tmp / "rank5.npz", shape=(1, 2, 5, 2, 32))
    make_kv(tmp / "ambiguous.npz", shape=(2, 5, 2, 32))
    make_kv(tmp / "d12.npz", shape=(5, 2, 12))
    make_kv(tmp / "d24.npz", shape=(5, 2, 24))


BAD = [  # (args, expected fragment of the message)
    (["report", "missing.npz"], "missing.npz: no such file"),
    (["inspect", "corrupt.npz"], "not a valid .npz archive"),
    (["report", "nokv.npz"], "no K/V tensors found"),
    (["quantize", "inconsistent.npz", "-f", "fp8"], "inconsistent shapes: k_layer1 is [20, 2, 32]"),
    (["report", "f64.npz"], "unsupported dtype float64 for k_layer0"),
    (["inspect", "rank5.npz"], "unsupported layout: K/V tensors are 5-D"),
    (["report", "ambiguous.npz"], "pass --layout BTHD or --layout BHTD"),
    (["report", "good.npz", "--layout", "BTHD"], "does not fit 3-D tensors"),
    (["report", "good.npz", "--layout", "xyz"], "unsupported layout 'xyz'"),
    (["report", "d12.npz"], "head_dim 12 is not supported by format 'fp8'"),
    (["report", "d24.npz", "--formats", "int4:g8"], "head_dim 24 is not supported by format 'int4:g8'"),
    (["report", "good.npz", "--formats", "fp4"], "unsupported format 'fp4'"),
    (["quantize", "good.npz", "-f", "fp8_head"], "fp8_head needs per-lane scales"),
    (["quantize", "good.npz", "-f", "fp8,int4"], "expected one format"),
    (["quantize", "good.npz", "-f", "fp8", "-o", "good.npz"], "refusing to overwrite the input"),
    (["quantize", "good.npz", "-f", "fp8", "-o", "q.npy"], "a quantized file is .npz or .safetensors"),
    (["quantize", "good.npz", "-f", "fp8", "-o", "nodir/q.npz"], "does not exist"),
    (["dequantize", "good.npz"], "not a cukv-quantized file"),
    (["report", "good.npz", "--keys", "k{L}"], "expected 'K_PATTERN,V_PATTERN'"),
    (["report", "good.npz", "--queries", "0"], "--queries: expected >= 1"),
    (["report", "good.npz", "--json", "."], "is a directory"),
]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    _bad_files(d)
    return d


@pytest.mark.parametrize("args,msg", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2(bad_dir, args, msg):
    before = {p.name: sha(p) for p in bad_dir.iterdir() if p.is_file()}
    r = cukv(*args, cwd=bad_dir)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cukv: error: "), r.stderr
    assert msg in lines[0], lines[0]
    assert r.stdout == ""
    assert {p.name: sha(p) for p in bad_dir.iterdir() if p.is_file()} == before  # nothing written


def test_quantize_twice_and_report_quantized(tmp_path):
    make_kv(tmp_path / "kv.npz")
    ok(cukv("quantize", tmp_path / "kv.npz", "-f", "fp8", "-o", tmp_path / "q.npz"))
    for cmd in (["quantize", "q.npz", "-f", "int4"], ["report", "q.npz"]):
        r = cukv(*cmd, cwd=tmp_path)
        assert r.returncode == 2 and "already quantized (fp8)" in r.stderr
    r = ok(cukv("inspect", "q.npz", cwd=tmp_path))
    assert "quantized: fp8" in r.stdout


def test_head_dim_fallback_is_announced(tmp_path):
    make_kv(tmp_path / "kv.npz", shape=(9, 2, 16))
    r = ok(cukv("report", tmp_path / "kv.npz", "--formats", "fp8"))
    assert "attention: NumPy float64 over the dequantized bf16 values (" in r.stdout


def test_device_gpu_without_gpu(tmp_path):
    from cukv import _backend

    if _backend.gpu_available()[0]:
        pytest.skip("a GPU is present: --device gpu is valid here")
    make_kv(tmp_path / "kv.npz")
    r = cukv("report", tmp_path / "kv.npz", "--device", "gpu")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("cukv: error: --device gpu: no usable GPU")


def test_usage_errors_and_main():
    from cukv.cli import main

    assert main(["--help"]) == 0
    assert main([]) == 2
    assert main(["report", "/nonexistent/x.npz"]) == 2
    r = cukv("report")
    assert r.returncode == 2 and "the following arguments are required: FILE" in r.stderr


# -------------------------------------------------------------------------------- progress
def test_progress_bar_only_on_a_terminal(tmp_path):
    pytest.importorskip("tqdm")
    pty = pytest.importorskip("pty")
    make_kv(tmp_path / "kv.npz", L=3)
    r = ok(cukv("report", tmp_path / "kv.npz"))
    assert r.stderr == ""
    master, slave = pty.openpty()
    import fcntl
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "cukv", "report", str(tmp_path / "kv.npz")], env=env,
                         stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                b = os.read(master, 4096)      # EIO once the child has exited
            except OSError:
                break
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(master)
    assert p.wait(timeout=120) == 0
    err = b"".join(chunks).decode(errors="replace")
    assert "report:" in err and "/9 [" in err, err        # 3 layers x 3 formats


# ---------------------------------------------------------------------------------- device
def test_gpu_matches_cpu_on_the_sample(tmp_path):
    """--device gpu gives the same figures as --device cpu (bit-exact codec): within 0.01 dB."""
    from cukv import _backend

    okg, why = _backend.gpu_available()
    if not okg:
        pytest.skip(f"no GPU: {why}")
    cpu, _ = report_json(SAMPLE, "--device", "cpu")
    gpu, _ = report_json(SAMPLE, "--device", "gpu")
    assert gpu["device"] == "gpu" and cpu["device"] == "cpu"
    for a, b in zip(cpu["per_layer"], gpu["per_layer"]):
        for t in "kv":
            assert abs(a[t]["sqnr_db"] - b[t]["sqnr_db"]) <= 0.01
            assert a[t]["max_abs_err"] == b[t]["max_abs_err"]
        assert abs(a["attn_sqnr_db"] - b["attn_sqnr_db"]) <= 0.01


# ------------------------------------------------------------------ library attention packing
def fake_decode_attention(q, cache_k, cache_v, seqlens, *, fmt, softmax_scale):
    """SPEC §8.1 decode attention over the dequantized cache, float64, bf16 output (a test double)."""
    B, NH, D = q.shape
    r = NH // cache_k.shape[2]
    out = np.zeros((B, NH, D))
    for b in range(B):
        n = int(seqlens[b])
        k = ref.dequantize(cache_k[b, :n], fmt).astype(np.float64)
        v = ref.dequantize(cache_v[b, :n], fmt).astype(np.float64)
        for h in range(NH):
            s = softmax_scale * (k[:, h // r] @ q[b, h].astype(np.float64))
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[:, h // r]
    return out.astype(np.float32).astype(BF16)


@pytest.mark.parametrize("fmt", ["fp8", "int4:g2"])
def test_library_attention_packing(tmp_path, fmt):
    """Queries packed as extra GQA heads, in chunks, give each query its own decode output."""
    from cukv.cli import AttentionProbe, Device

    B, T, H, D, NH = 3, 13, 2, 16, 4
    extra = {f"q_layer{i}": rand((B, T, NH, D), np.float32, 70 + i) for i in range(1)}
    extra["seq_lens"] = np.array([13, 5, 9], dtype=np.int32)
    arrays = make_kv(tmp_path / "f.npz", L=1, shape=(B, T, H, D), extra=extra)
    kv = kvio.load_kv(tmp_path / "f.npz", layout="BTHD")
    probe = AttentionProbe(kv, 0, max_queries=11)
    rk = ref.quantize(arrays["k_layer0"], fmt)
    rv = ref.quantize(arrays["v_layer0"], fmt)
    got = probe.quantized_library(Device("cpu"), fake_decode_attention, fmt, rk, rv)
    want = probe.quantized_f64(ref.dequantize(rk, fmt), ref.dequantize(rv, fmt))
    assert [g.shape for g in got] == [(11, NH, D), (5, NH, D), (9, NH, D)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2 ** -7, atol=1e-6)


def test_library_attention_figures(tmp_path):
    """With cukv.decode_attention in the build, a D=64 report uses it and agrees with float64."""
    from cukv.cli import _library_attention

    if _library_attention() is None:
        pytest.skip("cukv.decode_attention is not in this build yet")
    lens = np.array([17, 30], dtype=np.int32)
    arrays = make_kv(tmp_path / "f.npz", L=1, shape=(47, 2, 64), extra={"seq_lens": lens})
    res, _ = report_json(tmp_path / "f.npz", "--formats", "fp8,int4:g2", "--device", "cpu")
    assert res["attention"]["backend"].startswith("cukv.decode_attention")
    k, v = arrays["k_layer0"], arrays["v_layer0"]
    lk, lv = [k[:17], k[17:]], [v[:17], v[17:]]
    for row in res["per_layer"]:
        want = ref_attn_err(lk, lk, lv, row["format"])
        assert abs(row["attn_rel_err"] - want) <= 0.02 * want + 2e-3, (row["attn_rel_err"], want)
