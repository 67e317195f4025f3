"""The README's Python examples run as written (NumPy always; CuPy / torch on a GPU)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _run(code: str, ns: dict | None = None) -> dict:
    ns = {} if ns is None else ns
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 (our own README)
    return ns


def test_readme_has_examples():
    kinds = [("torch" if "import torch" in b else "cupy" if "import cupy" in b else "numpy") for b in _blocks()]
    assert kinds.count("numpy") >= 1 and "cupy" in kinds and "torch" in kinds


def test_numpy_examples():
    for b in _blocks():
        if "import cupy" not in b and "import torch" not in b:
            _run(b)


def test_cupy_example(gpu):
    ns = {}
    for b in _blocks():
        if "import torch" in b:
            continue
        _run(b, ns)           # the CuPy block continues the NumPy one (uses its `x` and `rows`)


def test_torch_decode_example(gpu, capsys):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    for b in _blocks():
        if "import torch" in b:
            _run(b)
    out = capsys.readouterr().out
    assert "torch.Size([4, 32, 128]) torch.bfloat16" in out
