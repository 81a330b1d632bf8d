"""``python -m dermcir``: the same as the ``dermcir`` command."""

import sys

from dermcir.cli import main

if __name__ == "__main__":  # not when a worker process (multiprocessing's spawn) imports this module
    sys.exit(main())
