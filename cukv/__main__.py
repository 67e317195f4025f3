"""``python -m cukv``: the ``cukv`` command (see :mod:`cukv.cli`)."""
import sys

from .cli import main

sys.exit(main())
