"""``python -m dermcir``: the same as the ``dermcir`` command."""

import sys

from dermcir.cli import main

sys.exit(main())
