"""cukv._compile: the NVRTC compile gate (every family, sm_80 and sm_90, every lookup name) and the
pure helpers (expressions, options, digest, launch argument checks, team shapes).

The gate needs NVRTC but no GPU (``cupy_backends.cuda.libs.nvrtc`` from cupy-cuda12x plus the
nvidia-cuda-nvrtc-cu12 wheel). Without NVRTC it skips with the reason, except when
``CUKV_REQUIRE_NVRTC=1`` (set by ``.ci/run``), where a missing NVRTC is a failure.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cukv import _compile

REQUIRE_NVRTC = os.environ.get("CUKV_REQUIRE_NVRTC") == "1"
FAMILIES = sorted(_compile.families())


def _nvrtc_status() -> tuple[bool, str]:
    try:
        from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415

        v = nvrtc.getVersion()
    except Exception as e:  # ImportError, missing libnvrtc
        return False, f"NVRTC unavailable ({type(e).__name__}: {e})"
    return True, f"NVRTC {v}"


@pytest.fixture(scope="module")
def nvrtc_ready():
    ok, reason = _nvrtc_status()
    if not ok:
        if REQUIRE_NVRTC:
            pytest.fail(f"CUKV_REQUIRE_NVRTC=1 but {reason}")
        pytest.skip(reason)
    return reason


def test_every_op_module_registers_a_family():
    assert "codec.cu" in FAMILIES and "norm.cu" in FAMILIES
    for src in FAMILIES:
        assert (_compile.SRC_DIR / src).is_file(), f"family {src} has no source file"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_gate(nvrtc_ready, family, arch):
    """Every declared instantiation of ``family`` compiles for ``arch`` and every lookup name resolves."""
    fam = _compile.families()[family]
    assert fam.expressions, f"{family} declares no instantiations"
    res = _compile.compile_only(arch, names=[family])
    assert res == {family: len(fam.expressions)}


def test_compile_error_names_file_and_line(nvrtc_ready, tmp_path, monkeypatch):
    """A broken source reports NVRTC's log with the real file name (the #line prefix)."""
    (tmp_path / "broken.cu").write_text("// ok\ntemplate <int N> __global__ void k(int* p) { p[0] = N + ; }\n")
    monkeypatch.setattr(_compile, "SRC_DIR", tmp_path)
    fam = _compile.Family.__new__(_compile.Family)
    fam.source, fam.expressions, fam.exact, fam._modules = "broken.cu", ("k<1>",), True, {}
    with pytest.raises(RuntimeError, match=r"(?s)NVRTC failed on broken\.cu for sm_90.*cukv/cuda_src/broken\.cu\(2\)"):
        _compile.nvrtc_compile(fam, fam.expressions, "sm_90", cubin=False)


# ------------------------------------------------------------------------------ pure helpers
def test_expression():
    assert _compile.expression("k") == "k"
    assert _compile.expression("k", "float", 4) == "k<float, 4>"
    assert _compile.expression("k", True, False) == "k<true, false>"
    assert _compile.expression("q", "bf16_t", 3, 1, 32, 8) == "q<bf16_t, 3, 1, 32, 8>"


def test_family_source_and_options():
    fam = _compile.families()["norm.cu"]
    code = fam.code()
    assert code.startswith('#line 1 "cukv/cuda_src/norm.cu"\n')
    opts = fam.options()
    assert "--fmad=false" in opts and "-ftz=false" in opts and "--std=c++17" in opts
    assert f"-DCUKV_SRC_DIGEST=0x{_compile.source_digest()}ULL" in opts
    assert not any("fast" in o for o in opts)
    assert re.fullmatch(r"[0-9a-f]{16}", _compile.source_digest())
    assert len(set(fam.expressions)) == len(fam.expressions)


def test_kernel_rejects_undeclared_expression():
    fam = _compile.families()["norm.cu"]
    with pytest.raises(RuntimeError, match="not declared in norm.cu"):
        fam.kernel("rms_norm_rows", "double", "none_t", 32, 8)


def test_launch_rejects_python_scalars():
    with pytest.raises(TypeError, match="numpy scalar"):
        _compile.launch(None, (1,), (32,), (np.int32(1), 2.5))
    # an empty grid launches nothing (the kernel object is never touched)
    _compile.launch(None, (0,), (32,), (np.int32(1),))


@pytest.mark.parametrize("D,shape", [(8, (1, 1)), (64, (8, 1)), (128, (16, 1)), (256, (32, 1)),
                                     (264, (32, 2)), (1024, (32, 4)), (8192, (32, 32))])
def test_team_shape(D, shape):
    assert _compile.team_shape(D) == shape
    assert shape in _compile.TEAM_SHAPES


def test_team_shape_limit():
    with pytest.raises(ValueError, match="row limit"):
        _compile.team_shape(32 * 8 * _compile.MAX_V + 8)


def test_main_module_help():
    r = subprocess.run([sys.executable, "-m", "cukv._compile", "--help"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "--arch" in r.stdout
