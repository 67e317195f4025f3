#!/usr/bin/env python3
"""Capture the K/V cache of a transformers causal LM over a text file, in cukv's file convention.

    python scripts/capture_kv.py --model PATH --text passages.txt -o kv.npz [--queries]
    python scripts/capture_kv.py --config config.json --text passages.txt -o kv.npz   # random weights

The text file holds passages separated by blank lines. Each passage runs as one forward pass
(batch 1, no padding, truncated to ``--max-tokens``), and its cache is read from the model's
``past_key_values``: keys after position encoding, exactly what a KV cache holds. The passages are
packed one after another along T. The file written has

=====================  =================  ===============================================
entry                  dtype              shape
=====================  =================  ===============================================
``k_layer{L}``         ``--dtype``        ``[T, N_KVH, D]``  (all passages, packed)
``v_layer{L}``         ``--dtype``        ``[T, N_KVH, D]``
``q_layer{L}``         ``--dtype``        ``[T, N_H, D]``, with ``--queries`` only: the queries the
                                          attention receives (after RoPE and any q norm)
``seq_lens``           int32              ``[P]`` tokens per passage
``token_ids``          int32              ``[T]``
``meta``               str (0-d)          JSON: model, config, dtype, passages (``.npz`` only;
                                          ``.safetensors`` keeps it in the header)
=====================  =================  ===============================================

``cukv report OUT`` then uses ``seq_lens`` as lanes and the ``q_layer`` tensors as queries.

``--model`` loads a local folder (``local_files_only``; nothing is downloaded) with its tokenizer.
``--config`` builds the model from a ``config.json`` with random weights (``--seed``); without
``--tokenizer`` the token ids are the text's UTF-8 bytes modulo the vocabulary size.
``--queries`` uses transformers' ``AttentionInterface`` (transformers >= 4.48): a registered
attention function records the query states, then calls the model's own SDPA attention.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:
    import cukv  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cukv import io as kvio  # noqa: E402

DTYPES = {"float16": np.float16, "bfloat16": kvio.BF16, "float32": np.float32}


def read_passages(path) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    parts = [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n")]
    return [p for p in parts if p]


def cache_layers(past) -> list:
    """``[(k, v), ...]`` of torch tensors ``[B, N_KVH, T, D]`` from any transformers cache object."""
    if hasattr(past, "layers"):                                   # transformers >= 4.56 Cache
        return [(lay.keys, lay.values) for lay in past.layers]
    if hasattr(past, "key_cache"):                                # DynamicCache, 4.36 .. 4.55
        return list(zip(past.key_cache, past.value_cache))
    if hasattr(past, "to_legacy_cache"):
        past = past.to_legacy_cache()
    return [(k, v) for k, v in past]                              # tuple of (k, v)


class QueryRecorder:
    """An attention function for ``AttentionInterface`` that records query states, then runs SDPA."""

    NAME = "cukv_capture"

    def __init__(self):
        self.q = {}

    def install(self, model):
        try:
            from transformers import AttentionInterface  # noqa: PLC0415
            from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415
        except ImportError:
            raise SystemExit("capture_kv: --queries needs transformers >= 4.48 (AttentionInterface)")

        def attention(module, query, key, value, attention_mask, **kwargs):
            self.q[int(module.layer_idx)] = query.detach()            # [B, N_H, T, D]
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.NAME, attention)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(self.NAME)
        else:
            model.config._attn_implementation = self.NAME


def build_model(args):
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tok = None
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                     torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model, local_files_only=True)
        source = {"model": str(args.model)}
    else:
        cfg_path = Path(args.config)
        if cfg_path.is_dir():
            cfg_path = cfg_path / "config.json"
        cfg_dict = json.loads(cfg_path.read_text())
        config = AutoConfig.for_model(**cfg_dict)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        if args.tokenizer:
            tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        source = {"config": cfg_dict, "seed": args.seed, "weights": "random (from_config)"}
    model.eval()
    return model, tok, source


def tokenize(tok, text: str, vocab: int, max_tokens: int) -> list[int]:
    if tok is None:
        ids = [b % vocab for b in text.encode("utf-8")]
    else:
        ids = tok(text)["input_ids"]
    return ids[:max_tokens]


def capture(args) -> dict:
    import torch  # noqa: PLC0415

    passages = read_passages(args.text)
    if not passages:
        raise SystemExit(f"capture_kv: {args.text}: no passages (blank-line separated) found")
    model, tok, source = build_model(args)
    rec = QueryRecorder() if args.queries else None
    if rec is not None:
        rec.install(model)
    vocab = int(model.config.vocab_size)
    ks, vs, qs, lens, ids_all = None, None, None, [], []
    with torch.no_grad():
        for text in passages:
            ids = tokenize(tok, text, vocab, args.max_tokens)
            if not ids:
                continue
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            layers = cache_layers(out.past_key_values)
            if ks is None:
                ks, vs = [[] for _ in layers], [[] for _ in layers]
                qs = [[] for _ in layers]
            for L, (k, v) in enumerate(layers):
                ks[L].append(k[0].transpose(0, 1).float().numpy())     # [T, N_KVH, D]
                vs[L].append(v[0].transpose(0, 1).float().numpy())
                if rec is not None:
                    qs[L].append(rec.q[L][0].transpose(0, 1).float().numpy())   # [T, N_H, D]
            lens.append(len(ids))
            ids_all.extend(ids)
    if ks is None:
        raise SystemExit("capture_kv: every passage tokenized to nothing")
    dt = DTYPES[args.dtype]
    arrays = {}
    for L in range(len(ks)):
        for name, parts in ((f"k_layer{L}", ks[L]), (f"v_layer{L}", vs[L])) + (
                ((f"q_layer{L}", qs[L]),) if rec is not None else ()):
            x = np.concatenate(parts).astype(np.float32)
            if dt == np.float16 and np.abs(x[np.isfinite(x)]).max(initial=0) > 65504:
                raise SystemExit(f"capture_kv: {name} exceeds the float16 range; use --dtype bfloat16")
            arrays[name] = x.astype(dt)
    arrays["seq_lens"] = np.array(lens, dtype=np.int32)
    arrays["token_ids"] = np.array(ids_all, dtype=np.int32)
    meta = {**source, "architecture": type(model).__name__, "dtype": args.dtype,
            "compute_dtype": "float32", "layout": "k_layer{L}/v_layer{L}: [T, N_KVH, D], passages "
            "packed along T (seq_lens)", "passages": passages, "queries": bool(args.queries),
            "keys": "past_key_values after position encoding", "tokenizer":
            ("utf-8 bytes mod vocab_size" if tok is None else str(args.tokenizer or args.model))}
    meta["versions"] = _versions()
    return {"arrays": arrays, "meta": meta}


def _versions() -> dict:
    out = {"numpy": np.__version__}
    for m in ("torch", "transformers"):
        try:
            out[m] = __import__(m).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local model folder (loaded with local_files_only)")
    src.add_argument("--config", help="config.json (or its folder): build the model with random weights")
    p.add_argument("--tokenizer", help="local tokenizer folder (default: the model's; none for --config)")
    p.add_argument("--text", required=True, help="text file, passages separated by blank lines")
    p.add_argument("-o", "--output", required=True, help="output .npz or .safetensors")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="stored dtype (default float16)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per passage at most (default 512)")
    p.add_argument("--queries", action="store_true", help="also save the query states (q_layer{L})")
    p.add_argument("--seed", type=int, default=0, help="weight seed for --config (default 0)")
    args = p.parse_args(argv)
    out = Path(args.output)
    if out.suffix.lower() not in (".npz", ".safetensors"):
        p.error("-o: expected a .npz or .safetensors file")
    res = capture(args)
    arrays = res["arrays"]
    text = json.dumps(res["meta"], sort_keys=True)
    try:
        if out.suffix.lower() == ".npz":
            arrays["meta"] = np.array(text)
            kvio.write_arrays(out, arrays)
        else:
            kvio.write_arrays(out, arrays, header={"meta": text})
    except kvio.KVError as e:
        raise SystemExit(f"capture_kv: {e}")
    L = sum(1 for n in arrays if n.startswith("k_layer"))
    k0 = arrays["k_layer0"]
    print(f"wrote {out}: {L} layers, K/V {kvio.dtype_name(k0.dtype)} {kvio.shape_str(k0.shape)} "
          f"[T, N_KVH, D], {len(arrays['seq_lens'])} passages"
          + (", queries q_layer{L}" if args.queries else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
