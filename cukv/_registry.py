"""Imports every module that declares a kernel family, so ``_compile.families()`` sees them all."""
from . import codec, norm  # noqa: F401
from . import dequant  # noqa: F401
from . import per_head  # noqa: F401
from . import cache_write  # noqa: F401
from . import attention_prefill  # noqa: F401
from . import attention_decode  # noqa: F401
