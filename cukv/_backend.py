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
from dataclasses import dataclass

import numpy as np

__all__ = ["Backend", "op", "current", "cupy", "is_cupy", "gpu_available"]


def cupy():
    """The ``cupy`` module, imported on first use."""
    import cupy as _cp  # noqa: PLC0415 (lazy on purpose)

    return _cp


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

    def asarray_like(self, a):
        """``a`` (a host array or scalar made by the op itself) in this backend's module."""
        return np.asarray(a) if self.name == "numpy" else cupy().asarray(a)


_CURRENT: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("cukv_backend", default=None)


def current() -> Backend:
    """The backend of the op being executed (set by :func:`op`)."""
    be = _CURRENT.get()
    if be is None:
        raise RuntimeError("cukv internal error: _backend.current() called outside an op")
    return be


def _float8_dtype(dt) -> bool:
    return getattr(dt, "name", "").startswith(("float8", "float4", "int4", "uint4", "int2", "uint2"))


def classify(opname: str, argname: str, a) -> Backend:
    """The backend of one array argument, or a ``TypeError``."""
    if isinstance(a, np.ndarray):
        be = Backend("numpy")
    elif is_cupy(a):
        be = Backend("cupy", int(a.device.id))
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
            elif b != be:
                what = (f"{b.name} array" if b.name != be.name
                        else f"array on CUDA device {b.device}")
                want = (f"{be.name} array" if b.name != be.name
                        else f"CUDA device {be.device}")
                raise TypeError(
                    f"{opname}: {label}: got a {what}, but {first} is a {want}; all arrays of one "
                    f"call must live in one module and on one device (no implicit copies)")
    return be if be is not None else Backend("numpy")


def op(opname: str, arrays: tuple[str, ...]):
    """Decorate a public op: resolve its backend from the arguments named in ``arrays``.

    Integer-valued arguments (``valid_tokens``) may be Python ints; they are not arrays and are
    skipped. The decorated function reads the backend with :func:`current`.
    """

    def deco(fn):
        sig = inspect.signature(fn)
        params = list(sig.parameters)
        pos_index = {n: params.index(n) for n in arrays}

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            named = {}
            for n in arrays:
                i = pos_index[n]
                v = args[i] if i < len(args) else kwargs.get(n)
                if isinstance(v, (int, float, bool, np.integer, np.floating, str)) or v is None:
                    continue
                named[n] = v
            be = resolve(opname, named)
            token = _CURRENT.set(be)
            try:
                if be.gpu:
                    with cupy().cuda.Device(be.device):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            finally:
                _CURRENT.reset(token)

        return wrapper

    return deco
