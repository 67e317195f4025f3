"""Saved K/V tensors: read and write ``.npz``, ``.npy`` and ``.safetensors`` files.

A *KV file* holds one key and one value tensor per layer, found by a key convention:

* ``k_layer{L}`` / ``v_layer{L}`` and ``layers.{L}.key`` / ``layers.{L}.value``: 3-D tensors are
  ``THD``; 4-D ones need ``layout``;
* ``past_key_values.{L}.0`` / ``.1``, ``past_key_values.{L}.key`` / ``.value`` and
  ``key_cache.{L}`` / ``value_cache.{L}``: transformers' names, so 4-D tensors are ``BHTD``;

or by a ``keys`` pattern (``"enc.{L}.k,enc.{L}.v"``, optionally a third pattern for queries). A
``.npy`` file holds one stacked array ``[L, 2, ...]`` (layer, then K = 0 / V = 1); its tensors are
named ``k_layer{L}`` / ``v_layer{L}`` here.

Layouts: ``THD`` = ``[T, H, D]``, ``BTHD`` = ``[B, T, H, D]``, ``BHTD`` = ``[B, H, T, D]``
(transformers' ``past_key_values`` order). 3-D tensors are ``THD``. A 4-D layout comes from the
``layout`` argument, a cukv-written file, or a transformers convention; anything else is ambiguous
and raises :class:`KVError`.

Optional companions: queries (``q_layer{L}``, ``layers.{L}.query``, ``queries.{L}`` or
``query.{L}``, the layout of the keys with ``N_H`` heads) and per-lane lengths (``seq_lens`` or
``seqlens``, int ``[B]``; with ``THD`` the lanes are packed one after another along ``T``).

dtypes: bfloat16, float16, float32. ``.npz``/``.npy`` store bfloat16 as the 2-byte void ``'<V2'``
(what ``np.save`` writes for ``ml_dtypes.bfloat16``); it is read back as bfloat16.

Quantized files (written by ``cukv quantize``) keep every key, shape prefix and layout of the
source; each K/V tensor becomes ``uint8 [..., R]`` rows of one cukv format (SPEC §2), and the file
records the format, the layout and every tensor's original dtype and shape in its metadata (the
``__cukv__`` entry of an ``.npz``, the ``__cukv__`` header field of a ``.safetensors``). Other
entries pass through unchanged.

Writes are atomic (a temporary name in the target folder, then ``os.replace``) and ``.npz``
archives are written deterministically (fixed zip timestamps, no compression), so the same input
gives the same bytes. Input files are opened read-only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["KVError", "KVFile", "LAYOUTS", "CONVENTIONS", "load_kv", "read_arrays", "write_arrays",
           "atomic_path", "to_bthd", "from_bthd", "lanes_of", "parse_layout", "parse_keys",
           "quantized_arrays", "dequantized_arrays", "dtype_name", "META_KEY"]

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", BF16: "bfloat16"}
_DTYPE_BY_NAME = {v: k for k, v in DTYPES.items()}
META_KEY = "__cukv__"
SUFFIXES = (".npz", ".npy", ".safetensors")

LAYOUTS = {"THD": "[T, H, D]", "BTHD": "[B, T, H, D]", "BHTD": "[B, H, T, D]"}

_QUERY_PATTERNS = ("q_layer{L}", "layers.{L}.query", "queries.{L}", "query.{L}")
_LEN_KEYS = ("seq_lens", "seqlens")


class KVError(Exception):
    """Bad input: a one-line message for the user (the command line prints it and exits 2)."""


@dataclass(frozen=True)
class Convention:
    name: str
    k: str               # pattern with {L}
    v: str
    layout4: str | None  # the 4-D layout the convention implies, if any

    def regex(self, which: str) -> re.Pattern:
        return _pattern_regex(self.k if which == "k" else self.v)

    @property
    def label(self) -> str:
        return f"{self.k} / {self.v}"


CONVENTIONS = (
    Convention("k_layer", "k_layer{L}", "v_layer{L}", None),
    Convention("layers", "layers.{L}.key", "layers.{L}.value", None),
    Convention("past_key_values", "past_key_values.{L}.0", "past_key_values.{L}.1", "BHTD"),
    Convention("past_key_values.key", "past_key_values.{L}.key", "past_key_values.{L}.value", "BHTD"),
    Convention("key_cache", "key_cache.{L}", "value_cache.{L}", "BHTD"),
)


def _pattern_regex(pat: str) -> re.Pattern:
    parts = pat.split("{L}")
    return re.compile("^" + r"(\d+)".join(re.escape(p) for p in parts) + "$")


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    return DTYPES.get(dt, str(dt))


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def parse_layout(s: str | None) -> str | None:
    """``"bhtd"`` / ``"[B, H, T, D]"`` / ``"B,H,T,D"`` -> ``"BHTD"``; ``None`` stays ``None``."""
    if s is None:
        return None
    key = re.sub(r"[\s\[\],]", "", str(s)).upper()
    if key not in LAYOUTS:
        raise KVError(f"unsupported layout {s!r}: expected one of "
                      + ", ".join(f"{k} {v}" for k, v in LAYOUTS.items()))
    return key


def parse_keys(s: str) -> Convention:
    """``"K_PATTERN,V_PATTERN"`` (each with ``{L}``) -> a :class:`Convention` named ``"--keys"``."""
    pats = [p.strip() for p in str(s).split(",")]
    if len(pats) != 2 or any(p.count("{L}") != 1 for p in pats):
        raise KVError(f"--keys {s!r}: expected 'K_PATTERN,V_PATTERN', each with one {{L}} for the "
                      "layer number, e.g. 'model.{L}.k,model.{L}.v'")
    return Convention("--keys", pats[0], pats[1], None)


# ------------------------------------------------------------------------------------- reading
def _sniff(path: Path) -> str:
    suf = path.suffix.lower()
    if suf in SUFFIXES:
        return suf[1:]
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK"):
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise KVError(f"{path}: unsupported file type (expected .npz, .npy or .safetensors)")


def _fix_dtype(a: np.ndarray) -> np.ndarray:
    """2-byte void (``np.save`` of bfloat16) -> bfloat16 view."""
    if a.dtype.kind == "V" and a.dtype.itemsize == 2 and a.dtype.names is None:
        return a.view(BF16)
    return a


def _need_safetensors():
    try:
        import safetensors  # noqa: F401, PLC0415
        from safetensors import safe_open  # noqa: PLC0415
    except ImportError:
        raise KVError("reading or writing .safetensors needs the 'safetensors' package: "
                      "pip install 'cukv[cli]'") from None
    return safe_open


def read_arrays(path) -> tuple[str, dict, dict]:
    """Every array of a file: ``(container, {name: ndarray}, header_metadata)``.

    ``header_metadata`` is the ``.safetensors`` ``__metadata__`` (string to string), else ``{}``.
    Raises :class:`KVError` for a missing, unreadable or corrupt file.
    """
    path = Path(path)
    if not path.exists():
        raise KVError(f"{path}: no such file")
    if path.is_dir():
        raise KVError(f"{path}: is a directory, expected a .npz, .npy or .safetensors file")
    container = _sniff(path)
    meta: dict = {}
    arrays: dict = {}
    try:
        if container == "npz":
            with np.load(path, allow_pickle=False) as z:
                for name in z.files:
                    arrays[name] = _fix_dtype(z[name])
        elif container == "npy":
            arrays["[stack]"] = _fix_dtype(np.load(path, allow_pickle=False))
        else:
            safe_open = _need_safetensors()
            with safe_open(str(path), framework="numpy") as f:
                meta = dict(f.metadata() or {})
                for name in f.keys():
                    arrays[name] = f.get_tensor(name)
    except KVError:
        raise
    except Exception as e:  # zipfile.BadZipFile, zlib.error, ValueError (pickle), SafetensorError...
        what = {"npz": "a valid .npz archive", "npy": "a valid .npy file",
                "safetensors": "a valid .safetensors file"}[container]
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KVError(f"{path}: not {what} ({type(e).__name__}: {msg})") from None
    return container, arrays, meta


@dataclass
class KVFile:
    """A loaded KV file. ``arrays`` holds every entry (K/V tensors, queries, other entries)."""

    path: str
    container: str
    arrays: dict
    convention: Convention
    k: dict                    # layer -> name
    v: dict                    # layer -> name
    q: dict                    # layer -> name of the query tensor (may be empty)
    layout: str
    layout_how: str            # "given", "3-D", "recorded in the file", "implied by <convention>"
    fmt: str | None = None     # the cukv format of a quantized file
    info: dict = field(default_factory=dict)     # cukv metadata of a quantized file
    header: dict = field(default_factory=dict)   # .safetensors header metadata (without __cukv__)

    @property
    def layers(self) -> list[int]:
        return sorted(self.k)

    @property
    def kv_names(self) -> set:
        return set(self.k.values()) | set(self.v.values())

    def tensor(self, L: int, which: str) -> np.ndarray:
        """The stored K (``which="k"``) or V tensor of layer ``L`` (uint8 rows if quantized)."""
        return self.arrays[(self.k if which == "k" else self.v)[L]]

    def original(self, name: str) -> tuple[np.dtype, tuple]:
        """Original dtype and shape of K/V entry ``name`` (as quantized, for quantized files)."""
        if self.fmt is None:
            a = self.arrays[name]
            return a.dtype, a.shape
        t = self.info["tensors"][name]
        return _DTYPE_BY_NAME[t["dtype"]], tuple(t["shape"])

    @property
    def dtype(self) -> np.dtype:
        return self.original(self.k[self.layers[0]])[0]

    @property
    def shape(self) -> tuple:
        return self.original(self.k[self.layers[0]])[1]

    @property
    def head_dim(self) -> int:
        return int(self.shape[-1])

    @property
    def kv_heads(self) -> int:
        return int(self.shape[2 if self.layout == "BTHD" else 1])

    def lengths(self) -> np.ndarray | None:
        """Per-lane lengths from a ``seq_lens``/``seqlens`` entry, or ``None``."""
        for key in _LEN_KEYS:
            if key in self.arrays and key not in self.kv_names:
                return self.arrays[key]
        return None


def _match(conv: Convention, names) -> tuple[dict, dict]:
    ks, vs = {}, {}
    rk, rv = conv.regex("k"), conv.regex("v")
    for n in names:
        m = rk.match(n)
        if m:
            ks.setdefault(int(m.group(1)), []).append(n)
        m = rv.match(n)
        if m:
            vs.setdefault(int(m.group(1)), []).append(n)
    return ks, vs


def _one_per_layer(conv: Convention, ks: dict, vs: dict, path) -> tuple[dict, dict]:
    for d, which in ((ks, "key"), (vs, "value")):
        for L, ns in d.items():
            if len(ns) > 1:
                raise KVError(f"{path}: layer {L} has several {which} tensors ({', '.join(sorted(ns))})")
    k = {L: ns[0] for L, ns in ks.items()}
    v = {L: ns[0] for L, ns in vs.items()}
    for L in sorted(set(k) | set(v)):
        if L not in v:
            raise KVError(f"{path}: layer {L} has a key tensor ({k[L]}) but no value tensor "
                          f"({conv.v.replace('{L}', str(L))})")
        if L not in k:
            raise KVError(f"{path}: layer {L} has a value tensor ({v[L]}) but no key tensor "
                          f"({conv.k.replace('{L}', str(L))})")
    return k, v


def _queries(names, q_pattern: str | None, k: dict) -> dict:
    pats = (q_pattern,) if q_pattern else _QUERY_PATTERNS
    q = {}
    for pat in pats:
        rx = _pattern_regex(pat)
        for n in names:
            m = rx.match(n)
            if m and int(m.group(1)) in k and n not in set(k.values()):
                q.setdefault(int(m.group(1)), n)
    return q


def _detect(arrays: dict, path, keys: str | None) -> tuple[Convention, dict, dict, dict]:
    names = list(arrays)
    q_pattern = None
    if keys is not None:
        pats = [p.strip() for p in str(keys).split(",")]
        if len(pats) == 3:
            q_pattern = pats[2]
            if q_pattern.count("{L}") != 1:
                raise KVError(f"--keys {keys!r}: the query pattern needs one {{L}}")
            keys = ",".join(pats[:2])
        conv = parse_keys(keys)
        ks, vs = _match(conv, names)
        if not ks and not vs:
            raise KVError(f"{path}: no K/V tensors match --keys {conv.label} "
                          f"(entries: {_list_names(names)})")
        k, v = _one_per_layer(conv, ks, vs, path)
        return conv, k, v, _queries(names, q_pattern, k)
    found = []
    for conv in CONVENTIONS:
        ks, vs = _match(conv, names)
        if ks or vs:
            found.append((conv, ks, vs))
    if not found:
        raise KVError(f"{path}: no K/V tensors found (looked for "
                      + "; ".join(c.label for c in CONVENTIONS)
                      + f"; entries: {_list_names(names)}); name them with --keys")
    if len(found) > 1:
        raise KVError(f"{path}: K/V tensors of several conventions found ("
                      + "; ".join(c.label for c, _, _ in found) + "); choose one with --keys")
    conv, ks, vs = found[0]
    k, v = _one_per_layer(conv, ks, vs, path)
    return conv, k, v, _queries(names, None, k)


def _list_names(names, n: int = 8) -> str:
    names = list(names)
    if not names:
        return "none"
    s = ", ".join(names[:n])
    return s + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _unstack_npy(arrays: dict, path) -> dict:
    a = arrays.pop("[stack]")
    if a.ndim < 5 or a.shape[1] != 2:
        raise KVError(f"{path}: a .npy KV file holds one array [L, 2, ...] (layer, K/V, then "
                      f"[T, H, D], [B, T, H, D] or [B, H, T, D]), got {dtype_name(a.dtype)} "
                      f"{shape_str(a.shape)}")
    for L in range(a.shape[0]):
        arrays[f"k_layer{L}"] = a[L, 0]
        arrays[f"v_layer{L}"] = a[L, 1]
    return arrays


def _cukv_info(container: str, arrays: dict, header: dict, path) -> dict:
    raw = None
    if container == "npz" and META_KEY in arrays:
        raw = str(arrays.pop(META_KEY))
    elif container == "safetensors" and META_KEY in header:
        raw = header.pop(META_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
        if not isinstance(info, dict) or "format" not in info or "tensors" not in info:
            raise ValueError("missing 'format' or 'tensors'")
    except (ValueError, TypeError) as e:
        raise KVError(f"{path}: corrupt cukv metadata ({META_KEY}: {e})") from None
    return info


def load_kv(path, *, keys: str | None = None, layout: str | None = None) -> KVFile:
    """Read a KV file and find its K/V tensors, queries and layout.

    Parameters
    ----------
    path : str or Path
        ``.npz``, ``.npy`` or ``.safetensors`` (the content decides when the suffix is another).
    keys : str, optional
        ``"K_PATTERN,V_PATTERN[,Q_PATTERN]"`` with ``{L}`` for the layer number; overrides the
        automatic convention detection.
    layout : str, optional
        ``"THD"``, ``"BTHD"`` or ``"BHTD"``; needed for 4-D tensors unless the file or its
        convention implies one.

    Returns
    -------
    KVFile

    Raises
    ------
    KVError
        Missing or corrupt file; no K/V tensors; a layer without its K or V; shapes that differ
        between tensors; an unsupported dtype, rank or layout; an ambiguous layout.
    """
    layout = parse_layout(layout)
    container, arrays, header = read_arrays(path)
    if container == "npy":
        arrays = _unstack_npy(arrays, path)
    info = _cukv_info(container, arrays, header, path)
    if info and keys is None:
        keys = ",".join(info["keys"]) if "keys" in info else None
    conv, k, v, q = _detect(arrays, path, keys)
    fmt = info.get("format") if info else None
    kv = KVFile(str(path), container, arrays, conv, k, v, q, "THD", "", fmt, info, header)
    _check_tensors(kv, path)
    rank = len(kv.shape)
    recorded = info.get("layout") if info else None
    if rank == 3:
        if layout not in (None, "THD"):
            raise KVError(f"{path}: --layout {layout} {LAYOUTS[layout]} does not fit 3-D tensors "
                          f"{shape_str(kv.shape)} (3-D tensors are [T, H, D])")
        kv.layout, kv.layout_how = "THD", "3-D"
    elif rank == 4:
        if layout == "THD":
            raise KVError(f"{path}: --layout THD [T, H, D] does not fit 4-D tensors "
                          f"{shape_str(kv.shape)}")
        if layout is not None:
            kv.layout, kv.layout_how = layout, "given"
        elif recorded:
            kv.layout, kv.layout_how = recorded, "recorded in the file"
        elif conv.layout4:
            kv.layout, kv.layout_how = conv.layout4, f"implied by {conv.label}"
        else:
            raise KVError(f"{path}: the layout of 4-D tensors {shape_str(kv.shape)} is ambiguous "
                          "([B, T, H, D] or [B, H, T, D]); pass --layout BTHD or --layout BHTD")
    else:
        raise KVError(f"{path}: unsupported layout: K/V tensors are {rank}-D {shape_str(kv.shape)}; "
                      "expected [T, H, D], [B, T, H, D] or [B, H, T, D]")
    _check_queries(kv, path)
    _check_lengths(kv, path)
    return kv


def _check_tensors(kv: KVFile, path) -> None:
    ref_name = kv.k[kv.layers[0]]
    ref_shape = None
    for L in kv.layers:
        for which in ("k", "v"):
            name = (kv.k if which == "k" else kv.v)[L]
            a = kv.arrays[name]
            if kv.fmt is None:
                if a.dtype not in DTYPES:
                    raise KVError(f"{path}: unsupported dtype {dtype_name(a.dtype)} for {name}: "
                                  "expected bfloat16, float16 or float32")
            else:
                if name not in kv.info["tensors"]:
                    raise KVError(f"{path}: corrupt cukv metadata: no entry for {name}")
                t = kv.info["tensors"][name]
                if t.get("dtype") not in _DTYPE_BY_NAME:
                    raise KVError(f"{path}: corrupt cukv metadata: dtype {t.get('dtype')!r} of {name}")
                want = _quantized_dtype(kv.fmt)
                if a.dtype != want or tuple(a.shape[:-1]) != tuple(t["shape"][:-1]):
                    raise KVError(f"{path}: {name}: expected {dtype_name(want)} "
                                  f"{shape_str(tuple(t['shape'][:-1]) + ('R',))} rows of format "
                                  f"{kv.fmt!r}, got {dtype_name(a.dtype)} {shape_str(a.shape)}")
            dt, shape = kv.original(name)
            if ref_shape is None:
                ref_shape, ref_dt = shape, dt
            if shape != ref_shape:
                raise KVError(f"{path}: inconsistent shapes: {name} is {shape_str(shape)} but "
                              f"{ref_name} is {shape_str(ref_shape)} (every K/V tensor must have one shape)")
            if dt != ref_dt:
                raise KVError(f"{path}: inconsistent dtypes: {name} is {dtype_name(dt)} but "
                              f"{ref_name} is {dtype_name(ref_dt)}")
    if ref_shape is not None and 0 in ref_shape:
        raise KVError(f"{path}: K/V tensors are empty ({shape_str(ref_shape)})")


def _check_queries(kv: KVFile, path) -> None:
    if not kv.q:
        return
    shape = kv.shape
    hax = 2 if kv.layout == "BTHD" else 1
    for L, name in kv.q.items():
        a = kv.arrays[name]
        exp = list(shape)
        ok = (a.ndim == len(shape) and a.dtype in DTYPES
              and all(int(a.shape[i]) == int(shape[i]) for i in range(len(shape)) if i != hax)
              and a.shape[hax] % shape[hax] == 0)
        if not ok:
            exp[hax] = "N_H"
            raise KVError(f"{path}: query tensor {name}: expected bfloat16/float16/float32 "
                          f"[{', '.join(map(str, exp))}] ({LAYOUTS[kv.layout]} with N_H a multiple "
                          f"of {shape[hax]} heads), got {dtype_name(a.dtype)} {shape_str(a.shape)}")


def _check_lengths(kv: KVFile, path) -> None:
    n = kv.lengths()
    if n is None:
        return
    shape = kv.shape
    if n.ndim != 1 or n.dtype.kind not in "iu" or (n < 0).any():
        raise KVError(f"{path}: seq_lens: expected non-negative integers [B], got "
                      f"{dtype_name(n.dtype)} {shape_str(n.shape)}")
    if kv.layout == "THD":
        if int(n.sum()) != int(shape[0]):
            raise KVError(f"{path}: seq_lens: expected lengths summing to T = {shape[0]} (lanes packed "
                          f"along T), got a sum of {int(n.sum())}")
    else:
        T = shape[1 if kv.layout == "BTHD" else 2]
        if n.shape[0] != shape[0] or (n > T).any():
            raise KVError(f"{path}: seq_lens: expected {shape[0]} lengths <= T = {T}, got "
                          f"{shape_str(n.shape)} with max {int(n.max()) if n.size else 0}")


# ------------------------------------------------------------------------- layout conversion
def to_bthd(a, layout: str):
    """A ``layout`` tensor as ``[B, T, H, D]`` (a view; ``THD`` gets ``B = 1``)."""
    if layout == "THD":
        return a[None]
    if layout == "BHTD":
        return a.transpose(0, 2, 1, 3)
    return a


def from_bthd(a, layout: str):
    """Inverse of :func:`to_bthd`."""
    if layout == "THD":
        return a[0]
    if layout == "BHTD":
        return a.transpose(0, 2, 1, 3)
    return a


def lanes_of(kv: KVFile) -> list[tuple[int, int, int]]:
    """Lanes ``(b, start, length)`` in the ``[B, T, H, D]`` view of the tensors.

    ``THD`` with ``seq_lens`` has lanes packed along ``T`` (all with ``b = 0``); otherwise each
    batch row is a lane of ``seq_lens[b]`` tokens, or of all ``T`` tokens.
    """
    n = kv.lengths()
    shape = kv.shape
    if kv.layout == "THD":
        if n is None:
            return [(0, 0, int(shape[0]))]
        starts = np.concatenate([[0], np.cumsum(n)[:-1]])
        return [(0, int(s), int(x)) for s, x in zip(starts, n)]
    T = int(shape[1 if kv.layout == "BTHD" else 2])
    return [(b, 0, int(n[b]) if n is not None else T) for b in range(int(shape[0]))]


# ------------------------------------------------------------------------------------ writing
def atomic_path(target) -> tuple[Path, Path]:
    """``(temporary path in the target's folder, target)``; rename the first onto the second."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise KVError(f"{target}: the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(tmp), target


class _Atomic:
    """``with _Atomic(target) as tmp: write(tmp)``: rename on success, remove the temp on failure."""

    def __init__(self, target):
        self.tmp, self.target = atomic_path(target)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, et, ev, tb):
        if et is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)    # mkstemp (and some writers) make 0600
            os.replace(self.tmp, self.target)
        else:
            try:
                self.tmp.unlink()
            except OSError:
                pass
        return False


def atomic_write(target):
    """Context manager giving a temporary path; on success it is renamed onto ``target``."""
    return _Atomic(target)


_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def write_arrays(path, arrays: dict, *, header: dict | None = None) -> None:
    """Write ``arrays`` (name -> ndarray) atomically; the suffix of ``path`` picks the container.

    ``.npz``: uncompressed, deterministic zip of ``.npy`` members (bfloat16 stored as ``'<V2'``).
    ``.safetensors``: ``header`` (str -> str) goes into ``__metadata__``. ``.npy``: ``arrays``
    must hold exactly one entry.
    """
    path = Path(path)
    suf = path.suffix.lower()
    if suf not in SUFFIXES:
        raise KVError(f"{path}: unsupported output type (expected .npz, .npy or .safetensors)")
    if suf == ".safetensors":
        _need_safetensors()
        from safetensors.numpy import save_file  # noqa: PLC0415
        bad = [n for n, a in arrays.items() if a.dtype.kind not in "fiub" and a.dtype != BF16]
        if bad:
            raise KVError(f"{path}: .safetensors holds numeric tensors only; entry {bad[0]!r} is "
                          f"{arrays[bad[0]].dtype}; write a .npz instead")
    with atomic_write(path) as tmp:
        if suf == ".npz":
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, a in arrays.items():
                    zi = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                    zi.external_attr = 0o644 << 16
                    with zf.open(zi, "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)
        elif suf == ".npy":
            if len(arrays) != 1:
                raise KVError(f"{path}: a .npy file holds one array, got {len(arrays)} entries; "
                              "write a .npz instead")
            with open(tmp, "wb") as f:
                np.lib.format.write_array(f, np.asarray(next(iter(arrays.values()))),
                                          allow_pickle=False)
        else:
            try:
                save_file({n: np.asarray(a, order="C") for n, a in arrays.items()}, str(tmp),
                          metadata=header or None)
            except Exception as e:
                raise KVError(f"{path}: cannot write .safetensors ({type(e).__name__}: {e})") from None
            _canonical_safetensors_header(tmp)


def _canonical_safetensors_header(path: Path) -> None:
    """Rewrite a ``.safetensors`` header with sorted keys, so equal inputs give equal bytes.

    The library keeps ``__metadata__`` in a hash map, whose order changes from run to run. Only the
    JSON header is rewritten (same entries and offsets, padded with spaces to 8 bytes as the format
    asks); the tensor bytes are copied unchanged.
    """
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        tmp = path.with_name(path.name + ".h")
        try:
            with open(tmp, "wb") as g:
                g.write(struct.pack("<Q", len(text)))
                g.write(text)
                shutil.copyfileobj(f, g, 1 << 24)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _quantized_dtype(fmt: str) -> np.dtype:
    return BF16 if fmt == "bf16" else np.dtype(np.uint8)


def _stack(kv: KVFile, tensors: dict) -> np.ndarray:
    return np.stack([np.stack([tensors[kv.k[L]], tensors[kv.v[L]]]) for L in kv.layers])


def quantized_arrays(kv: KVFile, fmt: str, rows: dict, out_container: str) -> tuple[dict, dict]:
    """Entries and header of the quantized file: ``rows`` (K/V name -> rows) replace the tensors.

    Returns ``(arrays, header)``: for ``.npz`` the metadata is the ``__cukv__`` entry, for
    ``.safetensors`` a header field.
    """
    info = {
        "cukv": _version(),
        "format": fmt,
        "layout": kv.layout,
        "keys": [kv.convention.k, kv.convention.v],
        "source_container": kv.container,
        "tensors": {n: {"dtype": dtype_name(kv.arrays[n].dtype), "shape": list(kv.arrays[n].shape)}
                    for n in sorted(kv.kv_names)},
    }
    out = {n: (rows[n] if n in rows else a) for n, a in kv.arrays.items()}
    header = dict(kv.header)
    text = json.dumps(info, sort_keys=True)
    if out_container == "npz":
        out[META_KEY] = np.array(text)
    else:
        header[META_KEY] = text
    return out, header


def dequantized_arrays(kv: KVFile, values: dict, out_container: str) -> tuple[dict, dict]:
    """Entries and header of a dequantized file: ``values`` (K/V name -> array) replace the rows.

    For a ``.npy`` output the K/V tensors are stacked ``[L, 2, ...]`` (other entries are dropped).
    """
    if out_container == "npy":
        return {"[stack]": _stack(kv, values)}, {}
    out = {n: (values[n] if n in values else a) for n, a in kv.arrays.items()}
    return out, dict(kv.header)


def _version() -> str:
    from . import __version__  # noqa: PLC0415

    return __version__
