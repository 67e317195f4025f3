"""cukv.io: containers, key conventions, layouts, validation, atomic and deterministic writes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from cukv import io as kvio
from cukv.io import KVError

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.float32, np.float16, BF16)
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "minilm_kv_sample.npz"


def rand(shape, dtype=np.float32, seed=0):
    r = np.random.default_rng(seed)
    return (r.standard_normal(shape) * 2 + 0.3).astype(np.float32).astype(dtype)


def kv_arrays(L=2, shape=(7, 2, 16), dtype=np.float32, k="k_layer{L}", v="v_layer{L}", seed=0):
    out = {}
    for i in range(L):
        out[k.replace("{L}", str(i))] = rand(shape, dtype, seed + 2 * i)
        out[v.replace("{L}", str(i))] = rand(shape, dtype, seed + 2 * i + 1)
    return out


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


# ------------------------------------------------------------------ containers and round trips
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_write_read_round_trip_bytes(tmp_path, suffix, dtype):
    arrays = kv_arrays(dtype=dtype)
    arrays["seq_lens"] = np.array([3, 4], dtype=np.int32)
    if suffix == ".npz":
        arrays["meta"] = np.array('{"a": 1}')              # 0-d unicode entry passes through
    p = tmp_path / f"f{suffix}"
    kvio.write_arrays(p, arrays, header={"x": "y"} if suffix == ".safetensors" else None)
    container, back, header = kvio.read_arrays(p)
    assert container == suffix[1:]
    assert list(back) == list(arrays) or set(back) == set(arrays)
    for n, a in arrays.items():
        assert back[n].dtype == a.dtype and back[n].shape == a.shape, n
        assert back[n].tobytes() == a.tobytes(), n
    if suffix == ".safetensors":
        assert header == {"x": "y"}


def test_npz_writes_are_deterministic(tmp_path):
    arrays = kv_arrays(dtype=BF16)
    kvio.write_arrays(tmp_path / "a.npz", arrays)
    os.utime(tmp_path / "a.npz", (0, 0))
    kvio.write_arrays(tmp_path / "b.npz", arrays)
    assert sha(tmp_path / "a.npz") == sha(tmp_path / "b.npz")


def test_bf16_npz_is_plain_numpy_v2(tmp_path):
    """bfloat16 entries are what np.save writes for them ('<V2'); plain np.load reads the bits."""
    a = rand((4, 2, 8), BF16)
    kvio.write_arrays(tmp_path / "b.npz", {"k_layer0": a, "v_layer0": a})
    raw = np.load(tmp_path / "b.npz")["k_layer0"]
    assert raw.dtype.kind == "V" and raw.dtype.itemsize == 2
    assert raw.tobytes() == a.tobytes()
    assert kvio.load_kv(tmp_path / "b.npz").dtype == BF16


def test_npy_stack(tmp_path):
    a = rand((3, 2, 5, 2, 16), np.float16)                     # [L, 2, T, H, D]
    np.save(tmp_path / "s.npy", a)
    kv = kvio.load_kv(tmp_path / "s.npy")
    assert kv.container == "npy" and kv.layers == [0, 1, 2] and kv.layout == "THD"
    assert np.array_equal(kv.tensor(2, "v"), a[2, 1])
    arrays, _ = kvio.dequantized_arrays(kv, {n: kv.arrays[n] for n in kv.kv_names}, "npy")
    kvio.write_arrays(tmp_path / "t.npy", arrays)
    assert (tmp_path / "t.npy").read_bytes() == (tmp_path / "s.npy").read_bytes()


def test_npy_bad_shape(tmp_path):
    np.save(tmp_path / "s.npy", rand((3, 5, 2, 16)))
    with pytest.raises(KVError, match=r"holds one array \[L, 2, \.\.\.\]"):
        kvio.load_kv(tmp_path / "s.npy")


def test_sample_file():
    kv = kvio.load_kv(SAMPLE)
    assert kv.layers == list(range(6)) and kv.layout == "THD" and kv.dtype == np.float16
    assert kv.shape == (333, 12, 32) and kv.kv_heads == 12 and kv.head_dim == 32
    lanes = kvio.lanes_of(kv)
    assert len(lanes) == 10 and sum(n for _, _, n in lanes) == 333 and lanes[1][1] == lanes[0][2]


# ------------------------------------------------------------------------------ conventions
CONVS = [("k_layer{L}", "v_layer{L}", (7, 2, 16), "THD"),
         ("layers.{L}.key", "layers.{L}.value", (7, 2, 16), "THD"),
         ("past_key_values.{L}.0", "past_key_values.{L}.1", (1, 2, 7, 16), "BHTD"),
         ("past_key_values.{L}.key", "past_key_values.{L}.value", (2, 2, 7, 16), "BHTD"),
         ("key_cache.{L}", "value_cache.{L}", (1, 2, 7, 16), "BHTD")]


@pytest.mark.parametrize("k,v,shape,layout", CONVS, ids=[c[0] for c in CONVS])
def test_conventions(tmp_path, k, v, shape, layout):
    arrays = kv_arrays(L=3, shape=shape, k=k, v=v)
    arrays["other"] = np.arange(3)
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    kv = kvio.load_kv(tmp_path / "f.npz")
    assert kv.convention.k == k and kv.layers == [0, 1, 2] and kv.layout == layout
    assert np.array_equal(kv.tensor(1, "k"), arrays[k.replace("{L}", "1")])
    assert np.array_equal(kv.tensor(2, "v"), arrays[v.replace("{L}", "2")])


def test_keys_override_and_queries(tmp_path):
    arrays = kv_arrays(L=2, k="enc.{L}.kk", v="enc.{L}.vv")
    arrays.update({f"enc.{i}.qq": rand((7, 4, 16), seed=9 + i) for i in range(2)})
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    with pytest.raises(KVError, match="no K/V tensors found"):
        kvio.load_kv(tmp_path / "f.npz")
    kv = kvio.load_kv(tmp_path / "f.npz", keys="enc.{L}.kk,enc.{L}.vv,enc.{L}.qq")
    assert kv.layers == [0, 1] and kv.q == {0: "enc.0.qq", 1: "enc.1.qq"}
    with pytest.raises(KVError, match="each with one"):
        kvio.load_kv(tmp_path / "f.npz", keys="enc.kk,enc.vv")
    with pytest.raises(KVError, match="no K/V tensors match"):
        kvio.load_kv(tmp_path / "f.npz", keys="x.{L},y.{L}")


def test_default_query_names(tmp_path):
    arrays = kv_arrays(L=2)
    arrays["q_layer0"] = rand((7, 4, 16))                     # GQA: 4 query heads, 2 KV heads
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    kv = kvio.load_kv(tmp_path / "f.npz")
    assert kv.q == {0: "q_layer0"}
    arrays["q_layer1"] = rand((7, 3, 16))                     # 3 is not a multiple of 2
    kvio.write_arrays(tmp_path / "g.npz", arrays)
    with pytest.raises(KVError, match="query tensor q_layer1"):
        kvio.load_kv(tmp_path / "g.npz")


def test_ambiguous_conventions(tmp_path):
    arrays = kv_arrays(L=1)
    arrays.update(kv_arrays(L=1, k="key_cache.{L}", v="value_cache.{L}"))
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    with pytest.raises(KVError, match="several conventions"):
        kvio.load_kv(tmp_path / "f.npz")


def test_missing_value(tmp_path):
    arrays = kv_arrays(L=2)
    del arrays["v_layer1"]
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    with pytest.raises(KVError, match="layer 1 has a key tensor .* but no value tensor"):
        kvio.load_kv(tmp_path / "f.npz")


# -------------------------------------------------------------------------------- layouts
def test_layouts(tmp_path):
    arrays = kv_arrays(L=1, shape=(2, 7, 3, 16))
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    with pytest.raises(KVError, match="ambiguous"):
        kvio.load_kv(tmp_path / "f.npz")
    a = kvio.load_kv(tmp_path / "f.npz", layout="BTHD")
    b = kvio.load_kv(tmp_path / "f.npz", layout="[B, H, T, D]")
    assert (a.kv_heads, b.kv_heads) == (3, 7) and a.layout_how == "given"
    with pytest.raises(KVError, match="does not fit 4-D"):
        kvio.load_kv(tmp_path / "f.npz", layout="THD")
    with pytest.raises(KVError, match="unsupported layout 'BDTH'"):
        kvio.load_kv(tmp_path / "f.npz", layout="BDTH")


@pytest.mark.parametrize("layout", ["THD", "BTHD", "BHTD"])
def test_to_from_bthd(layout):
    shape = {"THD": (5, 3, 8), "BTHD": (2, 5, 3, 8), "BHTD": (2, 3, 5, 8)}[layout]
    a = rand(shape)
    b = kvio.to_bthd(a, layout)
    assert b.shape[1:] == (5, 3, 8)
    assert np.shares_memory(a, b) and np.array_equal(kvio.from_bthd(b, layout), a)


def test_lengths_batch(tmp_path):
    arrays = kv_arrays(L=1, shape=(3, 2, 6, 16), k="key_cache.{L}", v="value_cache.{L}")
    arrays["seq_lens"] = np.array([6, 0, 2], dtype=np.int32)
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    assert kvio.lanes_of(kvio.load_kv(tmp_path / "f.npz")) == [(0, 0, 6), (1, 0, 0), (2, 0, 2)]
    arrays["seq_lens"] = np.array([7, 0, 2], dtype=np.int32)
    kvio.write_arrays(tmp_path / "g.npz", arrays)
    with pytest.raises(KVError, match="seq_lens: expected 3 lengths <= T = 6"):
        kvio.load_kv(tmp_path / "g.npz")


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path):
    with pytest.raises(KVError, match="no such file"):
        kvio.load_kv(tmp_path / "nope.npz")
    with pytest.raises(KVError, match="is a directory"):
        kvio.load_kv(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(KVError, match="not a valid .npz archive"):
        kvio.load_kv(tmp_path / "bad.npz")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(KVError, match="not a valid .safetensors file"):
        kvio.load_kv(tmp_path / "bad.safetensors")
    (tmp_path / "x.bin").write_bytes(b"hello world")
    with pytest.raises(KVError, match="unsupported file type"):
        kvio.load_kv(tmp_path / "x.bin")


def test_truncated_npz(tmp_path):
    kvio.write_arrays(tmp_path / "f.npz", kv_arrays())
    data = (tmp_path / "f.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(KVError, match="not a valid .npz archive"):
        kvio.load_kv(tmp_path / "t.npz")


@pytest.mark.parametrize("dtype", [np.float64, np.int32])
def test_unsupported_dtype(tmp_path, dtype):
    arrays = kv_arrays(L=2)
    arrays["k_layer1"] = arrays["k_layer1"].astype(dtype)
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    with pytest.raises(KVError, match=f"unsupported dtype {np.dtype(dtype).name} for k_layer1"):
        kvio.load_kv(tmp_path / "f.npz")


def test_inconsistent(tmp_path):
    arrays = kv_arrays(L=2)
    arrays["v_layer1"] = rand((8, 2, 16))
    kvio.write_arrays(tmp_path / "f.npz", arrays)
    with pytest.raises(KVError, match=r"inconsistent shapes: v_layer1 is \[8, 2, 16\]"):
        kvio.load_kv(tmp_path / "f.npz")
    arrays = kv_arrays(L=2)
    arrays["v_layer1"] = arrays["v_layer1"].astype(np.float16)
    kvio.write_arrays(tmp_path / "g.npz", arrays)
    with pytest.raises(KVError, match="inconsistent dtypes"):
        kvio.load_kv(tmp_path / "g.npz")


@pytest.mark.parametrize("shape", [(7, 16), (1, 1, 7, 2, 16)])
def test_unsupported_rank(tmp_path, shape):
    kvio.write_arrays(tmp_path / "f.npz", kv_arrays(L=1, shape=shape))
    with pytest.raises(KVError, match="unsupported layout"):
        kvio.load_kv(tmp_path / "f.npz")


def test_empty(tmp_path):
    kvio.write_arrays(tmp_path / "f.npz", kv_arrays(L=1, shape=(0, 2, 16)))
    with pytest.raises(KVError, match="empty"):
        kvio.load_kv(tmp_path / "f.npz")


# -------------------------------------------------------------------------------- atomicity
def test_atomic_write_failure_keeps_target(tmp_path):
    target = tmp_path / "out.npz"
    target.write_bytes(b"old")

    class Boom:
        dtype = np.dtype(np.float32)

        def __array__(self, *a, **k):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        kvio.write_arrays(target, {"a": np.ones(3), "b": Boom()})
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.npz"]                    # no temp left over


def test_write_into_missing_folder(tmp_path):
    with pytest.raises(KVError, match="does not exist"):
        kvio.write_arrays(tmp_path / "no" / "f.npz", {"a": np.ones(2)})


def test_quantized_file_metadata(tmp_path):
    import cukv

    arrays = kv_arrays(L=2, shape=(1, 2, 7, 16), k="past_key_values.{L}.key",
                       v="past_key_values.{L}.value", dtype=np.float16)
    kvio.write_arrays(tmp_path / "f.safetensors", arrays)
    kv = kvio.load_kv(tmp_path / "f.safetensors")
    rows = {n: cukv.quantize(kv.arrays[n], "int4:g2") for n in kv.kv_names}
    out, header = kvio.quantized_arrays(kv, "int4:g2", rows, "safetensors")
    kvio.write_arrays(tmp_path / "q.safetensors", out, header=header)
    q = kvio.load_kv(tmp_path / "q.safetensors")
    assert q.fmt == "int4:g2" and q.layout == "BHTD" and q.layout_how == "recorded in the file"
    assert q.dtype == np.float16 and q.shape == (1, 2, 7, 16)
    assert q.tensor(1, "k").dtype == np.uint8 and q.tensor(1, "k").shape == (1, 2, 7, 8 + 8)
