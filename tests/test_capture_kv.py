"""scripts/capture_kv.py on a tiny randomly initialised Llama (skipped without torch + transformers).

Checks that the saved K/V are the model's cache, that the saved queries rebuild the attention
module's own output (causal softmax(q k^T / sqrt(D)) v, GQA), and that ``cukv report`` reads the
file with its lanes and queries.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "capture_kv.py"
CONFIG = {"model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "tie_word_embeddings": False}
TEXT = "The quick brown fox jumps over the lazy dog.\n\nKV caches hold keys and values.\n"


def run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    d = tmp_path_factory.mktemp("capture")
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "text.txt").write_text(TEXT)
    r = run(SCRIPT, "--config", d / "config.json", "--text", d / "text.txt", "-o", d / "kv.npz",
            "--queries", "--dtype", "float32", "--seed", "3", cwd=d)
    assert r.returncode == 0, r.stderr
    return d, np.load(d / "kv.npz")


def _model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIG), torch_dtype=torch.float32)
    return m.eval()


def test_file_layout(captured):
    _, z = captured
    passages = [" ".join(p.split()) for p in TEXT.split("\n\n")]
    lens = [len(p.encode()) for p in passages]
    assert z["seq_lens"].tolist() == lens
    T = sum(lens)
    for L in range(2):
        assert z[f"k_layer{L}"].shape == (T, 2, 16) and z[f"v_layer{L}"].shape == (T, 2, 16)
        assert z[f"q_layer{L}"].shape == (T, 4, 16)
    assert z["token_ids"].tolist() == [b % 97 for p in passages for b in p.encode()]
    meta = json.loads(str(z["meta"]))
    assert meta["seed"] == 3 and meta["queries"] is True


def test_keys_values_are_the_cache(captured):
    _, z = captured
    model = _model()
    ids = z["token_ids"][: z["seq_lens"][0]]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids.tolist()]), use_cache=True)
    sys.path.insert(0, str(ROOT / "scripts"))
    from capture_kv import cache_layers

    for L, (k, v) in enumerate(cache_layers(out.past_key_values)):
        n = len(ids)
        assert np.array_equal(z[f"k_layer{L}"][:n], k[0].transpose(0, 1).numpy())
        assert np.array_equal(z[f"v_layer{L}"][:n], v[0].transpose(0, 1).numpy())


def test_queries_rebuild_the_attention_output(captured):
    """causal softmax(q k^T / sqrt(D)) v from the saved tensors == the input of o_proj."""
    _, z = captured
    model = _model()
    n = int(z["seq_lens"][0])
    ids = z["token_ids"][:n]
    seen = {}
    hooks = [layer.self_attn.o_proj.register_forward_hook(
        lambda mod, inp, out, L=L: seen.__setitem__(L, inp[0][0].detach().numpy()))
        for L, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids.tolist()]))
    for h in hooks:
        h.remove()
    for L in range(2):
        q = z[f"q_layer{L}"][:n].astype(np.float64)
        k = np.repeat(z[f"k_layer{L}"][:n].astype(np.float64), 2, axis=1)
        v = np.repeat(z[f"v_layer{L}"][:n].astype(np.float64), 2, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(16)
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v).reshape(n, 64)
        np.testing.assert_allclose(o, seen[L], rtol=1e-4, atol=1e-5)


def test_report_reads_the_capture(captured):
    d, _ = captured
    r = run("-m", "cukv", "report", d / "kv.npz", "--json", "-", "--formats", "fp8", cwd=d)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["lanes"] == 2 and res["attention"]["queries"] == "file" and res["kv_heads"] == 2
