"""The numpy/cupy backend grid of the cukv tests.

Fixtures
--------
``xp``
    Parametrized over ``numpy`` and ``cupy``: the array module a test runs in. The ``cupy`` case is
    skipped, with the reason from ``cukv._backend.gpu_available()``, when there is no usable GPU, so a
    CPU-only run still collects and runs every NumPy case. The test ids are ``[numpy]`` / ``[cupy]``.
``gpu``
    The ``cupy`` module, for GPU-only tests (kernel vs reference); skips with a reason without a GPU.
``rng``
    A fresh ``numpy.random.Generator`` per test, seeded from the test's node id: every test draws new
    random data, reproducibly (re-running one test gives the same data).

CuPy is never imported at module level here (``import cukv`` and CPU CI must not need a GPU); it is
imported inside the fixtures only when a cupy case runs. Shared helpers live in ``tests/helpers.py``.
"""
from __future__ import annotations

import functools
import os
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import helpers` from any rootdir


@functools.lru_cache(maxsize=1)
def _gpu_status() -> tuple[bool, str]:
    from cukv import _backend  # noqa: PLC0415

    return _backend.gpu_available()


def _require_gpu():
    ok, reason = _gpu_status()
    if not ok:
        pytest.skip(f"needs a CUDA GPU: {reason}")
    from cukv import _backend  # noqa: PLC0415

    return _backend.cupy()


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module of the test case: ``numpy`` always, ``cupy`` when a GPU is usable."""
    if request.param == "numpy":
        return np
    request.node.add_marker(pytest.mark.gpu)
    return _require_gpu()


@pytest.fixture
def gpu(request):
    """The ``cupy`` module; skips with a visible reason when there is no usable GPU."""
    request.node.add_marker(pytest.mark.gpu)
    return _require_gpu()


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded by the test's node id (crc32)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_report_header(config):
    ok, reason = _gpu_status()
    if ok:
        from cukv import _backend  # noqa: PLC0415

        cp = _backend.cupy()
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"cukv: GPU tests ON ({name}, CuPy {cp.__version__})"
    return f"cukv: GPU tests SKIPPED ({reason})"
