"""``python -m fastiml ...``: the ``fastiml`` command (see :mod:`fastiml.cli`)."""
import sys

from fastiml.cli import main

if __name__ == "__main__":
    sys.exit(main())
