"""``python -m qbench ...`` is the ``qbench`` command (qbench/run/cli.py)."""
import sys

from qbench.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
