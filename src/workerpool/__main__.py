"""``python -m workerpool``: the same as the ``workerpool`` command."""

import sys

from .cli import main

sys.exit(main())
