"""NumPy + ml_dtypes reference of every cukv op: the executable form of SPEC.md.

No CuPy here. Public ops called with NumPy arrays run these functions.
"""
from .codec import quantize, dequantize, e4m3_encode, e4m3_decode, S_MIN  # noqa: F401
from .norm import rms_norm, qk_norm  # noqa: F401
