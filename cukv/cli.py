"""The ``cukv`` command: inspect, quantize, dequantize and report on saved K/V tensors.

``cukv inspect FILE``
    The K/V tensors found (layer, K or V, shape, layout, dtype) and per-tensor statistics.
``cukv quantize FILE --format fp8|int4[:gN] [-o OUT]``
    Writes a file of cukv cache rows that records its format (``cukv.io``).
``cukv dequantize FILE [-o OUT]``
    Restores keys, shapes and layout; the values are the dequantized bfloat16 values.
``cukv report FILE [--formats ...] [--plot report.png] [--json out.json] [--device ...]``
    Quantization error per layer, K/V and format, and the decode-attention output error.

Bad input prints one line ``cukv: error: ...`` on stderr and exits with 2. The row codec is
:func:`cukv.quantize` / :func:`cukv.dequantize` (NumPy reference on the CPU, CUDA kernels on the
GPU, bit-identical). Optional packages (``pip install 'cukv[cli]'``) are imported only where
needed: safetensors for ``.safetensors`` files, matplotlib for ``--plot``, tqdm for the progress
bar (shown only when stderr is a terminal).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from . import io as kvio
from .io import KVError

__all__ = ["main", "build_parser", "run_report", "stable_json", "attention_f64"]

DEFAULT_FORMATS = "fp8,int4:g1,int4:g4"
DEFAULT_THRESHOLD_DB = 30.0
DEFAULT_QUERIES = 64
HIST_EDGES = np.round(np.arange(-6.0, 1.0 + 1e-9, 0.1), 1)   # log10(|error| / RMS of the tensor)
ATTN_HEAD_DIMS = (64, 128, 256)                               # head_dims of the attention kernels
CLI_FORMATS = ("bf16", "fp8", "int4", "int4:g1", "int4:g2", "int4:g4", "int4:g8")


# ------------------------------------------------------------------------------------ helpers
def _say(msg: str = "") -> None:
    print(msg, file=sys.stdout)


def _note(msg: str) -> None:
    print(f"cukv: {msg}", file=sys.stderr)


def _round(x, sig: int = 6):
    """Floats to ``sig`` significant digits; non-finite floats become ``None`` (JSON null)."""
    if isinstance(x, dict):
        return {str(k): _round(v, sig) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, sig) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if not math.isfinite(x):
            return None
        return float(f"{x:.{sig}g}") if x != 0 else 0.0
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def stable_json(obj) -> str:
    """Sorted keys, floats rounded to 6 significant digits, ``null`` for inf/NaN, newline-ended."""
    return json.dumps(_round(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"


def _write_text(path, text: str) -> None:
    with kvio.atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def _check_output(out, inp) -> Path:
    out = Path(out)
    if out.exists() and os.path.samefile(out, inp):
        raise KVError(f"{out}: refusing to overwrite the input file; choose another -o")
    if out.is_dir():
        raise KVError(f"{out}: is a directory; give a file name")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise KVError(f"{out}: the folder {out.parent} does not exist")
    return out


def _progress(total: int, desc: str):
    """A tqdm bar on stderr when it is a terminal, else ``None`` (also when tqdm is missing)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, unit="step")


def _parse_formats(s: str, D: int, path) -> list[str]:
    from .formats import check_head_dim, parse_format  # noqa: PLC0415

    out = []
    for f in (p.strip() for p in s.split(",")):
        if not f:
            continue
        if f not in CLI_FORMATS:
            extra = (" (fp8_head needs per-lane scales from a running amax; use the Python API)"
                     if f == "fp8_head" else "")
            raise KVError(f"unsupported format {f!r}: expected one of {', '.join(CLI_FORMATS)}{extra}")
        name = "int4:g1" if f == "int4" else f
        parse_format(name)
        try:
            check_head_dim(name, D)
        except ValueError:
            need = "D % 8 == 0"
            if name.startswith("int4"):
                need += f" and D % {2 * parse_format(name)[1]} == 0"
            raise KVError(f"{path}: head_dim {D} is not supported by format {name!r} "
                          f"(needs {need})") from None
        if name not in out:
            out.append(name)
    if not out:
        raise KVError("--formats: expected at least one format")
    return out


def bytes_per_element(fmt: str, D: int) -> float:
    """Cache bytes per K/V element of ``fmt`` (inline qparams included)."""
    from .formats import row_bytes  # noqa: PLC0415

    R = row_bytes(fmt, D)
    return (2.0 * R if fmt == "bf16" else float(R)) / D


# ----------------------------------------------------------------------------------- devices
class Device:
    """Where the codec (and, when it exists and takes the head_dim, decode attention) runs."""

    def __init__(self, choice: str):
        from . import _backend  # noqa: PLC0415

        self.choice = choice
        self.reason = ""
        if choice == "cpu":
            self.gpu = False
            self.reason = "--device cpu"
        else:
            ok, why = _backend.gpu_available()
            if choice == "gpu" and not ok:
                raise KVError(f"--device gpu: no usable GPU ({why})")
            self.gpu = ok
            self.reason = "" if ok else why
        self.name = "gpu" if self.gpu else "cpu"

    @property
    def xp(self):
        if self.gpu:
            from . import _backend  # noqa: PLC0415

            return _backend.cupy()
        return np

    def to(self, a):
        return self.xp.asarray(a) if self.gpu else a

    def host(self, a):
        return a.get() if self.gpu else a

    def describe(self) -> str:
        if self.gpu:
            cp = self.xp
            props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            return f"gpu ({name}, CUDA kernels)"
        why = ""
        if self.reason and self.choice == "auto":
            why = "; no GPU: " + ("CuPy is not installed" if "No module named" in self.reason
                                 else self.reason.split(" (")[0])
        return f"cpu (NumPy reference{why})"


def _codec(dev: Device, x, fmt: str):
    """``(rows, dequantized)`` of host array ``x`` in format ``fmt`` on ``dev`` (device arrays)."""
    import cukv  # noqa: PLC0415

    xd = dev.to(x)
    rows = cukv.quantize(xd, fmt)
    return rows, cukv.dequantize(rows, fmt)


# --------------------------------------------------------------------------------- statistics
def tensor_stats(x: np.ndarray, layout: str) -> dict:
    """absmax, mean |x|, outlier-channel ratio (with the channel holding absmax), non-finite counts.

    A channel is one (head, dim) pair; its absmax is over every token (and lane). ``outlier_ratio``
    is the largest channel absmax divided by the median channel absmax. Non-finite values are
    counted and left out of the other figures.
    """
    a = kvio.to_bthd(x, layout).astype(np.float64)
    fin = np.isfinite(a)
    nan = int(np.isnan(a).sum())
    posinf = int((a == np.inf).sum())
    neginf = int((a == -np.inf).sum())
    ab = np.where(fin, np.abs(a), 0.0)
    n_fin = int(fin.sum())
    ch = ab.max(axis=(0, 1))                                       # [H, D]
    med = float(np.median(ch))
    h, d = np.unravel_index(int(np.argmax(ch)), ch.shape)
    return {
        "absmax": float(ab.max()) if n_fin else float("nan"),
        "mean_abs": float(ab.sum() / n_fin) if n_fin else float("nan"),
        "outlier_ratio": float(ch.max() / med) if med > 0 else float("inf"),
        "top_channel": f"h{h}/d{d}",
        "nonfinite": nan + posinf + neginf,
        "nan": nan, "posinf": posinf, "neginf": neginf,
        "elements": int(a.size),
    }


def error_stats(xp, x, deq) -> dict:
    """Error of dequantized ``deq`` against ``x`` (same module ``xp``), in float64.

    ``sqnr_db = 10 log10(sum x^2 / sum e^2)``, ``rel_err = ||e||_2 / ||x||_2``, ``max_abs_err``,
    over elements where both ``x`` and ``deq`` are finite. ``nonfinite`` counts non-finite inputs;
    ``poisoned`` counts finite inputs whose dequantized value is not finite (a non-finite value
    elsewhere in their row or group, SPEC §11.4, or an fp16 qparam overflow).
    """
    x64 = x.astype(xp.float64)
    d64 = deq.astype(xp.float64)
    fin_in = xp.isfinite(x64)
    fin = fin_in & xp.isfinite(d64)
    n_in, n_fin = int(fin_in.sum()), int(fin.sum())
    e = xp.where(fin, d64 - x64, 0.0)
    xs = xp.where(fin, x64, 0.0)
    sig = float((xs * xs).sum())
    err = float((e * e).sum())
    ae = xp.abs(e)
    rms = math.sqrt(sig / n_fin) if n_fin else 0.0
    if rms > 0:
        with np.errstate(divide="ignore"):
            lg = xp.log10(ae[fin & (ae > 0)] / rms)
        counts, _ = xp.histogram(xp.clip(lg, HIST_EDGES[0], HIST_EDGES[-1]), bins=xp.asarray(HIST_EDGES))
        counts = [int(c) for c in (counts.get() if hasattr(counts, "get") else counts)]
    else:
        counts = [0] * (len(HIST_EDGES) - 1)
    return {
        "sqnr_db": _db(sig, err),
        "rel_err": math.sqrt(err / sig) if sig > 0 else (0.0 if err == 0 else float("inf")),
        "max_abs_err": float(ae.max()) if n_fin else float("nan"),
        "nonfinite": int(x.size) - n_in,
        "poisoned": n_in - n_fin,
        "exact": int((fin & (ae == 0)).sum()),
        "hist": counts,
    }


def _db(sig: float, err: float) -> float:
    if err == 0:
        return float("inf")
    if sig == 0:
        return float("-inf")
    return 10.0 * math.log10(sig / err)


# ---------------------------------------------------------------------------------- attention
def attention_f64(q, k, v, scale: float):
    """Softmax attention of every query over every key, in float64 (NumPy).

    Parameters
    ----------
    q : ``[nq, N_H, D]``; k, v : ``[n, N_KVH, D]`` (any float dtype); ``N_H % N_KVH == 0``, query
        head ``h`` reads KV head ``h // (N_H / N_KVH)``.
    scale : softmax scale (``1/sqrt(D)`` for decode attention's default).

    Returns
    -------
    float64 ``[nq, N_H, D]``: ``softmax(scale * q k^T) v`` per head, with the max subtracted.

    Notes
    -----
    The *exact* side of the attention-output error: it runs over the original fp16/fp32 values
    (no cache format holds them, and nothing is rounded to bf16). It is also the quantized side, over
    the dequantized bf16 values, when ``cukv.decode_attention`` is missing or does not take the
    head_dim (the kernels take 64/128/256).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    r = q.shape[1] // k.shape[1]
    kk = np.repeat(k, r, axis=1)
    vv = np.repeat(v, r, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.einsum("qhd,nhd->hqn", q, kk) * scale
        s = s - s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        return np.einsum("hqn,nhd->qhd", p, vv)


def _library_attention():
    """``cukv.decode_attention`` when this build has it (SPEC §8.1), else ``None``."""
    import cukv  # noqa: PLC0415

    fn = getattr(cukv, "decode_attention", None)
    if fn is None:
        try:
            from . import attention_decode  # noqa: PLC0415
        except ImportError:
            return None
        fn = getattr(attention_decode, "decode_attention", None)
    return fn


class AttentionProbe:
    """Queries and lanes of one layer, and the exact float64 attention output over them.

    Lane ``i`` holds the tokens of one sequence; its queries are up to ``max_queries`` of its rows
    (evenly spaced, all rows when it is short), taken from the file's query tensor when there is one,
    else from its keys, rounded to bfloat16 (decode attention takes bf16 queries). Every query attends
    every key of its lane (a decode step at the end of the lane).
    """

    def __init__(self, kv: kvio.KVFile, L: int, max_queries: int):
        self.lanes = [ln for ln in kvio.lanes_of(kv) if ln[2] > 0]
        self.layout = kv.layout
        self.D = kv.head_dim
        self.scale = 1.0 / math.sqrt(self.D)
        self.from_file = L in kv.q
        src = kv.arrays[kv.q[L]] if self.from_file else kv.tensor(L, "k")
        qb = kvio.to_bthd(src, kv.layout)
        from .io import BF16  # noqa: PLC0415

        self.pos = []
        qs = []
        for b, start, n in self.lanes:
            p = np.unique(np.round(np.linspace(0, n - 1, min(n, max_queries))).astype(np.int64))
            self.pos.append(p)
            qs.append(qb[b, start + p].astype(np.float32).astype(BF16))
        self.q = qs                                        # per lane bf16 [nq, N_H, D]
        self.n_queries = int(sum(len(p) for p in self.pos))
        k = kvio.to_bthd(kv.tensor(L, "k"), kv.layout)
        v = kvio.to_bthd(kv.tensor(L, "v"), kv.layout)
        self.exact = [attention_f64(q, k[b, s:s + n], v[b, s:s + n], self.scale)
                      for q, (b, s, n) in zip(self.q, self.lanes)]

    def lane_stack(self, xp, a_bthd):
        """``[n_lanes, max_len, H, R]`` zero-padded lanes of a ``[B, T, H, R]`` (device) array."""
        m = max(n for _, _, n in self.lanes)
        out = xp.zeros((len(self.lanes), m) + tuple(a_bthd.shape[2:]), dtype=a_bthd.dtype)
        for i, (b, s, n) in enumerate(self.lanes):
            out[i, :n] = a_bthd[b, s:s + n]
        return out

    def quantized_library(self, dev: Device, fn, fmt: str, rows_k, rows_v) -> list:
        """Outputs of ``cukv.decode_attention`` on the quantized caches (device arrays).

        One call serves ``c`` queries of every lane: query ``j`` of head ``h`` becomes head
        ``h*c + j``, which decode attention's GQA mapping sends to KV head ``h // (N_H / N_KVH)``.
        ``c`` keeps the GQA ratio of a call at most 8 (or the file's own ratio, if larger).
        """
        xp = dev.xp
        from .io import BF16  # noqa: PLC0415

        ck = self.lane_stack(xp, kvio.to_bthd(rows_k, self.layout))
        cv = self.lane_stack(xp, kvio.to_bthd(rows_v, self.layout))
        nl = len(self.lanes)
        nq = max(len(p) for p in self.pos)
        nh = self.q[0].shape[1]
        c = max(1, 8 // (nh // int(ck.shape[2])))
        qa = np.zeros((nl, nh, nq, self.D), dtype=BF16)
        for i, q in enumerate(self.q):
            qa[i, :, :len(q)] = q.transpose(1, 0, 2)
        seqlens = dev.to(np.array([n for _, _, n in self.lanes], dtype=np.int32))
        out = np.zeros((nl, nh, nq, self.D), dtype=np.float64)
        for j in range(0, nq, c):
            qc = np.ascontiguousarray(qa[:, :, j:j + c])              # [nl, nh, c', D]
            cc = qc.shape[2]
            o = fn(dev.to(qc.reshape(nl, nh * cc, self.D)), ck, cv, seqlens, fmt=fmt,
                   softmax_scale=self.scale)
            out[:, :, j:j + cc] = dev.host(o).astype(np.float64).reshape(nl, nh, cc, self.D)
        return [out[i, :, :len(q)].transpose(1, 0, 2) for i, q in enumerate(self.q)]

    def quantized_f64(self, deq_k, deq_v) -> list:
        """Float64 attention over the dequantized (host, bf16) values, output rounded to bf16."""
        from .io import BF16  # noqa: PLC0415

        k = kvio.to_bthd(deq_k, self.layout)
        v = kvio.to_bthd(deq_v, self.layout)
        return [attention_f64(q, k[b, s:s + n], v[b, s:s + n], self.scale)
                .astype(np.float32).astype(BF16).astype(np.float64)
                for q, (b, s, n) in zip(self.q, self.lanes)]

    def error(self, outs: list) -> dict:
        """``rel_err = ||O_q - O||_2 / ||O||_2`` and its dB form over every finite output row."""
        sig = err = 0.0
        bad = 0
        for o, e in zip(outs, self.exact):
            ok = np.isfinite(o).all(axis=-1) & np.isfinite(e).all(axis=-1)
            bad += int((~ok).sum())
            d = np.where(ok[..., None], o - e, 0.0)
            ee = np.where(ok[..., None], e, 0.0)
            sig += float((ee * ee).sum())
            err += float((d * d).sum())
        return {"attn_sqnr_db": _db(sig, err),
                "attn_rel_err": math.sqrt(err / sig) if sig > 0 else float("nan"),
                "attn_nonfinite_rows": bad}


# ------------------------------------------------------------------------------------ report
def run_report(kv: kvio.KVFile, formats: list, dev: Device, *, threshold: float, max_queries: int,
               progress=None) -> dict:
    """Every figure of ``cukv report`` as a dict (see :func:`stable_json` for its JSON form)."""
    D = kv.head_dim
    fn = _library_attention()
    if fn is not None and D in ATTN_HEAD_DIMS:
        attn_backend = "cukv.decode_attention" + (" (CUDA kernel)" if dev.gpu else " (NumPy reference)")
        attn_note = ""
    else:
        attn_backend = "NumPy float64 over the dequantized bf16 values"
        attn_note = (f"head_dim {D} is not one of the attention kernels' {'/'.join(map(str, ATTN_HEAD_DIMS))}"
                     if fn is not None else "cukv.decode_attention is not in this build")
        fn = None
    itemsize = kv.dtype.itemsize
    rows = []
    hist = {f: [0] * (len(HIST_EDGES) - 1) for f in formats}
    probes_from_file = []
    n_queries = 0
    for L in kv.layers:
        xk, xv = kv.tensor(L, "k"), kv.tensor(L, "v")
        probe = AttentionProbe(kv, L, max_queries)
        probes_from_file.append(probe.from_file)
        n_queries = probe.n_queries
        for fmt in formats:
            rk, dk = _codec(dev, xk, fmt)
            rv, dv = _codec(dev, xv, fmt)
            sk = error_stats(dev.xp, dev.to(xk), dk)
            sv = error_stats(dev.xp, dev.to(xv), dv)
            for s in (sk, sv):
                hist[fmt] = [a + b for a, b in zip(hist[fmt], s.pop("hist"))]
            if fn is not None:
                outs = probe.quantized_library(dev, fn, fmt, rk, rv)
            else:
                outs = probe.quantized_f64(dev.host(dk), dev.host(dv))
            rows.append({"layer": L, "format": fmt, "k": sk, "v": sv, **probe.error(outs)})
            if progress is not None:
                progress.update(1)
    summary = {}
    for fmt in formats:
        rs = [r for r in rows if r["format"] == fmt]
        sq = [r[t]["sqnr_db"] for r in rs for t in ("k", "v")]
        at = [r["attn_sqnr_db"] for r in rs]
        bpe = bytes_per_element(fmt, D)
        worst = min(sq)
        summary[fmt] = {
            "bytes_per_element": bpe,
            "memory_saved": 1.0 - bpe / itemsize,
            "memory_saved_vs_bf16": 1.0 - bpe / 2.0,
            "min_sqnr_db": worst,
            "mean_sqnr_db": float(np.mean(sq)),
            "min_attn_sqnr_db": min(at),
            "max_attn_rel_err": max(r["attn_rel_err"] for r in rs),
            "max_abs_err": max(r[t]["max_abs_err"] for r in rs for t in ("k", "v")),
            "poisoned": sum(r[t]["poisoned"] for r in rs for t in ("k", "v")),
            "safe": bool(worst >= threshold),
        }
    nonfinite = sum(tensor_nonfinite(kv, L, t) for L in kv.layers for t in ("k", "v"))
    lanes = kvio.lanes_of(kv)
    return {
        "cukv_version": kvio._version(),
        "file": os.path.basename(kv.path),
        "container": kv.container,
        "convention": kv.convention.label,
        "layout": kv.layout,
        "dtype": kvio.dtype_name(kv.dtype),
        "shape": list(kv.shape),
        "layers": kv.layers,
        "head_dim": D,
        "kv_heads": kv.kv_heads,
        "lanes": len(lanes),
        "lanes_from": "seq_lens" if kv.lengths() is not None else ("batch" if kv.layout != "THD" else "one"),
        "device": dev.name,
        "formats": formats,
        "threshold_db": threshold,
        "nonfinite_inputs": nonfinite,
        "attention": {
            "backend": attn_backend,
            "note": attn_note,
            "queries": ("file" if all(probes_from_file) else
                        "keys" if not any(probes_from_file) else "file for some layers, keys for others"),
            "query_layers_from_file": [L for L, f in zip(kv.layers, probes_from_file) if f],
            "queries_per_layer": n_queries,
            "max_queries_per_lane": max_queries,
            "softmax_scale": 1.0 / math.sqrt(D),
        },
        "summary": summary,
        "per_layer": rows,
        "error_histogram": {"edges_log10_err_over_rms": HIST_EDGES.tolist(), "counts": hist},
    }


def tensor_nonfinite(kv, L, t) -> int:
    a = kv.tensor(L, t)
    return int(a.size - np.isfinite(a.astype(np.float32)).sum())


def _fmt_db(x: float) -> str:
    if x == float("inf"):
        return "inf"
    if x == float("-inf"):
        return "-inf"
    if x != x:
        return "nan"
    return f"{x:.2f}"


def _table(rows: list, header: list) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 or not _numeric(c) else c.rjust(w[i])
                       for i, c in enumerate(r)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def _numeric(c: str) -> bool:
    return c[:1].isdigit() or c[:1] in "-+." or c in ("inf", "nan")


def format_report(res: dict) -> str:
    """The text tables of ``cukv report``."""
    a = res["attention"]
    qs = {"file": "from the file's query tensors",
          "keys": "from the keys (the file has no query tensors)"}.get(a["queries"], a["queries"])
    out = [f"cukv report: {res['file']}  {len(res['layers'])} layers, K/V {res['dtype']} "
           f"{kvio.shape_str(res['shape'])} {res['layout']} {kvio.LAYOUTS[res['layout']]}, "
           f"head_dim {res['head_dim']}, {res['kv_heads']} KV heads, {res['lanes']} lane(s)",
           f"device: {res['device_text']}" if "device_text" in res else f"device: {res['device']}",
           f"attention: {a['backend']}" + (f" ({a['note']})" if a["note"] else "")
           + f"; {a['queries_per_layer']} queries per layer, {qs}"]
    if res["nonfinite_inputs"]:
        out.append(f"non-finite inputs: {res['nonfinite_inputs']} values (left out of every error "
                   "figure; see 'nonfinite' and 'poisoned' in --json)")
    out.append("")
    rows = []
    for r in res["per_layer"]:
        rows.append([r["layer"], r["format"], _fmt_db(r["k"]["sqnr_db"]), _fmt_db(r["v"]["sqnr_db"]),
                     f"{r['k']['max_abs_err']:.4g}", f"{r['v']['max_abs_err']:.4g}",
                     f"{r['k']['rel_err']:.4f}", f"{r['v']['rel_err']:.4f}",
                     _fmt_db(r["attn_sqnr_db"]), f"{r['attn_rel_err']:.4f}"])
    out.append(_table(rows, ["layer", "format", "K SQNR dB", "V SQNR dB", "K max err", "V max err",
                             "K rel err", "V rel err", "attn SQNR dB", "attn rel err"]))
    out.append("")
    out.append(f"summary (safe = every layer's K and V SQNR >= {res['threshold_db']:g} dB; "
               f"memory saved vs the file's {res['dtype']})")
    srows = []
    for f, s in res["summary"].items():
        srows.append([f, f"{s['bytes_per_element']:.4g}", f"{100 * s['memory_saved']:.1f}%",
                      _fmt_db(s["min_sqnr_db"]), _fmt_db(s["mean_sqnr_db"]),
                      _fmt_db(s["min_attn_sqnr_db"]), f"{s['max_attn_rel_err']:.4f}",
                      "safe" if s["safe"] else "NOT safe"])
    out.append(_table(srows, ["format", "bytes/elem", "saved", "worst SQNR dB", "mean SQNR dB",
                              "worst attn SQNR dB", "max attn rel err", "verdict"]))
    return "\n".join(out)


def write_plot(path, res: dict, plt) -> None:
    """PNG: SQNR per layer per format (K, V, attention output) and the error histogram."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, f in enumerate(res["formats"]):
        c = colors[i % len(colors)]
        rs = [r for r in res["per_layer"] if r["format"] == f]
        x = [r["layer"] for r in rs]
        cap = lambda v: v if math.isfinite(v) else np.nan  # noqa: E731
        ax1.plot(x, [cap(r["k"]["sqnr_db"]) for r in rs], "o-", color=c, label=f"{f} K")
        ax1.plot(x, [cap(r["v"]["sqnr_db"]) for r in rs], "s--", color=c, label=f"{f} V")
        ax1.plot(x, [cap(r["attn_sqnr_db"]) for r in rs], "^:", color=c, alpha=0.7,
                 label=f"{f} attn out")
        h = np.asarray(res["error_histogram"]["counts"][f], dtype=np.float64)
        if h.sum() > 0:
            ax2.stairs(h / h.sum(), res["error_histogram"]["edges_log10_err_over_rms"], color=c, label=f)
    ax1.axhline(res["threshold_db"], color="k", lw=0.8, ls="-.",
                label=f"threshold {res['threshold_db']:g} dB")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("SQNR (dB)")
    ax1.set_title("SQNR per layer (K solid, V dashed, attention output dotted)", fontsize=9)
    ax1.legend(fontsize=7, ncol=2)
    ax1.grid(alpha=0.3)
    if res["layers"]:
        ax1.set_xticks(res["layers"])
    ax2.set_xlabel("log10(|dequantized - original| / RMS of the tensor)")
    ax2.set_ylabel("fraction of nonzero errors")
    ax2.set_title("error histogram, all layers, K and V", fontsize=9)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"cukv report: {res['file']} ({res['dtype']} {kvio.shape_str(res['shape'])}, "
                 f"{len(res['layers'])} layers)", fontsize=10)
    fig.tight_layout()
    try:
        with kvio.atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)


def _import_pyplot():
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise KVError("--plot needs matplotlib: pip install 'cukv[cli]'") from None
    return plt


# ------------------------------------------------------------------------------- subcommands
def cmd_inspect(args) -> int:
    kv = kvio.load_kv(args.file, keys=args.keys, layout=args.layout)
    import cukv  # noqa: PLC0415

    tensors = []
    for L in kv.layers:
        for t in ("k", "v"):
            name = (kv.k if t == "k" else kv.v)[L]
            a = kv.arrays[name]
            vals = cukv.dequantize(a, kv.fmt) if kv.fmt else a
            dt, shape = kv.original(name)
            tensors.append({"layer": L, "kv": t.upper(), "name": name, "shape": list(shape),
                            "dtype": kvio.dtype_name(dt), **tensor_stats(vals, kv.layout)})
    others = [n for n in kv.arrays if n not in kv.kv_names and n not in kv.q.values()]
    res = {
        "file": os.path.basename(kv.path), "container": kv.container,
        "convention": kv.convention.label, "layout": kv.layout, "layout_from": kv.layout_how,
        "dtype": kvio.dtype_name(kv.dtype), "shape": list(kv.shape), "layers": kv.layers,
        "head_dim": kv.head_dim, "kv_heads": kv.kv_heads, "lanes": len(kvio.lanes_of(kv)),
        "quantized_format": kv.fmt, "queries": {str(L): n for L, n in sorted(kv.q.items())},
        "other_entries": others, "tensors": tensors,
        "nonfinite": sum(t["nonfinite"] for t in tensors),
    }
    if args.json:
        if args.json == "-":
            sys.stdout.write(stable_json(res))
            return 0
        _write_text(_check_output(args.json, args.file), stable_json(res))
    _say(f"{res['file']}: {kv.container}, {len(kv.layers)} layers, {kv.convention.label}, "
         f"{kv.layout} {kvio.LAYOUTS[kv.layout]} ({kv.layout_how}), {res['dtype']} "
         f"{kvio.shape_str(kv.shape)}, head_dim {kv.head_dim}, {kv.kv_heads} KV heads, "
         f"{res['lanes']} lane(s)")
    if kv.fmt:
        _say(f"quantized: {kv.fmt} (cukv rows; statistics below are of the dequantized values)")
    _say(f"queries: {', '.join(kv.q[L] for L in sorted(kv.q)) if kv.q else 'none'}; "
         f"other entries: {', '.join(others) if others else 'none'}")
    if res["nonfinite"]:
        _say(f"non-finite values: {res['nonfinite']} (left out of absmax, mean |x| and channels)")
    _say("")
    rows = [[t["layer"], t["kv"], t["name"], kvio.shape_str(t["shape"]), t["dtype"],
             f"{t['absmax']:.4f}", f"{t['mean_abs']:.4f}", f"{t['outlier_ratio']:.2f}", t["top_channel"],
             t["nonfinite"]] for t in tensors]
    _say(_table(rows, ["layer", "K/V", "name", "shape", "dtype", "absmax", "mean |x|",
                       "outlier ch", "top ch", "non-finite"]))
    _say("")
    _say("outlier ch = max over (head, dim) channels of the channel's absmax / the median of those")
    return 0


def _default_out(path: Path, tag: str, suffix: str) -> Path:
    name = path.name
    for s in kvio.SUFFIXES:
        if name.lower().endswith(s):
            name = name[: -len(s)]
            break
    return path.with_name(f"{name}.{tag}{suffix}")


def cmd_quantize(args) -> int:
    kv = kvio.load_kv(args.file, keys=args.keys, layout=args.layout)
    if kv.fmt:
        raise KVError(f"{args.file}: already quantized ({kv.fmt}); dequantize it first")
    fmt = _parse_formats(args.format, kv.head_dim, args.file)
    if len(fmt) != 1:
        raise KVError(f"--format: expected one format, got {args.format!r}")
    fmt = fmt[0]
    src = Path(args.file)
    out = Path(args.output) if args.output else _default_out(
        src, fmt.replace(":", "-"), ".safetensors" if kv.container == "safetensors" else ".npz")
    suf = out.suffix.lower()
    if suf not in (".npz", ".safetensors"):
        raise KVError(f"{out}: a quantized file is .npz or .safetensors (it records its format), "
                      f"got {out.suffix or 'no suffix'}")
    _check_output(out, src)
    dev = Device(args.device)
    names = sorted(kv.kv_names)
    rows = {}
    bar = _progress(len(names), "quantize")
    for n in names:
        import cukv  # noqa: PLC0415

        rows[n] = dev.host(cukv.quantize(dev.to(kv.arrays[n]), fmt))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    arrays, header = kvio.quantized_arrays(kv, fmt, rows, suf[1:])
    kvio.write_arrays(out, arrays, header=header)
    before = sum(kv.arrays[n].nbytes for n in names)
    after = sum(rows[n].nbytes for n in names)
    _say(f"wrote {out}: {len(names)} K/V tensors as {fmt} on {dev.name}, {before:,} -> {after:,} bytes "
         f"({100 * (1 - after / before):.1f}% saved); other entries copied unchanged")
    return 0


def cmd_dequantize(args) -> int:
    kv = kvio.load_kv(args.file, keys=args.keys, layout=args.layout)
    if not kv.fmt:
        raise KVError(f"{args.file}: not a cukv-quantized file (no {kvio.META_KEY} metadata); "
                      "nothing to dequantize")
    src = Path(args.file)
    orig = kv.info.get("source_container", kv.container)
    out = Path(args.output) if args.output else _default_out(src, "dequantized", "." + orig)
    suf = out.suffix.lower()
    if suf not in kvio.SUFFIXES:
        raise KVError(f"{out}: unsupported output type (expected .npz, .npy or .safetensors)")
    _check_output(out, src)
    dev = Device(args.device)
    import cukv  # noqa: PLC0415

    values = {}
    changed = 0
    names = sorted(kv.kv_names)
    bar = _progress(len(names), "dequantize")
    for n in names:
        deq = dev.host(cukv.dequantize(dev.to(kv.arrays[n]), kv.fmt))
        dt, shape = kv.original(n)
        want = kvio.BF16 if args.dtype == "bfloat16" else dt
        val = deq.astype(np.float32).astype(want) if want != kvio.BF16 else deq
        if want == np.float16:
            with np.errstate(invalid="ignore"):
                back = val.astype(np.float32).astype(kvio.BF16)
            changed += int(((back != deq) & ~(np.isnan(back.astype(np.float32))
                                             & np.isnan(deq.astype(np.float32)))).sum())
        values[n] = val.reshape(shape)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    arrays, header = kvio.dequantized_arrays(kv, values, suf[1:])
    kvio.write_arrays(out, arrays, header=header)
    dts = sorted({kvio.dtype_name(v.dtype) for v in values.values()})
    _say(f"wrote {out}: {len(names)} K/V tensors from {kv.fmt}, as {'/'.join(dts)} (the dequantized "
         f"bfloat16 values{'' if args.dtype == 'bfloat16' else ' in the original dtype'}), "
         f"original shapes and layout")
    if changed:
        _note(f"{changed} dequantized values are not exact in float16 (rounded); "
              "use --dtype bfloat16 to keep them exactly")
    return 0


def cmd_report(args) -> int:
    kv = kvio.load_kv(args.file, keys=args.keys, layout=args.layout)
    if kv.fmt:
        raise KVError(f"{args.file}: already quantized ({kv.fmt}); report needs the original tensors")
    formats = _parse_formats(args.formats, kv.head_dim, args.file)
    if args.queries < 1:
        raise KVError(f"--queries: expected >= 1, got {args.queries}")
    plot = Path(args.plot) if args.plot else None
    jout = args.json if args.json and args.json != "-" else None
    for o in (plot, jout):
        if o is not None:
            _check_output(o, args.file)
    plt = _import_pyplot() if plot is not None else None
    dev = Device(args.device)
    bar = _progress(len(kv.layers) * len(formats), "report")
    try:
        res = run_report(kv, formats, dev, threshold=args.threshold, max_queries=args.queries,
                         progress=bar)
    finally:
        if bar is not None:
            bar.close()
    text = stable_json(res)
    if args.json == "-":
        sys.stdout.write(text)
    else:
        res["device_text"] = dev.describe()
        _say(format_report(res))
    if jout is not None:
        _write_text(jout, text)
    if plot is not None:
        write_plot(plot, res, plt)
    if args.json != "-":
        wrote = [str(p) for p in (plot, jout) if p is not None]
        if wrote:
            _say("")
            _say("wrote " + ", ".join(wrote))
    return 0


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cukv", description="Inspect, quantize and dequantize saved K/V tensors, and report "
        "how much FP8 / INT4 quantization changes them and the attention output.",
        epilog="Bad input: one line on stderr, exit status 2.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(sp, device=True):
        sp.add_argument("file", metavar="FILE", help=".npz, .npy or .safetensors")
        sp.add_argument("--keys", metavar="PATTERNS",
                        help="'K_PATTERN,V_PATTERN[,Q_PATTERN]' with {L} for the layer number, e.g. "
                        "'model.{L}.k,model.{L}.v' (default: detect k_layer{L}/v_layer{L}, "
                        "layers.{L}.key/.value, past_key_values.{L}.0/.1 or .key/.value, "
                        "key_cache.{L}/value_cache.{L})")
        sp.add_argument("--layout", metavar="LAYOUT",
                        help="THD [T, H, D], BTHD [B, T, H, D] or BHTD [B, H, T, D] (transformers); "
                        "inferred when unambiguous")
        if device:
            sp.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                            help="auto: the GPU when CuPy sees one, else NumPy (default auto)")

    sp = sub.add_parser("inspect", help="list the K/V tensors and their statistics")
    common(sp, device=False)
    sp.add_argument("--json", metavar="OUT", help="also write the figures as JSON ('-': stdout only)")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("quantize", help="write a quantized copy that records its format")
    common(sp)
    sp.add_argument("--format", "-f", required=True, metavar="FMT",
                    help="fp8, int4 (= int4:g1), int4:g2, int4:g4, int4:g8 or bf16")
    sp.add_argument("-o", "--output", metavar="OUT",
                    help="output .npz or .safetensors (default FILE-stem.FMT.npz/.safetensors)")
    sp.set_defaults(func=cmd_quantize)

    sp = sub.add_parser("dequantize", help="restore a quantized file (shapes, layout, keys)")
    common(sp)
    sp.add_argument("-o", "--output", metavar="OUT",
                    help="output .npz, .npy or .safetensors (default FILE-stem.dequantized + the "
                    "original container's suffix)")
    sp.add_argument("--dtype", choices=("original", "bfloat16"), default="original",
                    help="original: the dequantized bf16 values cast to the source dtype (default); "
                    "bfloat16: keep them as bf16")
    sp.set_defaults(func=cmd_dequantize)

    sp = sub.add_parser("report", help="quantization and attention-output error per layer and format")
    common(sp)
    sp.add_argument("--formats", default=DEFAULT_FORMATS, metavar="FMTS",
                    help=f"comma-separated formats (default {DEFAULT_FORMATS})")
    sp.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD_DB, metavar="DB",
                    help=f"a format is safe when every K and V SQNR >= DB (default {DEFAULT_THRESHOLD_DB:g})")
    sp.add_argument("--queries", type=int, default=DEFAULT_QUERIES, metavar="N",
                    help=f"attention queries per lane, evenly spaced (default {DEFAULT_QUERIES})")
    sp.add_argument("--plot", metavar="PNG", help="write a PNG plot (needs matplotlib)")
    sp.add_argument("--json", metavar="OUT", help="write the figures as JSON ('-': to stdout, no table)")
    sp.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    """Run the ``cukv`` command; returns the exit status (0 ok, 2 bad input, 1 internal error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors (2) and --help (0)
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except KVError as e:
        print(f"cukv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cukv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cukv report ... | head`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except Exception as e:  # a bug: one line, unless CUKV_DEBUG asks for the traceback
        if os.environ.get("CUKV_DEBUG"):
            raise
        print(f"cukv: internal error: {type(e).__name__}: {e} (set CUKV_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
