"""cukv._backend: array-module dispatch (SPEC §1.3), module-mix and float8 TypeErrors, lazy CuPy."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from cukv import _backend
from helpers import raises_arg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@_backend.op("probe", arrays=("a", "b", "c"))
def probe(a, b=None, c=None, *, n=0):
    """A dummy op: returns the resolved backend."""
    return _backend.current()


def test_numpy_dispatch():
    be = probe(np.zeros(3), np.zeros(2), c=3)
    assert be == _backend.Backend("numpy") and not be.gpu and be.xp is np
    assert probe(np.zeros(1), None, None).name == "numpy"


def test_current_outside_an_op():
    with pytest.raises(RuntimeError, match="outside an op"):
        _backend.current()


def test_non_array_argument():
    with raises_arg(TypeError, "probe", "a", "numpy.ndarray or cupy.ndarray", "builtins.dict"):
        probe({"not": "an array"})


@pytest.mark.parametrize("dt", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.int4])
def test_float8_and_int4_dtypes_rejected(dt):
    with raises_arg(TypeError, "probe", "b", "view(np.uint8)"):
        probe(np.zeros(2), np.zeros(4, dt))


def test_tuple_argument_labels():
    @_backend.op("tup", arrays=("xs",))
    def tup(xs):
        return _backend.current()

    assert tup((np.zeros(1), None, np.zeros(2))).name == "numpy"
    with raises_arg(TypeError, "tup", "xs[1]", "numpy.ndarray"):
        tup((np.zeros(1), "nope"))


def test_module_mix(gpu):
    with raises_arg(TypeError, "probe", "b", "got a cupy array", "but a is a numpy array"):
        probe(np.zeros(2), gpu.zeros(2))
    with raises_arg(TypeError, "probe", "c", "got a numpy array", "but a is a cupy array"):
        probe(gpu.zeros(2), None, np.zeros(2))


def test_cupy_dispatch(gpu):
    be = probe(gpu.zeros(2), gpu.zeros(3))
    assert be.name == "cupy" and be.gpu and be.device == gpu.cuda.Device().id and be.xp is gpu


def test_result_module_follows_input(xp):
    import cukv  # noqa: PLC0415

    x = xp.asarray(np.ones((2, 8), np.float32))
    y = cukv.rms_norm(x)
    assert type(y) is type(x)


def test_gpu_available_shape():
    ok, reason = _backend.gpu_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and (ok or reason)


def test_import_cukv_does_not_import_cupy():
    """SPEC §1.3: ``import cukv`` (and NumPy calls through it) never import CuPy."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import cukv, cukv.ref, cukv._compile
        cukv._compile.families()
        x = np.ones((3, 16), np.float32)
        cukv.rms_norm(x)
        cukv.dequantize(cukv.quantize(x, "fp8"), "fp8")
        bad = [m for m in sys.modules if m == "cupy" or m.startswith(("cupy.", "cupy_backends"))]
        assert not bad, bad
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
