"""Imports every module that declares a kernel family, so ``_compile.families()`` sees them all."""
from . import codec  # noqa: F401
try:
    from . import norm  # noqa: F401
except ImportError:  # pragma: no cover
    pass
