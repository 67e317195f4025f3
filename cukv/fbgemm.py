"""FBGEMM-compatible layer (SPEC §10): FBGEMM gen_ai kv_cache ops under their own names.

Each function keeps FBGEMM's name, positional order, argument names and defaults, and maps onto the
native cukv API. Tensors become NumPy/CuPy arrays; FBGEMM's ``float8_e4m3fn`` tensors are ``uint8``.
Every function also takes keyword-only ``validate=True``, ``check_finite=False`` and
``cache_format=None`` (overrides the dispatch by cache dtype of SPEC §10).

Where FBGEMM is wrong or limited (SPEC §12), cukv does the correct thing; each docstring says where.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------------- writers
# (SPEC §10.1) rope_qkv_varseq_prefill, rope_qkv_decoding, nope_*, xpos_*

# ---------------------------------------------------------------------------------------- dequantizers
# (SPEC §10.2, §10.3) dequantize_fp8_cache, dequantize_int4_cache, quantize_qkv_per_head

# ---------------------------------------------------------------------------------------- attention
# (SPEC §10.4) mqa_attn, gqa_attn_splitk
