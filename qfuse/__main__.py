"""`python -m qfuse` runs the command-line interface."""

import sys

from qfuse.cli.main import main

sys.exit(main())
