"""``python -m flows.cli``: the ``ldm`` command."""

import sys

from flows.cli import main

sys.exit(main())
