"""``python -m retrieval.cli``: the same as the ``retrieval`` command (torchrun uses it)."""

import sys

from retrieval.cli import main

sys.exit(main())
