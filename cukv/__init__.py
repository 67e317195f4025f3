"""cukv: CUDA kernels for quantized (FP8 / INT4) LLM key/value caches.

NumPy inputs run the NumPy + ml_dtypes reference (``cukv.ref``); CuPy inputs run the CUDA kernels
(compiled at run time by ``cupy.RawModule``). ``import cukv`` imports neither CuPy nor a device.
SPEC.md is normative for every op.
"""
from .formats import FORMATS, parse_format, row_bytes, pack_qparams, unpack_qparams  # noqa: F401
from .codec import quantize, dequantize  # noqa: F401
from .norm import rms_norm  # noqa: F401
from .dequant import dequantize_cache  # noqa: F401
from .per_head import quantize_qkv_per_head  # noqa: F401
from .kvcache import KVCache  # noqa: F401
from .rope import RoPE, XPos, Llama31Scaling, rope_frequencies  # noqa: F401
from .cache_write import write_kv_prefill, write_kv_decode  # noqa: F401
from .attention_prefill import prefill_attention  # noqa: F401
from .attention_decode import decode_attention  # noqa: F401

__version__ = "0.1.0"
