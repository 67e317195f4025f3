"""Array-module dispatch: NumPy inputs run ``cukv.ref``, CuPy inputs run the kernels.

Every public op is wrapped by :func:`op`. The wrapper looks at the op's array arguments, decides
the backend (``"numpy"`` or ``"cupy"``), rejects module and device mixes with a ``TypeError`` naming
the first argument that differs, and runs the op inside the right device context. Inside the op,
:func:`current` returns the resolved :class:`Backend`.

``import cukv`` never imports CuPy: CuPy is imported the first time a CuPy array is seen (a CuPy
array can only exist once CuPy has been imported by the caller).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import weakref
from dataclasses import dataclass

import numpy as np

__all__ = ["Backend", "op", "current", "cupy", "is_cupy", "gpu_available"]


_CP = None


def cupy():
    """The ``cupy`` module, imported on first use."""
    global _CP
    if _CP is None:
        import cupy as _cp  # noqa: PLC0415 (lazy on purpose)

        _CP = _cp
    return _CP


def is_cupy(a) -> bool:
    """True if ``a`` is a ``cupy.ndarray`` (never imports CuPy)."""
    mod = sys.modules.get("cupy")
    return mod is not None and isinstance(a, mod.ndarray)


def gpu_available() -> tuple[bool, str]:
    """``(True, "")`` if CuPy imports and sees a CUDA device, else ``(False, reason)``."""
    try:
        cp = cupy()
    except Exception as e:  # ImportError, or a broken CUDA install
        return False, f"cupy is not importable ({type(e).__name__}: {e})"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"no CUDA device ({type(e).__name__}: {e})"
    if n < 1:
        return False, "no CUDA device (device count 0)"
    return True, ""


@dataclass(frozen=True)
class Backend:
    """The array module of one op call."""

    name: str          # "numpy" or "cupy"
    device: int = -1   # CUDA device id for "cupy"

    @property
    def xp(self):
        return np if self.name == "numpy" else cupy()

    @property
    def gpu(self) -> bool:
        return self.name == "cupy"


_CURRENT: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("cukv_backend", default=None)


def current() -> Backend:
    """The backend of the op being executed (set by :func:`op`)."""
    be = _CURRENT.get()
    if be is None:
        raise RuntimeError("cukv internal error: _backend.current() called outside an op")
    return be


_NARROW: dict = {}   # dtype -> True for the FP8/INT4 dtypes that must come as uint8 (numpy's
                     # dtype.name is Python code: one lookup per call instead)


def _float8_dtype(dt) -> bool:
    r = _NARROW.get(dt)
    if r is None:
        r = _NARROW[dt] = getattr(dt, "name", "").startswith(
            ("float8", "float4", "int4", "uint4", "int2", "uint2"))
    return r


_NUMPY = Backend("numpy")
_GPUS: dict = {}     # device id -> Backend("cupy", id), one object per device


def _gpu(dev: int) -> Backend:
    be = _GPUS.get(dev)
    if be is None:
        be = _GPUS[dev] = Backend("cupy", dev)
    return be


def classify(opname: str, argname: str, a) -> Backend:
    """The backend of one array argument, or a ``TypeError``."""
    if isinstance(a, np.ndarray):
        be = _NUMPY
    elif is_cupy(a):
        be = _gpu(a.device.id)
    else:
        raise TypeError(
            f"{opname}: {argname}: expected a numpy.ndarray or cupy.ndarray, got {type(a).__module__}."
            f"{type(a).__qualname__}")
    if _float8_dtype(a.dtype):
        raise TypeError(
            f"{opname}: {argname}: dtype {a.dtype} is not accepted; FP8/INT4 data lives in uint8 arrays: "
            f"pass {argname}.view(np.uint8)")
    return be


def resolve(opname: str, named: dict) -> Backend:
    """The common backend of ``named`` (name -> array, tuple of arrays, or None)."""
    be = None
    first = None
    for name, val in named.items():
        items = val if isinstance(val, (tuple, list)) else (val,)
        for j, a in enumerate(items):
            if a is None:
                continue
            label = f"{name}[{j}]" if isinstance(val, (tuple, list)) else name
            b = classify(opname, label, a)
            if be is None:
                be, first = b, label
            elif b is not be and b != be:
                what = (f"{b.name} array" if b.name != be.name
                        else f"array on CUDA device {b.device}")
                want = (f"{be.name} array" if b.name != be.name
                        else f"CUDA device {be.device}")
                raise TypeError(
                    f"{opname}: {label}: got a {what}, but {first} is a {want}; all arrays of one "
                    f"call must live in one module and on one device (no implicit copies)")
    return be if be is not None else _NUMPY


# ---------------------------------------------------------------------------------- interop
# Framework tensors (torch, JAX, anything with __dlpack__ / __cuda_array_interface__ / __array__)
# are converted at the op boundary, without copies, to CuPy (GPU) or NumPy (host) arrays; results
# are converted back to the caller's kind. Arrays an op writes in place share the caller's memory.
_DLPACK_CUDA = 2
_DLPACK_CPU = 1


class _Call:
    """State of one outermost op call that received framework tensors."""

    __slots__ = ("kind", "originals", "stream", "capturing", "device", "allocs")

    def __init__(self):
        self.kind = None          # "torch" or "jax" once a framework tensor is seen
        self.originals = {}       # id(converted array) -> (converted array, caller's object)
        self.stream = None        # torch's current CUDA stream pointer, if any
        self.capturing = False    # torch is capturing a CUDA graph on that stream
        self.device = None
        self.allocs = {}          # data pointer -> torch tensor backing an allocation of this call


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("cukv_call", default=None)
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("cukv_depth", default=0)


class FP8Result:
    """Marks an op result holding e4m3fn codes in uint8: a torch caller gets ``float8_e4m3fn``."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def fp8_result(a):
    """Return ``a`` (uint8 e4m3fn codes the op allocated), marked for the outermost call's caller."""
    if _DEPTH.get() == 1 and _CALL.get() is not None and _CALL.get().kind == "torch":
        return FP8Result(a)
    return a


def _torch():
    torch = sys.modules.get("torch")
    if torch is None:
        import torch  # noqa: PLC0415

    return torch


def _torch_dtypes():
    """torch dtype -> NumPy dtype of the array cukv sees (float8 as uint8, bf16 as ml_dtypes), built once."""
    global _TORCH_NP
    if _TORCH_NP is None:
        import ml_dtypes  # noqa: PLC0415

        torch = _torch()
        m = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16), torch.bool: np.dtype(np.bool_)}
        for name in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64",
                     "uint16", "uint32", "uint64", "complex64", "complex128"):
            if hasattr(torch, name):
                m[getattr(torch, name)] = np.dtype(name)
        for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
            if hasattr(torch, name):
                m[getattr(torch, name)] = np.dtype(np.uint8)
        _TORCH_NP = m
    return _TORCH_NP


_TORCH_NP: dict | None = None


def _np_torch(dt):
    """NumPy dtype of a CuPy result -> torch dtype (bf16 included)."""
    torch = _torch()
    if dt.name == "bfloat16":
        return torch.bfloat16
    return getattr(torch, np.dtype(dt).name)


# id(tensor) -> (weakref, data_ptr, shape, strides, dtype, cupy view, device id). A tensor passed again (a cache,
# a block table, lengths: the usual decode loop) reuses its view after five cheap identity checks.
# The view's memory holds the tensor's *storage*, not the tensor, and the entry dies with the tensor.
# _BACK maps id(view) -> (view, weakref to its tensor): a result that is one of the caller's tensors
# (a cache returned, ``out=``) goes back as that tensor, with no per-call bookkeeping.
_VIEWS: dict = {}
_BACK: dict = {}
_VIEWS_MAX = 4096


def _drop_view(key, ref):
    e = _VIEWS.get(key)
    if e is not None and e[0] is ref:
        del _VIEWS[key]
        _BACK.pop(id(e[5]), None)


def _torch_cuda_view(t, dev: int):
    """A new CuPy array over a CUDA tensor's memory (no copy, no DLPack round trip), remembered in
    ``_VIEWS``; None where DLPack must do it (an empty tensor, a dtype CuPy cannot hold)."""
    dt = _torch_dtypes().get(t.dtype)
    if dt is None or t.numel() == 0:
        return None
    cp = cupy()
    ptr, st = t.data_ptr(), t.untyped_storage()
    mem = cp.cuda.UnownedMemory(ptr, st.nbytes() - (ptr - st.data_ptr()), st, dev)
    a = cp.ndarray(tuple(t.shape), dt, cp.cuda.MemoryPointer(mem, 0), tuple(x * dt.itemsize for x in t.stride()))
    if len(_VIEWS) >= _VIEWS_MAX:
        _VIEWS.clear()
        _BACK.clear()
    key = id(t)
    ref = weakref.ref(t, functools.partial(_drop_view, key))
    old = _VIEWS.get(key)
    if old is not None:
        _BACK.pop(id(old[5]), None)
    _VIEWS[key] = (ref, ptr, t.shape, t.stride(), t.dtype, a, dev)
    _BACK[id(a)] = (a, ref)
    return a


_TENSOR = None        # torch.Tensor, once a torch object has been seen
_NDARRAY = None       # cupy.ndarray, once a torch CUDA tensor has been seen
_FROM_DLPACK = None   # torch._C._from_dlpack, likewise


def _torch_call(v, call: _Call):
    """Record torch's current stream (and whether it is capturing a CUDA graph) in ``call``, from
    the first CUDA tensor of the call. Graphs are never captured on the legacy default stream (0)."""
    torch = _torch()
    call.kind = "torch"
    call.device = dev = v.get_device()
    call.stream = s = torch._C._cuda_getCurrentRawStream(dev)
    call.capturing = s != 0 and torch._C._cuda_isCurrentStreamCapturing()


def _known_view(v):
    """The ``_VIEWS`` entry of tensor ``v`` if it still describes ``v`` (a dictionary lookup and four
    cheap checks), else None. An entry dies with its tensor (weakref callback): same id, same object."""
    e = _VIEWS.get(id(v))
    if e is not None and e[1] == v.data_ptr() and e[2] == v.shape and e[3] == v.stride() and e[4] is v.dtype:
        return e
    return None


def _torch_cuda(v, call: _Call):
    """CUDA tensor -> CuPy array: the hot path of a torch decode loop (a tensor seen before costs
    :func:`_known_view`)."""
    if call.stream is None:
        _torch_call(v, call)
    e = _known_view(v)
    if e is not None:
        return e[5]
    dev = v.get_device()
    a = _torch_cuda_view(v, dev)
    if a is None:
        t = v.detach()
        torch = _torch()
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.view(torch.uint8)
        cp = cupy()
        with cp.cuda.Device(dev), _external_stream(call.stream, dev):
            a = cp.from_dlpack(t)
        call.originals[id(a)] = (a, v)
    return a


def _to_native(opname: str, argname: str, v, call: _Call):
    """A framework object -> NumPy/CuPy array sharing its memory (or ``v`` itself if native)."""
    global _TENSOR, _NDARRAY, _FROM_DLPACK
    if type(v) is _TENSOR and v.is_cuda:
        return _torch_cuda(v, call)
    top = type(v).__module__.partition(".")[0]
    if top == "torch":
        torch = _torch()
        _TENSOR = torch.Tensor
        call.kind = call.kind or "torch"
        if v.is_cuda:
            _NDARRAY, _FROM_DLPACK = cupy().ndarray, torch._C._from_dlpack
            return _torch_cuda(v, call)
        if v.device.type == "cpu":
            t = v.detach()
            dt = _torch_dtypes().get(t.dtype)
            if t.dtype == torch.bfloat16:
                a = t.view(torch.int16).numpy().view(dt)
            elif dt is not None and dt == np.uint8 and t.dtype != torch.uint8:   # float8 codes
                a = t.view(torch.uint8).numpy()
            else:
                a = t.numpy()
        else:
            raise TypeError(f"{opname}: {argname}: expected a CPU or CUDA tensor, got device {v.device}")
    elif hasattr(v, "__dlpack_device__") and hasattr(v, "__dlpack__"):
        dev_type, _ = v.__dlpack_device__()
        call.kind = call.kind or ("jax" if top in ("jax", "jaxlib") else None)
        if int(dev_type) == _DLPACK_CUDA:
            a = cupy().from_dlpack(v)
        elif int(dev_type) == _DLPACK_CPU:
            a = np.from_dlpack(v)
        else:
            raise TypeError(f"{opname}: {argname}: expected an array on a CPU or CUDA device, got DLPack "
                            f"device type {int(dev_type)}")
    elif hasattr(v, "__cuda_array_interface__"):
        a = cupy().asarray(v)
    elif hasattr(v, "__array_interface__") or hasattr(v, "__array__"):
        a = np.asarray(v)
    else:
        return v  # classify() reports it
    call.originals[id(a)] = (a, v)
    return a


def _caller_object(r, call: _Call):
    """The caller's own object that native array ``r`` stands for (a torch tensor's cached view, or an
    input converted in this call), or None for an array the op made."""
    e = _BACK.get(id(r))
    if e is not None and e[0] is r:
        return e[1]()
    o = call.originals.get(id(r)) if call.originals else None
    return o[1] if o is not None and o[0] is r else None


def _from_native(r, call: _Call):
    """Convert one result back to the caller's kind (the caller's own object where it was passed)."""
    if call.kind == "torch" and type(r) is _NDARRAY and not call.allocs:   # the decode-loop hot path
        mine = _caller_object(r, call)
        # The op ran on torch's current stream, where torch uses the result: DLPack's stream=-1 (no
        # synchronization; an event record + wait per call otherwise, ~2 us on the H100 host)
        return mine if mine is not None else _FROM_DLPACK(r.__dlpack__(stream=-1))
    if isinstance(r, tuple):
        return tuple(_from_native(x, call) for x in r)
    fp8 = isinstance(r, FP8Result)
    if fp8:
        r = r.array
    if not (isinstance(r, np.ndarray) or is_cupy(r)):
        return r
    mine = _caller_object(r, call)
    if mine is not None:
        return mine
    if call.kind == "torch":
        torch = _torch()
        if isinstance(r, np.ndarray):
            if r.dtype.name == "bfloat16":
                t = torch.from_numpy(r.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(r)
        else:
            base = call.allocs.get(r.data.mem.ptr) if call.allocs and r.size else None
            if base is not None:   # the op allocated it from torch: a view of that tensor, no DLPack
                isz = r.itemsize
                t = base.view(_np_torch(r.dtype)).as_strided(
                    r.shape, tuple(x // isz for x in r.strides), (r.data.ptr - r.data.mem.ptr) // isz)
            else:   # the op ran on torch's stream: no synchronization (see the hot path above)
                t = torch._C._from_dlpack(r.__dlpack__(stream=-1))
        return t.view(torch.float8_e4m3fn) if fp8 else t
    if call.kind == "jax":
        import jax.numpy as jnp  # noqa: PLC0415

        return jnp.from_dlpack(r)
    return r


_STREAMS: dict = {}


def _external_stream(ptr: int, device: int):
    """A CuPy stream object for a foreign CUDA stream pointer, made once per (device, pointer)."""
    st = _STREAMS.get((device, ptr))
    if st is None:
        import warnings  # noqa: PLC0415

        with warnings.catch_warnings():   # CuPy 14 deprecates ExternalStream for Stream.from_external
            warnings.simplefilter("ignore", DeprecationWarning)
            st = cupy().cuda.ExternalStream(ptr, device)
        _STREAMS[(device, ptr)] = st
    return st


def _torch_malloc(size: int, call: _Call):
    """CuPy allocator drawing from torch's caching allocator (stream-ordered, graph-capture aware)."""
    torch = _torch()
    t = torch.empty(((int(size) + 15) & ~15 or 16,), dtype=torch.uint8, device=call.device)
    cp = cupy()
    ptr = t.data_ptr()
    call.allocs[ptr] = t
    return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(ptr, int(size), t, call.device), 0)


class _capture_allocator:
    """While torch captures a CUDA graph, the op's own allocations (outputs, split-K scratch) come
    from torch's allocator, i.e. from the graph's private pool: CuPy's pool would call cudaMalloc,
    which capture forbids, or hand out a block freed on another stream. Results go back as views of
    those tensors."""

    __slots__ = ("call", "ctx")

    def __init__(self, call: _Call):
        self.call = call
        self.ctx = None

    def __enter__(self):
        self.ctx = cupy().cuda.using_allocator(functools.partial(_torch_malloc, call=self.call))
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


_NATIVE = (np.ndarray,)
_SCALARS = (int, float, bool, np.integer, np.floating, str)


def op(opname: str, arrays: tuple[str, ...]):
    """Decorate a public op: resolve its backend from the arguments named in ``arrays``.

    Integer-valued arguments (``valid_tokens``) may be Python ints; they are not arrays and are
    skipped. The decorated function reads the backend with :func:`current`.

    Framework tensors are accepted for every array argument (SPEC: interop): torch CUDA tensors and
    ``__dlpack__`` / ``__cuda_array_interface__`` objects become CuPy arrays sharing their memory, CPU
    tensors and ``__array__`` objects become NumPy arrays; torch ``float8_*`` tensors are viewed as
    uint8. With torch CUDA inputs the op runs on torch's current stream. Results come back as the
    caller's kind; a result that is one of the caller's own arrays (``out=``) is returned as that
    object. Nested op calls see native arrays only.
    """

    def deco(fn):
        sig = inspect.signature(fn)
        params = list(sig.parameters)
        slots = tuple((n, params.index(n)) for n in arrays)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = _DEPTH.get()
            call = _CALL.get() if depth else None
            named = {}
            largs = None
            known = None   # views of torch tensors on the call's device: nothing to classify
            for n, i in slots:
                if i < len(args):
                    v = args[i]
                elif n in kwargs:
                    v = kwargs[n]
                else:
                    continue
                if v is None:
                    continue
                dest = named
                if type(v) is _TENSOR:   # the torch decode-loop hot path: a tensor seen before
                    if call is None:
                        call = _Call()
                    e = _known_view(v)
                    if e is not None:
                        if call.stream is None:
                            _torch_call(v, call)
                        v = e[5]
                        if e[6] == call.device:
                            if known is None:
                                known = {}
                            dest = known
                    else:
                        v = _torch_cuda(v, call) if v.is_cuda else _to_native(opname, n, v, call)
                elif isinstance(v, _SCALARS) or isinstance(v, _NATIVE) or is_cupy(v):
                    if not isinstance(v, _SCALARS):
                        named[n] = v
                    continue
                elif isinstance(v, (tuple, list)):
                    if all(x is None or isinstance(x, _NATIVE) or is_cupy(x) for x in v):
                        named[n] = v
                        continue
                    if call is None:
                        call = _Call()
                    v = type(v)(x if x is None else _to_native(opname, f"{n}[{j}]", x, call)
                                for j, x in enumerate(v))
                else:
                    if call is None:
                        call = _Call()
                    v = _to_native(opname, n, v, call)
                dest[n] = v
                if i < len(args):
                    if largs is None:
                        largs = list(args)
                    largs[i] = v
                else:
                    kwargs[n] = v
            if largs is not None:
                args = tuple(largs)
            if known is None:
                be = resolve(opname, named)
            else:   # the rest must agree with the tensors' device (else resolve names the culprit)
                be = _gpu(call.device)
                if named and resolve(opname, named) is not be:
                    resolve(opname, {**known, **named})
            token = _CURRENT.set(be)
            dtok = _DEPTH.set(depth + 1)
            ctok = _CALL.set(call) if depth == 0 else None
            try:
                if be.gpu:
                    cp = cupy()
                    with cp.cuda.Device(be.device):
                        if call is not None and call.stream is not None and depth == 0:
                            # results are handed to torch inside the stream context, so DLPack sees
                            # one stream and inserts no cross-stream event (graph capture safe)
                            if not call.capturing and call.stream == cp.cuda.get_current_stream().ptr:
                                return _from_native(fn(*args, **kwargs), call)   # already current
                            with _external_stream(call.stream, be.device):
                                if call.capturing:
                                    with _capture_allocator(call):
                                        return _from_native(fn(*args, **kwargs), call)
                                return _from_native(fn(*args, **kwargs), call)
                        result = fn(*args, **kwargs)
                else:
                    result = fn(*args, **kwargs)
            finally:
                _CURRENT.reset(token)
                _DEPTH.reset(dtok)
                if ctok is not None:
                    _CALL.reset(ctok)
            if depth == 0:
                if call is not None and call.kind is not None:
                    return _from_native(result, call)
                return _unmark(result)
            return result

        return wrapper

    return deco


def _unmark(r):
    if isinstance(r, tuple):
        return tuple(_unmark(x) for x in r)
    return r.array if isinstance(r, FP8Result) else r
