"""`python -m linearize ...`: the `linearize` command where no console script is installed."""

import sys

from linearize.cli import main

sys.exit(main())
